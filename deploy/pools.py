"""deploy/pools.yaml -> the cluster's config tree (deploy/config.py). Parsed here, at the edge.

    yaml key                          tree field
    model                             model
    router.host / port / metrics_port / http_port
                                      server.host / port / metrics_port / http_port
    router.policy                     router.policy
    router.admit_ttft_s               router.admit_ttft_s (serve's --admit-ttft, seconds; null = off)
    autoscaler.enabled / interval_s   pools.autoscaler
    prefill, decode: *_replicas       pools.prefill / pools.decode
      resources.threads               pools.<pool>.threads (resources.cpus must equal it: Ray CPUs per actor)
      resources.gpus                  engine.use_gpu (one value for both pools)
      autoscale.*                     pools.<pool>.autoscale
      quantization                    pools.<pool>.quantization (none | int8 | int4; null = the engine's)
      kv_tiers.*                      pools.<pool>.kv_tiers (host/disk KV cache tiers; null = the engine's)
      speculative                     pools.<pool>.speculative (ngram | off; null = the engine's)
      cpu_compile                     pools.<pool>.cpu_compile (true | false; null = the engine's)
      cpu_int8_rows                   pools.<pool>.cpu_int8_rows (>= 0; null = the engine's)
      dtype                           pools.<pool>.dtype (float32 | bfloat16 | float16; null = the engine's)
      kv_cache_dtype                  pools.<pool>.kv_cache_dtype (auto | int8 | fp8; null = the engine's)
      block_size                      pools.<pool>.block_size (both pools' must agree: no re-blocking)
      max_num_seqs                    pools.<pool>.max_num_seqs (max batch; null = the engine's)

A key the file leaves out keeps the value of the tree it is parsed onto (the flags' tree for
`serve --config`). Every error names the file, the line (from yaml.compose's node marks) and the
dotted key, and all errors of a file are reported at once: `PoolsConfigError.issues` is the list.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import yaml

from pdcluster.deploy.config import ClusterConfig, block_size_mismatch
from pdcluster.deploy.pool_config import SLO_KEY, AutoscaleConfig, PoolConfig, PoolTiers
from pdcluster.engine.config import DTYPE_BYTES, SPECULATIVE, TIER_CODECS, finite
from pdcluster.engine.kv_quant import KV_CACHE_DTYPES
from pdcluster.engine.quant.policy import QUANTIZATIONS
from pdcluster.router.autoscaler import FRACTION_SIGNALS, SIGNALS
from pdcluster.router.placement import POLICY_NAMES


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


NULL_TAG, BOOL_TAG = "tag:yaml.org,2002:null", "tag:yaml.org,2002:bool"


class _Reader:
    """Walks the composed node tree, converting scalars and recording issues with their lines."""

    def __init__(self):
        self.issues: list[Issue] = []
        self._construct = yaml.constructor.SafeConstructor()

    def fail(self, node: yaml.Node, key: str, message: str) -> None:
        self.issues.append(Issue(node.start_mark.line + 1, key, message))

    def mapping(self, node: yaml.Node, key: str, allowed: tuple[str, ...]) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """{name: (key node, value node)} of a mapping, flagging unknown and repeated keys. A null (`key:` with
        every child commented out, `key: null`) is an empty mapping: nothing set there."""
        if isinstance(node, yaml.ScalarNode) and node.tag == NULL_TAG:
            return {}
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
        try:
            v = self._construct.construct_object(vn, deep=True)
        except (yaml.YAMLError, ValueError) as e:      # an unknown or a mistyped tag (`!foo 3`, `!!int abc`)
            self.fail(vn, path, f"cannot read {vn.tag} {vn.value!r}: {str(e).splitlines()[0][:120]}")
            return _NO
        if vn.tag == BOOL_TAG and vn.value in getattr(check, "choices", ()):
            v = vn.value                                # YAML 1.1 reads a bare `off` (`speculative: off`) as False
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
        if not isinstance(v, (int, float)) or not finite(v):
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
    one_of.choices = choices
    return one_of


def _opt_one_of(choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    def opt_one_of(v):
        return None if v is None or v in choices else f"must be one of {', '.join(choices)} or null"
    opt_one_of.choices = choices
    return opt_one_of


def _opt(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    """`check`, or null (= the engine's value)."""
    def optional(v):
        return None if v is None else check(v)
    return optional


def _pick(v: Any, default: Any) -> Any:
    return default if v is _NO else v


POOL_KEYS = ("min_replicas", "max_replicas", "initial_replicas", "resources", "autoscale", "quantization",
             "speculative", "kv_tiers", "dtype", "kv_cache_dtype", "block_size", "max_num_seqs", "cpu_compile",
             "cpu_int8_rows")
TIER_KEYS = ("host_cache_gb", "disk_cache_dir", "disk_cache_gb", "tier_codec", "tier_layerwise", "tier_write_through")
AUTOSCALE_KEYS = ("signal", "target", "ttft_slo_ms", "tpot_slo_ms", "scale_up_above", "scale_down_below",
                  "upscale_delay_s", "downscale_delay_s", "max_step", "cooldown_s", "window_s")
RESOURCE_KEYS = ("cpus", "gpus", "threads")


def _pool(rd: _Reader, name: str, node: yaml.Node | None, parent: yaml.Node, base: ClusterConfig
          ) -> tuple[PoolConfig, dict[str, tuple[int, yaml.Node | None]]]:
    """The pool and its resources {key: (value, node or None when absent)}."""
    bp = base.pools.pool(name)
    m = rd.mapping(node, name, POOL_KEYS) if node is not None else {}
    # A key the file leaves out keeps the flags' value: --{pool}-workers is initial_replicas, and a bound
    # the file does not set is that (so `initial_replicas: 3` alone is a fixed pool of 3); a flag's count
    # outside the file's bounds starts at the nearer bound.
    init = _pick(rd.value(m, "initial_replicas", name, _int(1)), bp.initial_replicas)
    lo = _pick(rd.value(m, "min_replicas", name, _int(1)), bp.lo if bp.min_replicas is not None else init)
    hi = _pick(rd.value(m, "max_replicas", name, _int(1)), bp.hi if bp.max_replicas is not None else init)
    if "min_replicas" not in m and "max_replicas" in m:
        lo = min(lo, hi)
    if "max_replicas" not in m and "min_replicas" in m:
        hi = max(hi, lo)
    if "max_replicas" in m and hi < lo:
        rd.fail(m["max_replicas"][1], f"{name}.max_replicas", f"must be >= min_replicas ({lo}) (got {hi})")
    if "initial_replicas" not in m:
        init = min(max(init, lo), hi)
    elif not lo <= init <= hi:
        rd.fail(m["initial_replicas"][1], f"{name}.initial_replicas",
                f"must be in [min_replicas, max_replicas] = [{lo}, {hi}] (got {init})")

    key = f"{name}.resources"
    r = rd.mapping(m["resources"][1], key, RESOURCE_KEYS) if "resources" in m else {}
    threads = rd.value(r, "threads", key, _int(1), base.threads(name))     # _NO: invalid
    res = {"threads": threads, "cpus": rd.value(r, "cpus", key, _int(1), threads),
           "gpus": rd.value(r, "gpus", key, _int(0, 1), int(base.engine.use_gpu))}
    res = {k: (v, r[k][1] if k in r else None) for k, v in res.items()}

    key = f"{name}.autoscale"
    a = rd.mapping(m["autoscale"][1], key, AUTOSCALE_KEYS) if "autoscale" in m else {}
    b = bp.autoscale
    signal = _pick(rd.value(a, "signal", key, _one_of(SIGNALS[name])), b.signal)
    frac = signal in FRACTION_SIGNALS
    target = rd.value(a, "target", key, _num(0, 1 if frac else None, lo_open=True),
                      b.target if signal == b.signal else None)
    slo = {k: rd.value(a, k, key, _num(0, lo_open=True), getattr(b, k)) for k in SLO_KEY.values()}
    for k in slo:
        if k in a and SLO_KEY.get(SIGNALS[name][1]) != k:
            rd.fail(a[k][0], f"{key}.{k}", f"not a {name} knob (the {name} latency target is "
                                           f"{SLO_KEY[SIGNALS[name][1]]})")
    need = SLO_KEY.get(signal, "target")
    have = target if need == "target" else slo[need]
    if have is None and signal in SIGNALS[name]:
        where = a["signal"][1] if "signal" in a else (m["autoscale"][1] if "autoscale" in m else (node or parent))
        rd.fail(where, f"{key}.{need}", f"required when signal is {signal}")
    up = _pick(rd.value(a, "scale_up_above", key, _num(0, lo_open=True)), b.scale_up_above)
    down = _pick(rd.value(a, "scale_down_below", key, _num(0, lo_open=True)), b.scale_down_below)
    if down >= up and ("scale_down_below" in a or "scale_up_above" in a):
        k = "scale_down_below" if "scale_down_below" in a else "scale_up_above"
        rd.fail(a[k][1], f"{key}.{k}", f"need scale_down_below < scale_up_above (got {down} and {up})")
    if signal == "kv_utilization" and isinstance(target, (int, float)) and target * up >= 1:
        where = a["target"][1] if "target" in a else (a["scale_up_above"][1] if "scale_up_above" in a else
                                                      (m["autoscale"][1] if "autoscale" in m else (node or parent)))
        rd.fail(where, f"{key}.target", f"target x scale_up_above = {target * up:g}: kv_utilization never exceeds "
                                        "1, so the pool could never scale up (need target x scale_up_above < 1)")
    auto = AutoscaleConfig(
        signal=signal, target=_pick(target, None), ttft_slo_ms=_pick(slo["ttft_slo_ms"], None),
        tpot_slo_ms=_pick(slo["tpot_slo_ms"], None), scale_up_above=up, scale_down_below=down,
        upscale_delay_s=_pick(rd.value(a, "upscale_delay_s", key, _num(0)), b.upscale_delay_s),
        downscale_delay_s=_pick(rd.value(a, "downscale_delay_s", key, _num(0)), b.downscale_delay_s),
        max_step=_pick(rd.value(a, "max_step", key, _int(1)), b.max_step),
        cooldown_s=_pick(rd.value(a, "cooldown_s", key, _num(0)), b.cooldown_s),
        window_s=_pick(rd.value(a, "window_s", key, _num(0, lo_open=True)), b.window_s))
    quant = _pick(rd.value(m, "quantization", name, _opt_one_of(QUANTIZATIONS)), bp.quantization)
    tuning = dict(
        dtype=_pick(rd.value(m, "dtype", name, _opt_one_of(tuple(DTYPE_BYTES))), bp.dtype),
        kv_cache_dtype=_pick(rd.value(m, "kv_cache_dtype", name, _opt_one_of(KV_CACHE_DTYPES)), bp.kv_cache_dtype),
        block_size=_pick(rd.value(m, "block_size", name, _opt(_int(1, 1024))), bp.block_size),
        max_num_seqs=_pick(rd.value(m, "max_num_seqs", name, _opt(_int(1))), bp.max_num_seqs),
        threads=_pick(threads, bp.threads) if "threads" in r else bp.threads,
        speculative=_pick(rd.value(m, "speculative", name, _opt_one_of(SPECULATIVE)), bp.speculative),
        cpu_compile=_pick(rd.value(m, "cpu_compile", name, _opt(_bool)), bp.cpu_compile),
        cpu_int8_rows=_pick(rd.value(m, "cpu_int8_rows", name, _opt(_int(0))), bp.cpu_int8_rows))
    return replace(bp, autoscale=auto, initial_replicas=init, min_replicas=lo, max_replicas=hi,
                   quantization=quant, kv_tiers=_tiers(rd, name, m, bp.kv_tiers, base, node or parent),
                   **tuning), res


def _tiers(rd: _Reader, name: str, m: dict, base: PoolTiers, tree: ClusterConfig, where: yaml.Node) -> PoolTiers:
    """pools.<pool>.kv_tiers: the pool's KV cache tiers (null or absent: the engine's)."""
    key = f"{name}.kv_tiers"
    t = rd.mapping(m["kv_tiers"][1], key, TIER_KEYS) if "kv_tiers" in m else {}
    gb = lambda v: None if v is None else _num(0)(v)      # noqa: E731
    out = PoolTiers(host_cache_gb=_pick(rd.value(t, "host_cache_gb", key, gb), base.host_cache_gb),
                    disk_cache_dir=_pick(rd.value(t, "disk_cache_dir", key, _opt_str), base.disk_cache_dir),
                    disk_cache_gb=_pick(rd.value(t, "disk_cache_gb", key, gb), base.disk_cache_gb),
                    tier_codec=_pick(rd.value(t, "tier_codec", key, _opt_one_of(TIER_CODECS)), base.tier_codec),
                    tier_layerwise=_pick(rd.value(t, "tier_layerwise", key, _opt(_bool)), base.tier_layerwise),
                    tier_write_through=_pick(rd.value(t, "tier_write_through", key, _opt(_bool)),
                                             base.tier_write_through))
    cache = vars(tree.engine.cache) | out.overrides()
    if (cache["disk_cache_gb"] > 0) != bool(cache["disk_cache_dir"]):
        rd.fail(m["kv_tiers"][1] if "kv_tiers" in m else where, key,
                "the disk tier needs both disk_cache_dir and disk_cache_gb > 0 (here or by the flags)")
    return out


def _one_size(rd: _Reader, res: dict[str, dict]) -> None:
    """The tree gives both pools one use_gpu and reserves `threads` Ray CPUs per actor: per-pool
    values it cannot express are errors, not silently dropped. A value that differs from the
    base's comes from the file, so each issue has a node."""
    for k in ("gpus",):
        (p, pn), (d, dn) = res["prefill"][k], res["decode"][k]
        if p != d and _NO not in (p, d):        # an invalid value has its own issue
            rd.fail(dn or pn, f"{'decode' if dn else 'prefill'}.resources.{k}",
                    f"{k}: prefill {p} != decode {d} (one size for both pools)")
    for name in ("prefill", "decode"):
        (c, cn), (t, tn) = res[name]["cpus"], res[name]["threads"]
        if c != t and _NO not in (c, t):
            rd.fail(cn or tn, f"{name}.resources.cpus",
                    f"{name}: resources.cpus ({c}) != resources.threads ({t}) (Ray CPUs per actor = threads)")


def _one_block_size(rd: _Reader, top: dict, pools: dict[str, PoolConfig], base: ClusterConfig) -> None:
    """Both pools' effective KV block sizes agree (blocks ship as they are: no re-blocking)."""
    size = {n: base.engine.cache.block_size if p.block_size is None else p.block_size for n, p in pools.items()}
    if size["prefill"] == size["decode"]:
        return
    for n in ("decode", "prefill"):     # the node of a pool that sets it
        m = top[n][1] if n in top else None
        if isinstance(m, yaml.MappingNode):
            for kn, vn in m.value:
                if getattr(kn, "value", None) == "block_size":
                    rd.fail(vn, f"{n}.block_size", block_size_mismatch(size["prefill"], size["decode"]))
                    return


def parse_pools_config(text: str, source: str = "<string>", base: ClusterConfig | None = None) -> ClusterConfig:
    """`base` (default: ClusterConfig()) with what the file sets; raises PoolsConfigError with every issue."""
    base = base or ClusterConfig()
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise PoolsConfigError(source, [Issue(mark.line + 1 if mark else 1, "(syntax)", str(e.problem))]) from None
    except yaml.reader.ReaderError as e:                # a character YAML does not allow (NUL, form feed, ...)
        line = text[:e.position].count("\n") + 1 if isinstance(e.position, int) else 1
        raise PoolsConfigError(source, [Issue(line, "(syntax)", f"character #x{e.character:04x} is not allowed "
                                                               "in YAML")]) from None
    except RecursionError:                              # nested past the parser's stack
        raise PoolsConfigError(source, [Issue(1, "(syntax)", "nested too deeply")]) from None
    if root is None or (isinstance(root, yaml.ScalarNode) and root.tag == NULL_TAG):    # (a lone `~` or null too)
        raise PoolsConfigError(source, [Issue(1, "(top level)", "the file is empty")])
    rd = _Reader()
    top = rd.mapping(root, "", ("model", "router", "autoscaler", "prefill", "decode"))
    model = _pick(rd.value(top, "model", "", _opt_str), None)
    model = base.model if model is None else model      # null or absent: serve's --model (default: the embedded)
    r = rd.mapping(top["router"][1], "router", ("host", "port", "policy", "metrics_port", "http_port", "admit_ttft_s",
                                                "tpot_slo_s")) if "router" in top else {}
    s = base.server
    server = replace(s, host=_pick(rd.value(r, "host", "router", _str), s.host),
                     port=_pick(rd.value(r, "port", "router", _int(0, 65535)), s.port),
                     metrics_port=_pick(rd.value(r, "metrics_port", "router", _int(0, 65535)), s.metrics_port),
                     http_port=_pick(rd.value(r, "http_port", "router", _int(0, 65535)), s.http_port))
    policy = _pick(rd.value(r, "policy", "router", _one_of(POLICY_NAMES)), base.router.policy)
    admit = _pick(rd.value(r, "admit_ttft_s", "router", _opt(_num(0, lo_open=True))), base.router.admit_ttft_s)
    admit = None if admit is None else float(admit)
    tpot = _pick(rd.value(r, "tpot_slo_s", "router", _opt(_num(0, lo_open=True))), base.cost.tpot_slo_s)
    tpot = None if tpot is None else float(tpot)        # null: no TPOT guard (the cost model's)
    lp = rd.mapping(top["autoscaler"][1], "autoscaler", ("enabled", "interval_s")) if "autoscaler" in top else {}
    bl = base.pools.autoscaler
    loop = replace(bl, enabled=_pick(rd.value(lp, "enabled", "autoscaler", _bool), bl.enabled),
                   interval_s=_pick(rd.value(lp, "interval_s", "autoscaler", _num(0, lo_open=True)), bl.interval_s))
    pools, res = {}, {}
    for n in ("prefill", "decode"):
        pools[n], res[n] = _pool(rd, n, top[n][1] if n in top else None, root, base)
    _one_size(rd, res)
    _one_block_size(rd, top, pools, base)
    if rd.issues:
        raise PoolsConfigError(source, rd.issues)
    return replace(base, model=model, server=server, router=replace(base.router, policy=policy, admit_ttft_s=admit),
                   cost=replace(base.cost, tpot_slo_s=tpot),
                   pools=replace(base.pools, autoscaler=loop, **pools),
                   engine=replace(base.engine, use_gpu=res["prefill"]["gpus"][0] > 0))


def load_pools_config(path: str | Path, base: ClusterConfig | None = None) -> ClusterConfig:
    """Parse and validate a pools file onto `base`; raises PoolsConfigError naming file, line and key."""
    return parse_pools_config(Path(path).read_text(), str(path), base)
