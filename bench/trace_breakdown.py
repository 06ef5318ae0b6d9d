"""Break a trace replay's result down per request: its own prefill against the rest of its TTFT.

    python -m pdcluster.bench.trace_breakdown bench/trace-replay-s45.json

Per side, each request's computed prompt tokens (input_lens - cached_lens) at the side's measured prefill rate
(its workers' prefill seconds over their prefill tokens, every round pooled) estimate its own prefill; the rest of
its TTFT is waiting (behind other prompts' steps, tier loads, the serving path). Rows bin the requests by computed
tokens. Then, of the waits over --long-wait seconds, how much came while another worker had no request of its own
between arrival and first token: what placement could still have spread (arrivals from the trace file named in the
result, which must be where it was; a worker busy only decoding counts as free).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pdcluster.bench.load_curve import arrivals
from pdcluster.deploy.cli import HelpFormatter

BINS = (0, 64, 128, 256, 512, 1024)     # computed prompt tokens; the last bin is open


def prefill_s_per_token(side: dict) -> float:
    """The side's workers' prefill seconds per prefill token, every round and worker pooled."""
    s = t = 0.0
    for rnd in side.get("workers") or []:
        for w in rnd.values():
            e = w.get("engine") or {}
            s, t = s + e.get("prefill_s", 0.0), t + e.get("prefill_tokens", 0)
    if not t:
        raise ValueError("the result has no workers' prefill counters (workers[].engine)")
    return s / t


def breakdown(side: dict, arrive: list[float], long_wait_s: float) -> dict:
    """Per bin: requests, mean TTFT, own prefill and wait (ms), shares of the summed TTFT; and the long waits."""
    n, per_tok = len(arrive), prefill_s_per_token(side)
    ttft = [t / 1e3 for t in side["ttfts"]]
    rounds, failed = len(side["runs"]), sum(r.get("failed", 0) for r in side["runs"])
    if failed:      # the samples carry no request index: with one missing, the rest pair with wrong arrivals
        raise ValueError(f"{failed} requests failed: the TTFTs cannot be paired with their arrivals")
    if len(ttft) != n * rounds or len(side["cached_lens"]) != len(ttft) or len(side["decode_workers"]) != len(ttft):
        raise ValueError(f"{len(ttft)} TTFTs are not {rounds} rounds of {n} requests with their placements")
    comp = [i - c for i, c in zip(side["input_lens"], side["cached_lens"])]
    own = [min(c * per_tok, t) for c, t in zip(comp, ttft)]             # a request never waits less than 0
    total = sum(ttft)
    bins = []
    for k, lo in enumerate(BINS):
        hi = BINS[k + 1] if k + 1 < len(BINS) else None
        idx = [j for j, c in enumerate(comp) if c >= lo and (hi is None or c < hi)]
        if idx:
            bins.append(dict(lo=lo, hi=hi, n=len(idx), mean_ttft_ms=1e3 * sum(ttft[j] for j in idx) / len(idx),
                             own_ms=1e3 * sum(own[j] for j in idx) / len(idx),
                             wait_ms=1e3 * sum(ttft[j] - own[j] for j in idx) / len(idx),
                             ttft_share=sum(ttft[j] for j in idx) / total))
    long_s = spread_s = 0.0
    for r in range(rounds):
        js = range(r * n, (r + 1) * n)
        w = {j: side["decode_workers"][j] for j in js}
        for j in js:
            wait = ttft[j] - own[j]
            if wait <= long_wait_s:
                continue
            long_s += wait
            t = arrive[j - r * n]
            others = set(w.values()) - {w[j]}
            busy = {w[i] for i in js if w[i] != w[j] and arrive[i - r * n] <= t < arrive[i - r * n] + ttft[i]}
            if others - busy:
                spread_s += wait
    return dict(prefill_ms_per_token=per_tok * 1e3, own_share=sum(own) / total, bins=bins,
                long_wait_s=long_s, long_wait_other_free_s=spread_s, rounds=rounds)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("result", help="JSON written by `pdcluster bench scenario trace-replay --out`")
    ap.add_argument("--long-wait", type=float, default=0.5, help="seconds of waiting that count as long")
    a = ap.parse_args(argv)
    data = json.loads(Path(a.result).read_text())
    sc = data["scenario"]
    if not sc["dataset"]["dataset"].startswith("mooncake:"):
        print(f"{a.result}: scenario {sc['name']} is not a trace replay", file=sys.stderr)
        return 2
    arrive = arrivals(sc["dataset"])
    for side, label in zip(("baseline", "candidate"), sc.get("labels", ("baseline", "candidate"))):
        if data[side].get("not_run"):
            print(f"{label}: not run")
            continue
        try:
            b = breakdown(data[side], arrive, a.long_wait)
        except ValueError as e:
            print(f"{a.result}: {label}: {e}", file=sys.stderr)
            return 2
        print(f"{label} ({b['rounds']} rounds): prefill {b['prefill_ms_per_token']:.2f} ms a token; own prefill "
              f"{b['own_share']:.0%} of the summed TTFT")
        print(f"  {'computed tokens':>15} {'n':>4} {'mean TTFT ms':>13} {'own ms':>8} {'wait ms':>8} "
              f"{'TTFT share':>11}")
        for x in b["bins"]:
            rng = f"{x['lo']}-{x['hi'] - 1}" if x["hi"] else f">= {x['lo']}"
            print(f"  {rng:>15} {x['n']:>4} {x['mean_ttft_ms']:>13.0f} {x['own_ms']:>8.0f} {x['wait_ms']:>8.0f} "
                  f"{x['ttft_share']:>11.2f}")
        print(f"  waits over {a.long_wait:g} s: {b['long_wait_s']:.1f} s in all, {b['long_wait_other_free_s']:.1f} s "
              "of them while another worker had no request of its own in prefill")
    return 0


if __name__ == "__main__":
    sys.exit(main())
