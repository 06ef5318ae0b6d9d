"""`pdcluster plan`: size the prefill and decode pools (and TP per pool) for a trace with the simulator.

Search, per (prefill TP, decode TP) the model fits: start from the pools' lower bounds (the trace's
prefill work at 80% busy; the decode KV that Little's law asks for), simulate, and grow the pool the
failures point at (requests waiting in the router for decode KV, or TPOT misses: decode; TTFT
misses: prefill) until the SLO attainment target holds (or the budget / size cap stops it), then
try one instance fewer in each pool. Each candidate is a full Simulator run (the router's own
cost-model placement). Best: the most SLO-meeting requests per dollar among those that hold the
target within the budget; none holds it: the most goodput within the budget.
Output: a table of every candidate, the best, and a pools.yaml that `pdcluster serve --config` reads.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass

from pdcluster.sim.cluster import PoolSpec, SimConfig, Simulator
from pdcluster.sim.hardware import hardware
from pdcluster.sim.models import model as model_profile
from pdcluster.sim.roofline import Roofline
from pdcluster.sim.trace import load_trace
from pdcluster.sim.validate import CASES as VALIDATE_CASES

TPS = (1, 2, 4, 8)


def parse_slo(text: str) -> tuple[float, float]:
    """"ttft:2000,tpot:50" (milliseconds) -> (ttft seconds, tpot seconds); both keys required."""
    got = {}
    for part in text.split(","):
        k, sep, v = part.partition(":")
        k = k.strip().lower()
        if not sep or k not in ("ttft", "tpot") or k in got:
            raise ValueError(f"--slo wants ttft:MS,tpot:MS (each once), got {text!r}")
        try:
            got[k] = float(v)
        except ValueError:
            raise ValueError(f"--slo: {k} must be a number of milliseconds, got {v!r}") from None
        if not got[k] > 0:
            raise ValueError(f"--slo: {k} must be > 0 ms")
    if set(got) != {"ttft", "tpot"}:
        raise ValueError(f"--slo wants both ttft and tpot, got {text!r}")
    return got["ttft"] / 1e3, got["tpot"] / 1e3


@dataclass
class Candidate:
    n_prefill: int
    tp_prefill: int
    n_decode: int
    tp_decode: int
    summary: dict

    @property
    def dollars_per_h(self) -> float:
        return self.summary["dollars_per_h"]

    @property
    def per_dollar(self) -> float:
        return self.summary["goodput_rps"] * 3600 / self.dollars_per_h if self.dollars_per_h else math.inf

    def label(self, hw_p: str, hw_d: str) -> str:
        return f"{self.n_prefill} x {hw_p} TP{self.tp_prefill} + {self.n_decode} x {hw_d} TP{self.tp_decode}"


def fitting_tps(model: str, hw: str, limit: int = 2) -> list[int]:
    """The smallest `limit` TP degrees the model fits at."""
    out = []
    for tp in TPS:
        try:
            Roofline(model_profile(model), hardware(hw), tp)
        except ValueError:
            continue
        out.append(tp)
    return out[:limit]


def search(reqs, model: str, hw_p: str, hw_d: str, slo: tuple[float, float], budget: float | None = None,
           attain: float = 0.9, max_instances: int = 64, policy: str = "cost-model", progress: bool = False,
           log=print, host_cache_gb: float = 0.0, disk_cache_gb: float = 0.0,
           admit_ttft_s: float | None = None) -> list[Candidate]:
    """host_cache_gb / disk_cache_gb: GiB of KV cache tiers per instance of both pools (sim/tiers.py);
    admit_ttft_s: the router refuses a request expected past this TTFT (RouterConfig.admit_ttft_s)."""
    span = max(r.arrival_s for r in reqs) or 1.0
    out: list[Candidate] = []
    seen = {}

    def run(np_, tpp, nd, tpd) -> Candidate:
        key = (np_, tpp, nd, tpd)
        if key not in seen:
            tiers = dict(host_cache_gb=host_cache_gb, disk_cache_gb=disk_cache_gb)
            cfg = SimConfig(model, prefill=PoolSpec(hw_p, np_, tpp, **tiers), decode=PoolSpec(hw_d, nd, tpd, **tiers),
                            policy=policy, slo_ttft_s=slo[0], slo_tpot_s=slo[1], admit_ttft_s=admit_ttft_s)
            res = Simulator(cfg, reqs, progress=progress).run()
            s = res.summary()
            ttft_miss = sum(1 for r in res.records if r.ttft_s is None or r.ttft_s > slo[0])
            tpot_miss = sum(1 for r in res.records if r.tpot_s is not None and r.tpot_s > slo[1])
            s["ttft_miss"], s["tpot_miss"] = ttft_miss, tpot_miss
            c = seen[key] = Candidate(np_, tpp, nd, tpd, s)
            out.append(c)
            log(f"  {c.label(hw_p, hw_d)}: attainment {s['attainment']:.3f}, goodput {s['goodput_rps']:.3f} req/s, "
                f"${s['dollars_per_h']:.2f}/h")
        return seen[key]

    n_req = len(reqs)
    for tpp in fitting_tps(model, hw_p):
        rp = Roofline(model_profile(model), hardware(hw_p), tpp)
        work = sum(rp.prefill_s([(r.input_len, 0)]) for r in reqs) / span       # busy instances
        for tpd in fitting_tps(model, hw_d):
            rd = Roofline(model_profile(model), hardware(hw_d), tpd)
            step = rd.decode_s(32, 32 * sum(r.input_len for r in reqs) / n_req)
            kv = n_req / span * sum(r.output_len * step for r in reqs) / n_req * \
                sum(r.input_len + r.output_len for r in reqs) / n_req      # Little: concurrent KV tokens
            np_, nd = max(1, math.ceil(work / 0.8)), max(1, math.ceil(kv / (0.7 * rd.capacity_tokens)))
            c = None
            for _ in range(12):
                if np_ + nd > max_instances:
                    break
                c = run(np_, tpp, nd, tpd)
                if budget is not None and c.dollars_per_h > budget:
                    break
                s = c.summary
                if s["attainment"] >= attain:
                    for dn, dd in ((1, 0), (0, 1)):           # one fewer in a pool, if it still holds
                        if np_ - dn >= 1 and nd - dd >= 1:
                            run(np_ - dn, tpp, nd - dd, tpd)
                    break
                if s["router_waits"] > 0.01 * n_req or s["tpot_miss"] > s["ttft_miss"]:
                    nd += max(1, nd // 4)
                else:
                    np_ += max(1, np_ // 4)
    return out


def best(cands: list[Candidate], attain: float, budget: float | None) -> Candidate | None:
    ok = [c for c in cands if budget is None or c.dollars_per_h <= budget]
    good = [c for c in ok if c.summary["attainment"] >= attain]
    if good:
        return max(good, key=lambda c: (c.per_dollar, c.summary["goodput_rps"]))
    return max(ok, key=lambda c: c.summary["goodput_rps"], default=None)


def pools_yaml(c: Candidate, a, hw_p: str, hw_d: str, slo: tuple[float, float]) -> str:
    s = c.summary
    return f"""# pdcluster plan --trace {a.trace} --model {a.model} --prefill-hw {a.prefill_hw} --decode-hw {a.decode_hw} --slo {a.slo}
# best: {c.label(hw_p, hw_d)}, ${s['dollars_per_h']:.2f}/h
# predicted (sim/, {s['requests']} requests): goodput {s['goodput_rps']:.3f} req/s, SLO attainment {s['attainment']:.3f},
#   TTFT p50 {s['ttft_p50']:.3f} s p90 {s['ttft_p90']:.3f} s, TPOT p50 {s['tpot_p50'] * 1e3:.1f} ms p90 {s['tpot_p90'] * 1e3:.1f} ms
# Not expressible here yet: tensor parallel per pool (prefill TP{c.tp_prefill}, decode TP{c.tp_decode}: one
# replica = one device in this file) and the model ({a.model}: set `model:` to its weights on every node).
router:
  policy: cost-model
  tpot_slo_s: {slo[1]:g}          # the cost model's TPOT guard, as simulated
{admit_yaml(a)}prefill:
  min_replicas: {c.n_prefill}
  max_replicas: {c.n_prefill}
  initial_replicas: {c.n_prefill}
{kv_tiers_yaml(a)}  autoscale:                # takes effect when max_replicas is raised
    signal: p90_ttft
    ttft_slo_ms: {slo[0] * 1e3:g}
decode:
  min_replicas: {c.n_decode}
  max_replicas: {c.n_decode}
  initial_replicas: {c.n_decode}
{kv_tiers_yaml(a)}  autoscale:
    signal: p90_tpot
    tpot_slo_ms: {slo[1] * 1e3:g}
"""


def admit_yaml(a) -> str:
    """pools.yaml's router.admit_ttft_s for --admit-ttft ('' when off)."""
    if not a.admit_ttft:
        return ""
    return f"  admit_ttft_s: {a.admit_ttft:g}          # refuse a request expected past this TTFT, as simulated\n"


def kv_tiers_yaml(a) -> str:
    """pools.yaml's kv_tiers block for --host-cache-gb / --disk-cache-gb ('' when both are 0)."""
    if not (a.host_cache_gb or a.disk_cache_gb):
        return ""
    disk = (f"    disk_cache_dir: /var/tmp/pdcluster-kv   # a local NVMe directory\n"
            f"    disk_cache_gb: {a.disk_cache_gb:g}\n") if a.disk_cache_gb else ""
    return f"  kv_tiers:                 # GiB per worker, as simulated\n    host_cache_gb: {a.host_cache_gb:g}\n{disk}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", default=None, help="a Mooncake-format trace (JSON lines: timestamp ms, "
                                                 "input_length, output_length, hash_ids); required unless "
                                                 "--validate (there: the slice's trace, default $PDCLUSTER_TRACE "
                                                 "or ../shared/traces/conversation_trace.jsonl)")
    p.add_argument("--model", default=None, help="model profile (sim/models.py), case-insensitive; required "
                                                 "unless --validate (the local cluster serves SmolLM2-135M)")
    p.add_argument("--prefill-hw", default="H200", help="prefill pool hardware (sim/hardware.py), case-insensitive")
    p.add_argument("--decode-hw", default="H20", help="decode pool hardware, case-insensitive")
    p.add_argument("--slo", default="ttft:2000,tpot:50", help="TTFT and mean TPOT targets, milliseconds")
    p.add_argument("--attain", type=float, default=0.9, help="fraction of requests that must meet the SLO")
    p.add_argument("--budget", type=float, default=None, help="most dollars per hour (default: no limit)")
    p.add_argument("--duration-s", type=float, default=None,
                   help="use the trace's first this many seconds (default: all of it)")
    p.add_argument("--rate-scale", type=float, default=1.0, help="arrival rate multiplier")
    p.add_argument("--max-instances", type=int, default=64, help="largest fleet (both pools) tried")
    p.add_argument("--host-cache-gb", type=float, default=0.0,
                   help="GiB of host-memory KV cache tier per instance, both pools (0: none); written to pools.yaml")
    p.add_argument("--disk-cache-gb", type=float, default=0.0,
                   help="GiB of disk KV cache tier per instance, both pools (0: none); written to pools.yaml")
    p.add_argument("--admit-ttft", type=float, default=0.0,
                   help="size the fleet for a router that refuses a request expected past this many seconds to "
                        "its first token (serve's --admit-ttft; refused requests count as misses); 0: off")
    p.add_argument("--out", default=None, help="write the best configuration as a pools.yaml here")
    p.add_argument("--validate", action="store_true",
                   help="instead of planning: run a scaled trace slice (and other --validate-cases) on a cluster "
                        "started here and print the simulator's predicted against the measured mean and p90 "
                        "TTFT/TPOT (bench/sim_validate.py); exit 1 when a mean is off by more than 25%%")
    v = p.add_argument_group("--validate")
    v.add_argument("--validate-cases", nargs="+", choices=VALIDATE_CASES, default=["disagg-trace"],
                   help="disagg-trace: 1 prefill + 1 decode worker on the trace slice; colocated: 2 colocated "
                        "workers, mixed prompts; prefix-routing: 2 workers, shared prefixes, cost-model")
    v.add_argument("--validate-max-requests", type=int, default=16, help="requests of the trace slice")
    v.add_argument("--validate-time-scale", type=float, default=0.4, help="replay seconds per trace second")
    v.add_argument("--validate-prefix-prompts", type=int, default=6, help="prefix-routing: prompts per prefix")
    v.add_argument("--validate-json", default=None, help="write the probe, the fit and the comparisons here")
    p.add_argument("--progress", action="store_true", help="a tqdm bar per simulation")


def main(a) -> int:
    if a.validate:
        from pdcluster.bench.sim_validate import validate
        from pdcluster.sim.validate import LOCAL_MODEL
        if a.model and a.model.lower() != LOCAL_MODEL.lower():
            print(f"error: --validate runs the local cluster's model ({LOCAL_MODEL}, the embedded one); "
                  f"leave --model out", file=sys.stderr)
            return 2
        return validate(a.validate_cases, a.trace, a.validate_max_requests, a.validate_time_scale,
                        a.validate_prefix_prompts, None, a.validate_json, progress=a.progress)
    try:
        if not a.trace or not a.model:
            raise ValueError("plan needs --trace and --model (or --validate)")
        slo = parse_slo(a.slo)
        hw_p, hw_d = hardware(a.prefill_hw).name, hardware(a.decode_hw).name
        model_profile(a.model)
        for flag in ("attain", "budget", "host_cache_gb", "disk_cache_gb", "admit_ttft", "rate_scale", "duration_s"):
            v = getattr(a, flag)
            if v is not None and not math.isfinite(v):      # (nan passed every range check below)
                raise ValueError(f"--{flag.replace('_', '-')} must be a finite number, got {v}")
        if a.out and not os.access(os.path.dirname(os.path.abspath(a.out)), os.W_OK):
            raise ValueError(f"--out {a.out}: its directory does not exist or is not writable")  # (before the search)
        if not 0 < a.attain <= 1:
            raise ValueError("--attain must be in (0, 1]")
        if a.budget is not None and a.budget <= 0:
            raise ValueError("--budget must be > 0 dollars per hour")
        if a.host_cache_gb < 0 or a.disk_cache_gb < 0:
            raise ValueError("--host-cache-gb and --disk-cache-gb must be >= 0")
        if a.admit_ttft < 0:
            raise ValueError("--admit-ttft must be >= 0 seconds (0: off)")
        if a.max_instances < 2:
            raise ValueError(f"--max-instances must be >= 2 (one instance per pool), got {a.max_instances}")
        reqs = load_trace(a.trace, duration_s=a.duration_s, rate_scale=a.rate_scale)
        if not reqs:
            raise ValueError(f"{a.trace}: no requests")
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"planning {a.model} on {hw_p} prefill + {hw_d} decode for {len(reqs)} requests "
          f"(SLO TTFT {slo[0] * 1e3:g} ms, TPOT {slo[1] * 1e3:g} ms, attainment >= {a.attain:.0%}"
          f"{f', budget ${a.budget:g}/h' if a.budget else ''}"
          f"{f', --admit-ttft {a.admit_ttft:g}' if a.admit_ttft else ''})")
    cands = search(reqs, a.model, hw_p, hw_d, slo, a.budget, a.attain, a.max_instances, progress=a.progress,
                   host_cache_gb=a.host_cache_gb, disk_cache_gb=a.disk_cache_gb, admit_ttft_s=a.admit_ttft or None)
    b = best(cands, a.attain, a.budget)
    if b is None:
        print(f"error: no configuration of at most {a.max_instances} instances"
              f"{f' fits the budget (${a.budget:g}/h)' if a.budget else ' was found'}", file=sys.stderr)
        return 1
    s = b.summary
    print(f"\nbest: {b.label(hw_p, hw_d)} at ${s['dollars_per_h']:.2f}/h: predicted goodput {s['goodput_rps']:.3f} req/s "
          f"({b.per_dollar:.0f} SLO-meeting requests per $), attainment {s['attainment']:.3f}, "
          f"TTFT p90 {s['ttft_p90']:.2f} s, TPOT p90 {s['tpot_p90'] * 1e3:.1f} ms"
          + ("" if s["attainment"] >= a.attain else f"  (below the {a.attain:.0%} target: the budget or size cap binds)"))
    if a.out:
        with open(a.out, "w") as f:
            f.write(pools_yaml(b, a, hw_p, hw_d, slo))
        print(f"wrote {a.out}")
    return 0
