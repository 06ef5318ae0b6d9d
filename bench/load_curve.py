"""A trace-replay scenario's two sides against the offered load: one `bench scenario --out` result per time scale.

    python -m pdcluster.bench.load_curve bench/trace-replay-t0.12.json bench/trace-replay-s44.json \\
        bench/trace-replay-t0.09.json bench/trace-replay-t0.08.json --capacity device-only=1.97 \\
        --plot bench/trace-replay-load.png

Each result is a run of the same trace scenario at its own `--time-scale` (results at one time scale are pooled:
their rounds together). The offered rate is the replayed
requests over their arrival span (read from the trace file named in the result, so it must be where it was).
Prints, per result, both sides' mean TTFT per round and over the rounds' requests (a round's mean weighted by the
requests it completed; a round with none left out, its failures counted) and their ratio; plots both against the
offered rate, with each --capacity (a side's served req/s at saturation, measured by a replay past it) as a line.
"""
from __future__ import annotations

import argparse
import json

from pdcluster.bench.trace_dataset import read_trace


def arrivals(dataset: dict) -> list[float]:
    """A trace replay's (a scenario's `dataset`) send times, seconds from the first (trace_dataset.scale_rows' rule)."""
    rows = read_trace(dataset["dataset"].split(":", 1)[1], dataset.get("start", 0), dataset.get("max_requests"),
                      dataset.get("conversation_sample", 1))
    return [(r.timestamp_ms - rows[0].timestamp_ms) / 1000 * dataset["time_scale"] for r in rows]


def offered_rate(dataset: dict) -> float:
    """Requests per second a trace replay offers: its requests over their arrival span (the first arrives at 0)."""
    a = arrivals(dataset)
    if len(a) < 2 or a[-1] <= 0:
        raise ValueError(f"its {len(a)} request(s) arrive over 0 s: no offered rate")
    return len(a) / a[-1]


def point(result: dict) -> dict:
    """One result's load and each side's per-round mean TTFT (ms)."""
    sc = result["scenario"]
    if not sc["dataset"]["dataset"].startswith("mooncake:"):
        raise ValueError(f"{sc['name']} replays no trace")
    out = {"name": sc["name"], "time_scale": sc["dataset"]["time_scale"], "offered": offered_rate(sc["dataset"]),
           "labels": sc["labels"]}
    for side in ("baseline", "candidate"):
        if result[side].get("not_run"):
            raise ValueError(f"its {side} side was not run (--only)")
        runs = result[side]["runs"]
        out[side] = {"rounds": [r["mean_ttft_ms"] for r in runs if r["completed"]],    # a round that finished
                     "completed": [r["completed"] for r in runs if r["completed"]],   # nothing has no mean
                     "failed": sum(r["failed"] for r in runs)}
    return out


def merge(pts: list[dict]) -> list[dict]:
    """Results at the same time scale pooled (their rounds together), ordered by the offered rate."""
    by = {}
    for p in pts:
        q = by.setdefault(p["time_scale"], {**p, **{s: {"rounds": [], "completed": [], "failed": 0}
                                                    for s in ("baseline", "candidate")}})
        for side in ("baseline", "candidate"):
            for k in ("rounds", "completed", "failed"):
                q[side][k] = q[side][k] + p[side][k]
    for q in by.values():
        for side in ("baseline", "candidate"):      # the pooled requests' mean, as bench scenario pools rounds
            r, n = q[side]["rounds"], q[side]["completed"]
            if not n:
                raise ValueError(f"x{q['time_scale']:g}: no {side} request completed")
            q[side]["mean"] = sum(m * k for m, k in zip(r, n)) / sum(n)
        q["ratio"] = q["baseline"]["mean"] / q["candidate"]["mean"]
    return sorted(by.values(), key=lambda p: p["offered"])


def main(argv=None) -> int:
    from pdcluster.deploy.cli import HelpFormatter
    from pdcluster.bench.outputs import Listed
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("results", nargs="+", help="`bench scenario --out` results of one trace scenario")
    ap.add_argument("--capacity", action="append", default=Listed([]), metavar="LABEL=REQ_S",
                    help="a side's measured capacity, drawn as a line (repeat for several)")
    ap.add_argument("--target", type=float, default=2.0, help="the ratio target, drawn as a line (0: none)")
    ap.add_argument("--plot", default=None, help="write the PNG here")
    a = ap.parse_args(argv)
    caps = {}
    for c in a.capacity:
        label, _, value = c.partition("=")
        try:
            caps[label] = float(value)
        except ValueError:
            ap.error(f"--capacity takes LABEL=REQ_S, got {c!r}")
    pts = []
    for path in a.results:
        with open(path) as f:
            try:
                pts.append(point(json.load(f)))
            except (KeyError, ValueError) as e:
                ap.error(f"{path}: not a trace scenario result ({e})")
    if len({p["name"] for p in pts}) > 1:
        ap.error(f"results of different scenarios: {sorted({p['name'] for p in pts})}")
    try:
        pts = merge(pts)
    except ValueError as e:
        ap.error(str(e))
    base, cand = pts[0]["labels"]
    print(f"{pts[0]['name']}: mean TTFT ms against the offered load")
    print(f"{'time scale':>10} {'req/s':>6} {base + ' (rounds)':>30} {cand + ' (rounds)':>30} {'ratio':>7}")
    for p in pts:
        cols = [f"{p[s]['mean']:,.1f} ({' / '.join(f'{x:,.0f}' for x in p[s]['rounds'])})"
                for s in ("baseline", "candidate")]
        failed = f"   failed: {p['baseline']['failed']} / {p['candidate']['failed']}" if (
            p["baseline"]["failed"] or p["candidate"]["failed"]) else ""
        print(f"{p['time_scale']:>10g} {p['offered']:6.2f} {cols[0]:>30} {cols[1]:>30} {p['ratio']:6.2f}x{failed}")
    for label, v in caps.items():
        shares = ", ".join(f"x{p['time_scale']:g} offers {p['offered'] / v:.0%}" for p in pts)
        print(f"capacity {label}: {v:g} req/s; {shares}")
    if a.plot:
        plot(pts, caps, a.target, a.plot)
    return 0


def plot(pts: list[dict], caps: dict, target: float, path: str) -> None:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    ax, ax2 = fig.subplots(1, 2)
    x = [p["offered"] for p in pts]
    for side, label in zip(("baseline", "candidate"), pts[0]["labels"]):
        line, = ax.plot(x, [p[side]["mean"] for p in pts], marker="o", label=label)
        for p in pts:
            ax.scatter([p["offered"]] * len(p[side]["rounds"]), p[side]["rounds"], color=line.get_color(), s=12,
                       alpha=0.5)
    base, cand = pts[0]["labels"]
    ax2.plot(x, [p["ratio"] for p in pts], marker="o", color="black", label=f"{base} / {cand}")
    if target:
        ax2.axhline(target, color="grey", ls="--", lw=1, label=f"target {target:g}x")
    for a in (ax, ax2):
        for (label, v), color in zip(caps.items(), ("red", "purple", "brown", "olive")):
            a.axvline(v, color=color, ls=":", lw=1, label=f"{label} capacity")
        a.grid(alpha=0.3)
        a.legend()
    ax.set(xlabel="offered req/s", ylabel="mean TTFT ms (dots: rounds)", title=f"{pts[0]['name']}: mean TTFT")
    ax2.set(xlabel="offered req/s", ylabel="mean TTFT ratio", title="how much lower the candidate's mean is")
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
