"""The pure half of `pdcluster bench scenario`: merged rounds, ratios, worker deltas, report, table.

No cluster, no network: bench/scenario.py runs the clusters and calls these.
"""
from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

from pdcluster.bench.metrics import _stats
from pdcluster.bench.trace_load import busy_share

if TYPE_CHECKING:
    from pdcluster.bench.scenario import Scenario

SIDE_NAMES = ("baseline", "candidate")
SUM_KEYS = ("duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "kv_bytes_transferred")
SAMPLE_KEYS = ("ttfts", "tpots", "itls", "e2els", "input_lens", "output_lens", "cached_lens", "decode_workers",
               "prefill_workers")


def lower_is_better(metric: str) -> bool:
    return metric.endswith("_ms")


# Pure parts: ratios, merging rounds, the result file, the table.
def ratios(baseline: dict, candidate: dict, metrics: tuple[str, ...]) -> dict[str, float | None]:
    """candidate / baseline per metric; None where either is missing or the baseline is 0."""
    out: dict[str, float | None] = {}
    for m in metrics:
        b, c = baseline.get(m), candidate.get(m)
        out[m] = c / b if b and c is not None else None
    return out


def merge_results(runs: list[dict]) -> dict:
    """One result from several run_benchmark results of the same workload: sums for counts and
    durations, pooled samples for the latency statistics, totals / summed durations for rates."""
    if not runs:
        raise ValueError("no runs to merge")
    m: dict[str, Any] = {k: sum(r[k] for r in runs) for k in SUM_KEYS}
    for k in SAMPLE_KEYS:
        m[k] = [x for r in runs for x in r.get(k, [])]
    d = m["duration"]
    m["request_throughput"] = m["completed"] / d if d else 0.0
    m["output_throughput"] = m["total_output_tokens"] / d if d else 0.0
    m["total_token_throughput"] = (m["total_input_tokens"] + m["total_output_tokens"]) / d if d else 0.0
    gp = [r.get("request_goodput") for r in runs]
    m["request_goodput"] = None if any(g is None for g in gp) or not d else sum(
        g * r["duration"] for g, r in zip(gp, runs)) / d
    for name, key in (("ttft", "ttfts"), ("tpot", "tpots"), ("itl", "itls"), ("e2el", "e2els")):
        m.update(_stats(name, m[key]))
    n_in = m["total_input_tokens"]
    m["prefix_cache_hit_rate"] = (sum((r.get("prefix_cache_hit_rate") or 0.0) * r["total_input_tokens"]
                                      for r in runs) / n_in) if n_in else None
    remote = [(r.get("remote_prefill_fraction") or 0.0) * r["completed"] for r in runs]
    kv_ms = sum((r.get("mean_kv_transfer_ms") or 0.0) * n for r, n in zip(runs, remote))
    m["remote_prefill_fraction"] = sum(remote) / m["completed"] if m["completed"] else None
    m["mean_kv_transfer_ms"] = kv_ms / sum(remote) if sum(remote) else None
    m["kv_transfer_bandwidth_gbps"] = m["kv_bytes_transferred"] * 8e-6 / kv_ms if kv_ms else None
    errors: dict[str, int] = {}
    for r in runs:
        for code, n in r.get("errors", {}).items():
            errors[code] = errors.get(code, 0) + n
    m["errors"] = errors
    for k in ("request_rate", "burstiness", "max_concurrency"):
        if k in runs[0]:
            m[k] = runs[0][k]
    return m


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and x == float("inf"):
        return "inf"
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def build_report(sc: Scenario, settings: dict, baseline_runs: list[dict], candidate_runs: list[dict],
                 workers: dict[str, list[dict]] | None = None) -> dict:
    """The --out document: {"scenario", "baseline", "candidate", "ratios"}. A side without runs
    (--only the other) is {"label", "config", "not_run": true}, and every ratio is null."""
    workers = workers or {}
    sides = {}
    for side, runs, cfg in (("baseline", baseline_runs, sc.baseline), ("candidate", candidate_runs, sc.candidate)):
        if not runs:
            sides[side] = dict(label=sc.labels[SIDE_NAMES.index(side)], config=dataclasses.asdict(cfg), not_run=True,
                               runs=[])
            continue
        merged = merge_results(runs)
        merged["label"] = sc.labels[0 if side == "baseline" else 1]
        merged["config"] = dataclasses.asdict(cfg)
        merged["runs"] = [{k: r.get(k) for k in ("duration", "completed", "failed") + tuple(sc.metrics)}
                          for r in runs]
        merged["workers"] = workers.get(side, [])
        merged["tiers"] = tier_totals(merged["workers"])
        merged["busy_share"] = busy_share(merged["workers"], [r.get("duration") for r in runs])
        sides[side] = merged
    scenario = dict(name=sc.name, summary=sc.summary, labels=list(sc.labels), dataset=sc.dataset,
                    request_rate=sc.request_rate, burstiness=sc.burstiness, max_concurrency=sc.max_concurrency,
                    goodput=sc.goodput, metrics=list(sc.metrics), warmup=sc.warmup, notes=sc.notes,
                    candidate_flags=dict(sc.candidate_flags), baseline_flags=dict(sc.baseline_flags)) | settings
    return _jsonable(dict(scenario=scenario, baseline=sides["baseline"], candidate=sides["candidate"],
                          ratios=ratios(sides["baseline"], sides["candidate"], sc.metrics)))


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3f}" if isinstance(v, float) and abs(v) < 10 else (f"{v:.1f}" if isinstance(v, float) else str(v))


def format_report(report: dict) -> str:
    """The side-by-side table: per-run rows, the merged baseline and candidate rows, the ratios."""
    sc = report["scenario"]
    metrics = sc["metrics"]
    names = [f"{s} ({report[s]['label']})" for s in ("baseline", "candidate")]
    rows: list[tuple[str, list[str]]] = []
    for side, name in zip(("baseline", "candidate"), names):
        for i, run in enumerate(report[side]["runs"]):
            rows.append((f"  round {i + 1} {side}", [_fmt(run.get(m)) for m in metrics]))
    rows += [(name, ["not run" if report[s].get("not_run") else _fmt(report[s].get(m)) for m in metrics])
             for s, name in zip(("baseline", "candidate"), names)]
    rows.append(("ratio candidate/baseline", [_fmt(report["ratios"][m]) + ("x" if report["ratios"][m] else "")
                                              for m in metrics]))
    rows.append(("  better when", ["lower" if lower_is_better(m) else "higher" for m in metrics]))
    w0 = max(len(r[0]) for r in rows)
    ws = [max(len(m), *(len(r[1][i]) for r in rows)) for i, m in enumerate(metrics)]
    line = lambda label, cells: "  ".join([label.ljust(w0)] + [c.rjust(w) for c, w in zip(cells, ws)])  # noqa: E731
    ds = sc["dataset"]
    goodput = ", ".join(f"{k} <= {v:g} ms" for k, v in sc["goodput"].items()) or "none"
    head = [f"scenario {sc['name']}: {sc['summary']}",
            f"workload: {json.dumps(ds)}; "
            + ("the trace's arrival times; " if ds.get("dataset", "").startswith("mooncake:") else
               f"{sc['request_rate']} req/s (burstiness {sc['burstiness']}); ") +
            f"{sc['rounds']} round(s), alternating; goodput target: {goodput}",
            *([f"KV link: {sc['kv_link']}"] if sc.get("kv_link") else []),
            line("", metrics)]
    body = [line(label, cells) for label, cells in rows]
    fails = [f"{s}: {report[s]['failed']} failed {report[s]['errors']}" for s in ("baseline", "candidate")
             if report[s].get("failed")]
    tiers = [f"{s} tiers (all runs and workers): " + "; ".join(
                 f"{t} " + ", ".join(f"{k} {v}" for k, v in d.items() if k != "loaded_bytes")
                 for t, d in report[s]["tiers"].items())
             for s in ("baseline", "candidate") if report[s].get("tiers")]
    shares = [(report[s]["label"], report[s].get("busy_share")) for s in ("baseline", "candidate")]
    load = ["workers busy (the load): " + ", ".join(f"{label} {v:.2f}" for label, v in shares if v is not None)
            + (f"; time scale x{c['time_scale']:g} for a load of {c['load']:g} (probe: {c['probe_ms_per_token']:g} "
               "ms a prompt token)" if (c := sc.get("calibration")) else "")] \
        if any(v is not None for _, v in shares) else []
    return "\n".join(head + body + fails + tiers + load)


STEP_COUNTERS = ("prefill_tokens", "prefill_s", "decode_steps", "decode_seqs", "decode_s", "steps")   # EngineFigures
PULL_COUNTERS = ("pulls", "pulled_blocks", "pulled_bytes", "pull_failures", "pull_sum_s", "served", "served_bytes",
                 "serve_failures", "serve_sum_s")    # PullFigures: the puller's and the holder's halves


def pull_deltas(before, after) -> dict[str, float]:
    """{counter: after - before} of a worker's peer-pull figures (PullFigures) over a run; {} when the
    worker reports none."""
    if after is None:
        return {}
    return {k: getattr(after, k) - (getattr(before, k) if before is not None else 0) for k in PULL_COUNTERS}


TIER_COUNTERS = ("hits", "load_failures", "loaded_bytes", "stored", "evicted", "corrupt", "store_failures", "dropped")


def tier_deltas(before, after) -> dict[str, dict[str, int]]:
    """{tier: {counter: after - before}} over a run, from two WorkerStatus.tiers (TierFigures), plus
    "blocks" (held at the end) and "capacity_blocks". {} when the worker has no lower tiers."""
    b = {t.tier: t for t in before}
    out = {}
    for t in after:
        prev = b.get(t.tier)
        d = {k: getattr(t, k) - (getattr(prev, k) if prev else 0) for k in TIER_COUNTERS}
        out[t.tier] = d | dict(blocks=t.blocks, capacity_blocks=t.capacity_blocks)
    return out


def tier_totals(workers: list[dict]) -> dict[str, dict[str, int]]:
    """A side's per-tier counters summed over its runs and workers (run_once's worker figures)."""
    tot: dict[str, dict[str, int]] = {}
    for run in workers:
        for w in run.values():
            for tier, d in w.get("tiers", {}).items():
                acc = tot.setdefault(tier, dict.fromkeys(TIER_COUNTERS, 0))
                for k in TIER_COUNTERS:
                    acc[k] += d.get(k, 0)          # files from before a counter existed: 0
    return tot
