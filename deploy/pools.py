"""deploy/pools.yaml -> a frozen `ServeConfig` tree. Parsed here, at the edge, and nowhere else.

    ServeConfig
      model                       HF folder / .gguf; None = embedded SmolLM2-135M-Instruct
      router: RouterSection       host, port, placement policy, metrics port
      autoscaler: LoopSection     control loop on/off, tick interval
      prefill, decode: PoolConfig replicas (min/max/initial), ReplicaResources, AutoscaleConfig

Every error names the file, the line (from yaml.compose's node marks) and the dotted key, and all
errors of a file are reported at once: `PoolsConfigError.issues` is the list.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from pdcluster.router.autoscaler import SIGNALS, ScalingRule
from pdcluster.router.placement import DEFAULT_POLICY, POLICY_NAMES
SLO_KEY = {"p90_ttft": "ttft_slo_ms", "p90_tpot": "tpot_slo_ms"}    # latency signals take their target here


# tree

@dataclass(frozen=True)
class RouterSection:
    host: str = "127.0.0.1"
    port: int = 50051
    policy: str = DEFAULT_POLICY        # placement policy, one of router.policies.POLICY_NAMES
    metrics_port: int = 9090            # Prometheus /metrics on host:metrics_port; 0 = off


@dataclass(frozen=True)
class LoopSection:
    enabled: bool = True
    interval_s: float = 5.0


@dataclass(frozen=True)
class ReplicaResources:
    cpus: int = 1                       # Ray CPUs reserved per replica
    gpus: int = 0                       # 0 (CPU host) or 1: one device per replica
    threads: int = 1                    # torch threads per replica (CPU hosts)


@dataclass(frozen=True)
class AutoscaleConfig:
    signal: str
    target: float | None = None         # queued_prompt_tokens_per_replica: tokens; kv_utilization: fraction
    ttft_slo_ms: float | None = None    # target of p90_ttft
    tpot_slo_ms: float | None = None    # target of p90_tpot
    scale_up_above: float = 1.0         # x target
    scale_down_below: float = 0.5       # x target
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 300.0
    max_step: int = 1
    cooldown_s: float = 60.0

    @property
    def signal_target(self) -> float:
        return getattr(self, SLO_KEY[self.signal]) if self.signal in SLO_KEY else self.target


@dataclass(frozen=True)
class PoolConfig:
    name: str                           # "prefill" | "decode"
    min_replicas: int
    max_replicas: int
    initial_replicas: int
    resources: ReplicaResources
    autoscale: AutoscaleConfig

    def scaling_rule(self) -> ScalingRule:
        a = self.autoscale
        return ScalingRule(signal=a.signal, target=a.signal_target, min_replicas=self.min_replicas,
                           max_replicas=self.max_replicas, up_ratio=a.scale_up_above, down_ratio=a.scale_down_below,
                           upscale_delay_s=a.upscale_delay_s, downscale_delay_s=a.downscale_delay_s,
                           max_step=a.max_step, cooldown_s=a.cooldown_s)


@dataclass(frozen=True)
class ServeConfig:
    model: str | None
    router: RouterSection
    autoscaler: LoopSection
    prefill: PoolConfig
    decode: PoolConfig
    source: str = ""                    # the file it came from

    @property
    def pools(self) -> dict[str, PoolConfig]:
        return {"prefill": self.prefill, "decode": self.decode}

    def scaling_rules(self) -> dict[str, ScalingRule]:
        return {name: p.scaling_rule() for name, p in self.pools.items()}

    def autoscaling_rules(self) -> dict[str, ScalingRule]:
        """The rules `serve` runs the pool autoscaler with: pools with min_replicas < max_replicas, none
        when autoscaler.enabled is false (then each pool stays at initial_replicas)."""
        if not self.autoscaler.enabled:
            return {}
        return {name: p.scaling_rule() for name, p in self.pools.items() if p.min_replicas < p.max_replicas}

    def to_cluster_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `deploy.launch.ClusterConfig` (the serve-time fields it has).

        ClusterConfig sizes both pools alike and reserves `threads_per_worker` Ray CPUs per actor,
        so per-pool sizes it cannot express are refused here rather than silently dropped."""
        p, d = self.prefill.resources, self.decode.resources
        bad = [f"{k}: prefill {getattr(p, k)} != decode {getattr(d, k)}" for k in ("threads", "gpus")
               if getattr(p, k) != getattr(d, k)]
        bad += [f"{n}: resources.cpus ({r.cpus}) != resources.threads ({r.threads})"
                for n, r in (("prefill", p), ("decode", d)) if r.cpus != r.threads]
        if bad:
            raise ValueError(f"{self.source}: deploy.launch.ClusterConfig cannot express per-pool sizes: "
                             + "; ".join(bad))
        kw = dict(model=self.model, host=self.router.host, port=self.router.port,
                  metrics_port=self.router.metrics_port, prefill_workers=self.prefill.initial_replicas,
                  decode_workers=self.decode.initial_replicas, threads_per_worker=p.threads, use_gpu=p.gpus > 0,
                  max_prefill_workers=self.prefill.max_replicas, max_decode_workers=self.decode.max_replicas,
                  policy=self.router.policy)
        return kw


# errors

@dataclass(frozen=True)
class Issue:
    line: int                           # 1-based
    key: str                            # dotted path, e.g. "prefill.autoscale.max_step"
    message: str


class PoolsConfigError(ValueError):
    def __init__(self, path: str, issues: list[Issue]):
        self.path = path
        self.issues = sorted(issues, key=lambda i: i.line)
        super().__init__("\n".join(f"{path}:{i.line}: {i.key}: {i.message}" for i in self.issues))


# reading

_NO = object()      # "key absent": the field's default applies


class _Reader:
    """Walks the composed node tree, converting scalars and recording issues with their lines."""

    def __init__(self):
        self.issues: list[Issue] = []
        self._construct = yaml.constructor.SafeConstructor()

    def fail(self, node: yaml.Node, key: str, message: str) -> None:
        self.issues.append(Issue(node.start_mark.line + 1, key, message))

    def mapping(self, node: yaml.Node, key: str, allowed: tuple[str, ...]) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """{name: (key node, value node)} of a mapping, flagging unknown and repeated keys."""
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, key or "(top level)", f"expected a mapping, got {_kind(node)}")
            return {}
        out = {}
        for kn, vn in node.value:
            name = kn.value if isinstance(kn, yaml.ScalarNode) else None
            path = f"{key}.{name}" if key else str(name)
            if name not in allowed:
                self.fail(kn, path, f"unknown key (allowed: {', '.join(allowed)})")
            elif name in out:
                self.fail(kn, path, f"repeated key (first on line {out[name][0].start_mark.line + 1})")
            else:
                out[name] = (kn, vn)
        return out

    def value(self, m: dict, name: str, key: str, check: Callable[[Any], str | None], default: Any = _NO) -> Any:
        """The converted value of `name` (or `default` when absent); `check` returns a problem or None."""
        path = f"{key}.{name}" if key else name
        if name not in m:
            return default
        vn = m[name][1]
        if not isinstance(vn, yaml.ScalarNode):
            self.fail(vn, path, f"expected a single value, got {_kind(vn)}")
            return _NO
        v = self._construct.construct_object(vn, deep=True)
        problem = check(v)
        if problem:
            self.fail(vn, path, f"{problem} (got {v!r})")
            return _NO
        return float(v) if getattr(check, "to_float", False) else v


def _kind(node: yaml.Node) -> str:
    return {yaml.MappingNode: "a mapping", yaml.SequenceNode: "a list"}.get(type(node), "a single value")


def _int(lo: int, hi: int | None = None) -> Callable[[Any], str | None]:
    def integer(v):
        if isinstance(v, bool) or not isinstance(v, int):
            return "expected an integer"
        if v < lo or (hi is not None and v > hi):
            return f"must be in [{lo}, {hi}]" if hi is not None else f"must be >= {lo}"
        return None
    return integer


def _num(lo: float, hi: float | None = None, lo_open: bool = False) -> Callable[[Any], str | None]:
    def number(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return "expected a number"
        if v < lo or (lo_open and v == lo) or (hi is not None and v > hi):
            left = "(" if lo_open else "["
            return f"must be in {left}{lo}, {hi}]" if hi is not None else f"must be {'>' if lo_open else '>='} {lo}"
        return None
    number.to_float = True
    return number


def _str(v) -> str | None:
    return None if isinstance(v, str) and v else "expected a non-empty string"


def _opt_str(v) -> str | None:
    return None if v is None else _str(v)


def _bool(v) -> str | None:
    return None if isinstance(v, bool) else "expected true or false"


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    def one_of(v):
        return None if v in choices else f"must be one of {', '.join(choices)}"
    return one_of


def _pick(v: Any, default: Any) -> Any:
    return default if v is _NO else v


DEFAULT_SIGNAL = {"prefill": ("queued_prompt_tokens_per_replica", 4096.0), "decode": ("kv_utilization", 0.75)}
POOL_KEYS = ("min_replicas", "max_replicas", "initial_replicas", "resources", "autoscale")
AUTOSCALE_KEYS = ("signal", "target", "ttft_slo_ms", "tpot_slo_ms", "scale_up_above", "scale_down_below",
                  "upscale_delay_s", "downscale_delay_s", "max_step", "cooldown_s")


def _pool(rd: _Reader, name: str, node: yaml.Node | None, parent: yaml.Node) -> PoolConfig:
    m = rd.mapping(node, name, POOL_KEYS) if node is not None else {}
    lo = _pick(rd.value(m, "min_replicas", name, _int(1)), 1)
    hi = _pick(rd.value(m, "max_replicas", name, _int(1)), max(lo, 1))
    if "max_replicas" in m and hi < lo:
        rd.fail(m["max_replicas"][1], f"{name}.max_replicas", f"must be >= min_replicas ({lo}) (got {hi})")
    init = _pick(rd.value(m, "initial_replicas", name, _int(1)), lo)
    if "initial_replicas" in m and not lo <= init <= hi:
        rd.fail(m["initial_replicas"][1], f"{name}.initial_replicas",
                f"must be in [min_replicas, max_replicas] = [{lo}, {hi}] (got {init})")

    key = f"{name}.resources"
    r = rd.mapping(m["resources"][1], key, ("cpus", "gpus", "threads")) if "resources" in m else {}
    res = ReplicaResources(cpus=_pick(rd.value(r, "cpus", key, _int(1)), 1),
                           gpus=_pick(rd.value(r, "gpus", key, _int(0, 1)), 0),
                           threads=_pick(rd.value(r, "threads", key, _int(1)), 1))

    key = f"{name}.autoscale"
    a = rd.mapping(m["autoscale"][1], key, AUTOSCALE_KEYS) if "autoscale" in m else {}
    sig_default, target_default = DEFAULT_SIGNAL[name]
    signal = _pick(rd.value(a, "signal", key, _one_of(SIGNALS[name])), sig_default)
    frac = signal == "kv_utilization"
    target = rd.value(a, "target", key, _num(0, 1 if frac else None, lo_open=True),
                      target_default if signal == sig_default else None)
    slo = {k: rd.value(a, k, key, _num(0, lo_open=True), None) for k in ("ttft_slo_ms", "tpot_slo_ms")}
    for k in slo:
        if k in a and SLO_KEY.get(SIGNALS[name][1]) != k:
            rd.fail(a[k][0], f"{key}.{k}", f"not a {name} knob (the {name} latency target is "
                                           f"{SLO_KEY[SIGNALS[name][1]]})")
    need = SLO_KEY.get(signal, "target")
    have = target if need == "target" else slo[need]
    if have is None and signal in SIGNALS[name]:
        where = a["signal"][1] if "signal" in a else (m["autoscale"][1] if "autoscale" in m else (node or parent))
        rd.fail(where, f"{key}.{need}", f"required when signal is {signal}")
    up = _pick(rd.value(a, "scale_up_above", key, _num(0, lo_open=True)), 1.0)
    down = _pick(rd.value(a, "scale_down_below", key, _num(0, lo_open=True)), 0.5)
    if down >= up and ("scale_down_below" in a or "scale_up_above" in a):
        k = "scale_down_below" if "scale_down_below" in a else "scale_up_above"
        rd.fail(a[k][1], f"{key}.{k}", f"need scale_down_below < scale_up_above (got {down} and {up})")
    auto = AutoscaleConfig(
        signal=signal, target=_pick(target, None), ttft_slo_ms=_pick(slo["ttft_slo_ms"], None),
        tpot_slo_ms=_pick(slo["tpot_slo_ms"], None), scale_up_above=up, scale_down_below=down,
        upscale_delay_s=_pick(rd.value(a, "upscale_delay_s", key, _num(0)), 30.0),
        downscale_delay_s=_pick(rd.value(a, "downscale_delay_s", key, _num(0)), 300.0),
        max_step=_pick(rd.value(a, "max_step", key, _int(1)), 1),
        cooldown_s=_pick(rd.value(a, "cooldown_s", key, _num(0)), 60.0))
    return PoolConfig(name, lo, hi, init, res, auto)


def parse_pools_config(text: str, source: str = "<string>") -> ServeConfig:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise PoolsConfigError(source, [Issue(mark.line + 1 if mark else 1, "(syntax)", str(e.problem))]) from None
    if root is None:
        raise PoolsConfigError(source, [Issue(1, "(top level)", "the file is empty")])
    rd = _Reader()
    top = rd.mapping(root, "", ("model", "router", "autoscaler", "prefill", "decode"))
    model = _pick(rd.value(top, "model", "", _opt_str), None)
    r = rd.mapping(top["router"][1], "router", ("host", "port", "policy", "metrics_port")) if "router" in top else {}
    router = RouterSection(host=_pick(rd.value(r, "host", "router", _str), "127.0.0.1"),
                           port=_pick(rd.value(r, "port", "router", _int(0, 65535)), 50051),
                           policy=_pick(rd.value(r, "policy", "router", _one_of(POLICY_NAMES)), DEFAULT_POLICY),
                           metrics_port=_pick(rd.value(r, "metrics_port", "router", _int(0, 65535)), 9090))
    lp = rd.mapping(top["autoscaler"][1], "autoscaler", ("enabled", "interval_s")) if "autoscaler" in top else {}
    loop = LoopSection(enabled=_pick(rd.value(lp, "enabled", "autoscaler", _bool), True),
                       interval_s=_pick(rd.value(lp, "interval_s", "autoscaler", _num(0, lo_open=True)), 5.0))
    pools = {n: _pool(rd, n, top[n][1] if n in top else None, root) for n in ("prefill", "decode")}
    if rd.issues:
        raise PoolsConfigError(source, rd.issues)
    return ServeConfig(model, router, loop, pools["prefill"], pools["decode"], source)


def load_pools_config(path: str | Path) -> ServeConfig:
    """Parse and validate a pools file; raises PoolsConfigError naming file, line and key."""
    return parse_pools_config(Path(path).read_text(), str(path))
