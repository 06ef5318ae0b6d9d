"""Fleet studies with the simulator (issue 20, point 3) on a Mooncake trace; tables + plots.

    a  homogeneous PD vs PrfaaS-style heterogeneous (H200 prefill in one datacenter, H20 decode in
       another, a 100 Gb/s link between them, selective offload): the most goodput at >= --attain
       SLO attainment over a sweep of arrival-rate scales, per dollar
    b  placement policies at equal hardware by goodput at the TTFT/TPOT SLO
    b' the cost model's KV-full fallback variants (CostConfig.kv_full_fallback, place_wait_s) on b's fleet
    c  the pool autoscaler over the hour with a time-varying arrival rate: SLO attainment and
       GPU-hours against the smallest static fleet that holds the same attainment
Every run is sim.cluster.Simulator: the router's own policies, prefix index and autoscaler.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace

from pdcluster.router.autoscaler import ScalingRule
from pdcluster.sim.cluster import PoolSpec, SimConfig, Simulator, Topology
from pdcluster.sim.trace import load_trace, warp

TRACE = "/work/shared/traces/conversation_trace.jsonl"


def table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows])


def simulate(cfg: SimConfig, reqs, progress: bool) -> dict:
    t0 = time.perf_counter()
    s = Simulator(cfg, reqs, progress=progress).run().summary()
    s["wall_s"] = time.perf_counter() - t0
    return s


# (a) heterogeneous vs homogeneous
def fleets_a(a) -> dict[str, SimConfig]:
    base = dict(model=a.model, slo_ttft_s=a.slo_ttft_ms / 1e3, slo_tpot_s=a.slo_tpot_ms / 1e3,
                topology=Topology(cross_zone_bps=a.link_gbps * 1e9 / 8, cross_zone_latency_s=0.005))
    het = dict(prefill=PoolSpec("H200", 2, tp=2, zone="dc-prefill"), decode=PoolSpec("H20", 3, zone="dc-local"))
    return {
        "homogeneous H200 PD (2P TP2 + 2D)": SimConfig(prefill=PoolSpec("H200", 2, tp=2), decode=PoolSpec("H200", 2),
                                                      policy="cost-model", **base),
        "homogeneous H20 PD (4P TP4 + 3D)": SimConfig(prefill=PoolSpec("H20", 4, tp=4), decode=PoolSpec("H20", 3),
                                                     policy="cost-model", **base),
        "heterogeneous, all offloaded": SimConfig(policy="least-loaded", **het, **base),
        "PrfaaS threshold (offload > 8k tok)": SimConfig(policy="least-loaded", local_prefill_max_tokens=8192,
                                                         **het, **base),
        "PrfaaS cost-model (selective)": SimConfig(policy="cost-model", **het, **base),
    }


def study_a(a, reqs_at) -> dict:
    out = {}
    for name, cfg in fleets_a(a).items():
        rows = []
        for rate in a.rates:
            s = simulate(cfg, reqs_at(rate), a.progress)
            rows.append(dict(rate=rate, **s))
            print(f"  a | {name} x{rate}: attainment {s['attainment']:.3f} goodput {s['goodput_rps']:.2f} req/s "
                  f"local {s['local_share']:.2f} ({s['wall_s']:.0f}s)", flush=True)
            if s["attainment"] < 0.5:
                break
        ok = [r for r in rows if r["attainment"] >= a.attain]
        best = max(ok, key=lambda r: r["goodput_rps"]) if ok else None
        dph = rows[0]["dollars_per_h"]
        out[name] = dict(rows=rows, dollars_per_h=dph, best_rate=best["rate"] if best else None,
                         goodput_at_slo=best["goodput_rps"] if best else 0.0,
                         per_dollar=(best["goodput_rps"] * 3600 / dph) if best else 0.0)
    homo = max(v["per_dollar"] for k, v in out.items() if k.startswith("homogeneous"))
    print(f"\n(a) goodput at >= {a.attain:.0%} SLO attainment (TTFT {a.slo_ttft_ms:g} ms, TPOT {a.slo_tpot_ms:g} ms), "
          f"rates x{a.rates}; per dollar = SLO-meeting requests per $")
    print(table(["fleet", "$/h", "best rate", "goodput req/s", "req per $", "vs best homogeneous"],
                [[k, v["dollars_per_h"], v["best_rate"] or "-", v["goodput_at_slo"], v["per_dollar"],
                  f"{v['per_dollar'] / homo:.2f}x" if homo else "-"] for k, v in out.items()]))
    print(table(["fleet"] + [f"x{r} SLO-meeting req per $" for r in a.rates],
                [[k] + [r["goodput_rps"] * 3600 / v["dollars_per_h"] for r in v["rows"]]
                 + [""] * (len(a.rates) - len(v["rows"])) for k, v in out.items()]))
    print(table(["fleet"] + [f"x{r} attain / ttft p90 s / local" for r in a.rates],
                [[k] + [f"{r['attainment']:.2f} / {r['ttft_p90']:.2f} / {r['local_share']:.2f}" for r in v["rows"]]
                 + [""] * (len(a.rates) - len(v["rows"])) for k, v in out.items()]))
    return out


def study_a_explain(a, reqs_at) -> dict:
    """What the heterogeneous fleet lacks: the cross-DC link's bandwidth (100 -> 400 -> 1600 Gb/s), or the
    compute the homogeneous fleet's H200 decode instances lend to short prompts (local prefill off)."""
    fl = fleets_a(a)
    het, homo = fl["PrfaaS cost-model (selective)"], fl["homogeneous H200 PD (2P TP2 + 2D)"]
    variants = {f"heterogeneous cost-model, {g:g} Gb/s link": replace(het, topology=replace(het.topology,
                                                                                          cross_zone_bps=g * 1e9 / 8))
                for g in (100.0, 400.0, 1600.0)}
    variants["homogeneous H200, local prefill off"] = replace(homo, cost_overrides=(("allow_local", False),))
    variants["homogeneous H200 (local prefill on)"] = homo
    out, rows = {}, []
    for name, cfg in variants.items():
        for rate in a.explain_rates:
            res = Simulator(cfg, reqs_at(rate), progress=a.progress).run()
            s = res.summary()
            link = sum(res.link_bytes.values()) / cfg.topology.cross_zone_bps / s["end_s"] if res.link_bytes else 0.0
            out[f"{name} x{rate}"] = s | {"link_busy": link}
            rows.append([name, rate, s["attainment"], s["goodput_rps"], s["ttft_p90"], s["local_share"], link])
            print(f"  a' | {name} x{rate}: attainment {s['attainment']:.3f}", flush=True)
    print("\n(a') why: the link, or the decode GPUs' spare compute")
    print(table(["fleet", "rate", "attainment", "goodput req/s", "TTFT p90 s", "local", "cross-DC link busy"], rows))
    return out


# (c) autoscaling
def study_c(a, reqs_base) -> dict:
    prof = [(0, 0.5), (900, 0.5), (1500, a.c_peak), (2100, a.c_peak), (2700, 0.5), (3600, 0.5)]
    reqs = warp(reqs_base, prof)
    slo = dict(slo_ttft_s=a.slo_ttft_ms / 1e3, slo_tpot_s=a.slo_tpot_ms / 1e3)
    dec = PoolSpec("H20", a.c_decode)
    out = {"profile": prof, "static": {}, "args_min": a.c_auto_min}
    slo = slo | dict(policy=a.c_policies[0])
    need = None
    given = a.c_static_fleet if a.c_static else None
    if given:                   # a fleet an earlier search found: simulate only it
        need = given[0]
        s = simulate(SimConfig(a.model, prefill=PoolSpec("H200", need, tp=2), decode=PoolSpec("H20", given[1]),
                               **slo), reqs, a.progress)
        out["static"][given] = s
        print(f"  c | static {need} P + {given[1]} D (--c-static): attainment {s['attainment']:.3f} "
              f"GPU-h {s['gpu_hours']:.1f}", flush=True)
    for n in range(a.c_min, a.c_max + 1) if not given else ():
        s = simulate(SimConfig(a.model, prefill=PoolSpec("H200", n, tp=2), decode=dec, **slo), reqs, a.progress)
        out["static"][(n, a.c_decode)] = s
        print(f"  c | static {n} x H200 TP2 prefill + {a.c_decode} H20 decode: attainment {s['attainment']:.3f} "
              f"GPU-h {s['gpu_hours']:.1f} ({s['wall_s']:.0f}s)", flush=True)
        if s["attainment"] >= a.c_attain:
            need = n
            break
    top = need or a.c_max
    n_dec = given[1] if given else a.c_decode
    if need and not given:      # then the fewest decode instances that still hold it (the static fleet is both pools)
        for nd in range(a.c_decode - 1, 0, -1):
            s = simulate(SimConfig(a.model, prefill=PoolSpec("H200", need, tp=2), decode=PoolSpec("H20", nd), **slo),
                         reqs, a.progress)
            print(f"  c | static {need} x H200 TP2 prefill + {nd} H20 decode: attainment {s['attainment']:.3f} "
                  f"GPU-h {s['gpu_hours']:.1f} ({s['wall_s']:.0f}s)", flush=True)
            if s["attainment"] < a.c_attain:
                break
            n_dec = nd
            out["static"][(need, nd)] = s
    out["static_best"] = [top, n_dec]
    d_min = out["decode_min"] = a.c_auto_min if a.c_decode_min is None else a.c_decode_min
    util = a.c_signal == "prefill_utilization"
    p_kw = dict(window_s=a.c_window_s, down_ratio=a.c_util_down_ratio) if util else {}
    rules = (("prefill", ScalingRule(a.c_signal, a.c_util_target if util else a.c_target, min_replicas=a.c_auto_min,
                                     max_replicas=top, upscale_delay_s=a.c_up_delay, downscale_delay_s=a.c_down_delay,
                                     max_step=2, cooldown_s=a.c_cooldown, **p_kw)),
             ("decode", ScalingRule(a.c_decode_signal, a.c_kv_target if a.c_decode_signal == "kv_utilization"
                                    else a.c_tpot_target_ms, min_replicas=d_min,
                                    max_replicas=a.c_decode, upscale_delay_s=a.c_up_delay,
                                    downscale_delay_s=a.c_down_delay, max_step=2, cooldown_s=a.c_cooldown)))
    out["rules"] = {p: vars(r) for p, r in rules}
    st = out["static"][(top, n_dec)]
    rows = [[f"static ({top} P + {n_dec} D), {a.c_policies[0]}", st["attainment"], st["gpu_hours"], "1.00x",
             st["ttft_p90"], st["tpot_p90"] * 1e3, st["local_share"], 0]]
    out["autoscaled"] = {}
    for pol in a.c_policies:
        cfg = SimConfig(a.model, prefill=PoolSpec("H200", a.c_auto_min, tp=2, min_count=a.c_auto_min, max_count=top),
                        decode=PoolSpec("H20", d_min, min_count=d_min, max_count=a.c_decode),
                        autoscale=rules, replica_start_s=a.c_start_s, **(slo | dict(policy=pol)))
        t0 = time.perf_counter()
        res = Simulator(cfg, reqs, progress=a.progress).run()
        s = res.summary() | {"wall_s": time.perf_counter() - t0}
        out["autoscaled"][pol] = s | {"scale_log": res.scale_log}
        print(f"  c | autoscaled, {pol}: attainment {s['attainment']:.3f} GPU-h {s['gpu_hours']:.1f} "
              f"({s['wall_s']:.0f}s)", flush=True)
        rows.append([f"autoscaled, {pol}", s["attainment"], s["gpu_hours"], f"{s['gpu_hours'] / st['gpu_hours']:.2f}x",
                     s["ttft_p90"], s["tpot_p90"] * 1e3, s["local_share"], len(res.scale_log)])
    print(f"\n(c) arrival rate x profile {prof} (trace second, multiplier): the smallest static fleet "
          f"{f'holding >= {a.c_attain:.0%} is {need}' if need else f'tried (up to {a.c_max}) never holds {a.c_attain:.0%}'}"
          f" x H200 TP2 prefill + {n_dec} x H20 decode; the autoscaler runs prefill {a.c_auto_min}..{top} "
          f"({rules[0][1].signal}, target {rules[0][1].target:g}) and decode {d_min}..{a.c_decode} "
          f"({rules[1][1].signal}, target {rules[1][1].target:g}), up after {a.c_up_delay:g} s, replicas load in "
          f"{a.c_start_s:g} s (billed meanwhile)")
    print(table(["fleet", "attainment", "GPU-hours", "vs static", "TTFT p90 s", "TPOT p90 ms", "local", "actions"], rows))
    return out


def replica_steps(c: dict, scale_log, pool: str, end_s: float | None = None) -> tuple[list[float], list[int]]:
    """(seconds, replicas) of one pool in study (c)'s autoscaled run, from its start size (the decode
    pool's own minimum, --c-decode-min, where given) through each scaling action to the run's end
    (end_s: its last size held there, so a pool that never scaled still draws a line)."""
    t, n = [0.0], [c["args_min"] if pool == "prefill" else c.get("decode_min", c["args_min"])]
    for at, p, _delta, after in scale_log:
        if p == pool:
            t.append(at)
            n.append(after)
    if end_s is not None and end_s > t[-1]:
        t.append(end_s)
        n.append(n[-1])
    return t, n


def plot(result: dict, path: str) -> None:
    """One panel per study the results hold ((a), (b), (c)); none: ValueError."""
    from matplotlib.figure import Figure
    c = result.get("c", {})
    shown = [k for k, there in (("a", result.get("a")), ("b", result.get("b")), ("c", c.get("autoscaled"))) if there]
    if not shown:
        raise ValueError("no results of studies a, b or c to plot")
    fig = Figure(figsize=(5 * len(shown), 4.5), layout="constrained")
    ax = dict(zip(shown, fig.subplots(1, len(shown), squeeze=False)[0]))
    if "a" in ax:
        for name, v in result["a"].items():
            ax["a"].plot([r["rate"] for r in v["rows"]],
                         [r["goodput_rps"] * 3600 / v["dollars_per_h"] for r in v["rows"]], marker="o", label=name)
        ax["a"].set(title="(a) SLO-meeting requests per $ vs arrival rate", xlabel="rate scale", ylabel="requests / $")
        ax["a"].legend(fontsize=7)
    if "b" in ax:
        b = result["b"]
        ax["b"].barh(list(b), [v["goodput_rps"] for v in b.values()])
        ax["b"].set(title="(b) goodput at the SLO", xlabel="req/s")
    if "c" in ax:
        pol, auto = next(iter(c["autoscaled"].items()))
        for pool in ("prefill", "decode"):
            t, n = replica_steps(c, auto["scale_log"], pool, auto.get("end_s"))
            ax["c"].step(t, n, where="post", label=f"{pool} replicas, autoscaled ({pol}), as decided")
        ax["c"].axhline(c["static_best"][0], color="tab:blue", ls="--", label="static prefill")
        ax["c"].axhline(c["static_best"][1], color="tab:orange", ls=":", label="static decode")
        ax["c"].set(title="(c) replicas over the hour", xlabel="simulated s", ylabel="replicas")
        ax["c"].legend(fontsize=7)
    fig.savefig(path, dpi=100)


def _jsonable(o):
    """Tuple keys as "a,b" strings, non-finite floats as null."""
    if isinstance(o, dict):
        return {",".join(map(str, k)) if isinstance(k, tuple) else k: _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def build_parser() -> argparse.ArgumentParser:
    from pdcluster.deploy.cli import HelpFormatter
    ap = argparse.ArgumentParser(prog="python -m pdcluster.bench.sim_studies", description=__doc__.split("\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--trace", default=TRACE, help="conversation trace JSONL (sim/trace.py format) to replay")
    ap.add_argument("--model", default="llama-3-8b", help="simulated model profile (sim/models.py, case-insensitive)")
    ap.add_argument("--studies", default="a,b,c", help="comma-separated: a, a' (what explains a), b, "
                    "b' (the cost model's KV-full fallback), c")
    ap.add_argument("--duration-s", type=float, default=None, help="trace seconds to use (default: all)")
    ap.add_argument("--slo-ttft-ms", type=float, default=2000.0, help="TTFT SLO, ms")
    ap.add_argument("--slo-tpot-ms", type=float, default=50.0, help="TPOT SLO, ms")
    ap.add_argument("--attain", type=float, default=0.85, help="(a) SLO attainment that counts as 'at SLO'")
    ap.add_argument("--rates", default="0.5,0.75,1,1.25,1.5,2", help="(a) arrival-rate scales")
    ap.add_argument("--link-gbps", type=float, default=100.0, help="(a) the cross-datacenter link, Gb/s")
    ap.add_argument("--explain-rates", default="0.75,1", help="(a') arrival-rate scales")
    from pdcluster.bench.sim_study_b import add_b_arguments
    add_b_arguments(ap)
    ap.add_argument("--c-peak", type=float, default=3.0, help="(c) peak rate multiplier (0.5x outside the peak)")
    ap.add_argument("--c-decode", type=int, default=6, help="(c) H20 decode instances (static; the autoscaler's max)")
    ap.add_argument("--c-min", type=int, default=3, help="(c) smallest static prefill pool tried (H200 TP2)")
    ap.add_argument("--c-max", type=int, default=9, help="(c) largest static prefill pool tried")
    ap.add_argument("--c-attain", type=float, default=0.95,
                    help="(c) SLO attainment the static prefill pool must hold")
    ap.add_argument("--c-static", default=None, help="(c) 'P,D': skip the static search, take this fleet (one an "
                                                  "earlier search found) as the baseline (default: run the search)")
    ap.add_argument("--c-signal", default="prefill_utilization",
                    choices=("prefill_utilization", "queued_prompt_tokens_per_replica"), help="(c) prefill pool signal")
    ap.add_argument("--c-util-target", type=float, default=0.26,
                    help="(c) prefill_utilization target (sent prompt tokens/s over replicas x learned tokens/s)")
    ap.add_argument("--c-util-down-ratio", type=float, default=0.6,
                    help="(c) prefill_utilization: scale down below this x target")
    ap.add_argument("--c-window-s", type=float, default=180.0, help="(c) prefill_utilization window, seconds")
    ap.add_argument("--c-target", type=float, default=4096.0,
                    help="(c) queued prompt tokens per prefill replica (--c-signal queued_prompt_tokens_per_replica)")
    ap.add_argument("--c-decode-signal", default="decode_step_ms",
                    choices=("decode_step_ms", "p90_tpot", "kv_utilization"),
                    help="(c) decode pool signal")
    ap.add_argument("--c-tpot-target-ms", type=float, default=25.0, help="(c) decode p90_tpot / decode_step_ms target, ms")
    ap.add_argument("--c-kv-target", type=float, default=0.4,
                    help="(c) decode KV utilization target (--c-decode-signal kv_utilization)")
    ap.add_argument("--c-auto-min", type=int, default=2, help="(c) autoscaled pools' min_replicas (and start)")
    ap.add_argument("--c-decode-min", type=int, default=None,
                    help="(c) the decode pool's min_replicas (and start); default: --c-auto-min")
    ap.add_argument("--c-policies", default="cost-model,least-loaded", help="(c) placement policies (the first "
                                                                           "also for the static search)")
    ap.add_argument("--c-up-delay", type=float, default=5.0, help="(c) autoscaler upscale delay, seconds")
    ap.add_argument("--c-down-delay", type=float, default=120.0, help="(c) autoscaler downscale delay, seconds")
    ap.add_argument("--c-cooldown", type=float, default=30.0, help="(c) autoscaler cooldown after a change, seconds")
    ap.add_argument("--c-start-s", type=float, default=60.0, help="(c) seconds a new replica takes to load")
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    ap.add_argument("--plot", default=None, help="PNG of the studies' results")
    ap.add_argument("--progress", action="store_true", help="a tqdm bar per simulation")
    ap.add_argument("--plot-from", default=None, help="comma-separated result JSONs (of runs of different studies): "
                                                    "merge them into --plot and run nothing")
    return ap


def _rates(s: str) -> list[float]:
    """A comma-separated list of arrival-rate scales, each > 0."""
    rates = [float(x) for x in s.split(",")]
    if not all(r > 0 for r in rates):
        raise ValueError(f"rate scales must be > 0: {s}")
    return rates


STUDIES = ("a", "a'", "b", "b'", "c")


def _check(ap, a) -> None:
    """Usage errors (exit 2) for what the studies would otherwise meet as a traceback."""
    from pdcluster.sim.models import model
    unknown = set(a.studies.split(",")) - set(STUDIES)
    if unknown:
        ap.error(f"--studies: unknown {', '.join(sorted(unknown))}; choose from {', '.join(STUDIES)}")
    try:
        model(a.model)
        a.rates, a.b_rates, a.explain_rates = (_rates(s) for s in (a.rates, a.b_rates, a.explain_rates))
    except ValueError as e:
        ap.error(str(e))
    if a.c_static is not None:
        try:
            a.c_static_fleet = tuple(int(x) for x in a.c_static.split(","))
        except ValueError:
            a.c_static_fleet = ()
        if len(a.c_static_fleet) != 2 or min(a.c_static_fleet) < 1:
            ap.error(f"--c-static takes P,D (prefill and decode instances, each >= 1), got {a.c_static!r}")
    if not 1 <= a.c_min <= a.c_max:
        ap.error(f"need 1 <= --c-min ({a.c_min}) <= --c-max ({a.c_max})")
    for spec in filter(None, (a.b_dynamo_busy or "").split(",")):
        tokens, _, blocks = spec.partition(":")
        try:
            int(tokens), blocks and float(blocks)
        except ValueError:
            ap.error(f"--b-dynamo-busy takes TOKENS[:BLOCKS] items, got {spec!r}")


def main(argv=None) -> None:
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.plot_from and not a.plot:
        ap.error("--plot-from merges results into --plot: give --plot PNG")
    if a.plot_from:
        merged: dict = {}
        for path in a.plot_from.split(","):
            with open(path) as f:
                merged |= json.load(f)
        try:
            plot(merged, a.plot)
        except ValueError as e:
            ap.error(f"--plot-from: {e}")
        return
    _check(ap, a)
    try:
        base = load_trace(a.trace, duration_s=a.duration_s)
    except (ValueError, OSError) as e:
        ap.error(str(e))
    if not base:
        ap.error(f"{a.trace}: no requests" + ("" if a.duration_s is None else f" in the first {a.duration_s:g} s"))
    a.c_policies = a.c_policies.split(",")
    a.b_fallbacks = a.b_fallbacks.split(",")
    cache: dict = {}

    def reqs_at(rate: float):
        if rate not in cache:
            cache[rate] = load_trace(a.trace, duration_s=a.duration_s, rate_scale=rate) if rate != 1 else base
        return cache[rate]
    print(f"trace {a.trace}: {len(base)} requests over {max(r.arrival_s for r in base):.0f} s; model {a.model}")
    result: dict = {"args": {k: v for k, v in vars(a).items()}}
    studies = set(a.studies.split(","))
    if "a" in studies:
        result["a"] = study_a(a, reqs_at)
    if "a'" in studies:
        result["a_explain"] = study_a_explain(a, reqs_at)
    if "b" in studies or "b'" in studies:
        from pdcluster.bench.sim_study_b import study_b, study_b_fallback
        if "b" in studies:
            result["b"] = study_b(a, reqs_at)
        if "b'" in studies:
            result["b_fallback"] = study_b_fallback(a, reqs_at)
    if "c" in studies:
        result["c"] = study_c(a, base)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(_jsonable(result), f, indent=1)
    if a.plot and any(k in result for k in ("a", "b", "c")):
        plot(result, a.plot)


if __name__ == "__main__":
    main()
