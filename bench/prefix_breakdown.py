"""Break a prefix-routing scenario result down per request: cold / hit / miss on a holder / sent elsewhere.

    python -m pdcluster.bench.prefix_breakdown bench/prefix-routing.json
    python -m pdcluster.bench.prefix_breakdown bench/prefix-routing-16pg-breakdown.json --prefix-len 384 --suffix-len 24

Each request of the seeded shared-prefix workload is classed against the decode workers that served
its prefix earlier in the same run: "cold" (first of its prefix), "hit" (>= prefix_len tokens
cached), "miss on a holder" (sent to a worker that served the prefix before, yet missed: evicted,
or still being computed for an earlier prompt), "miss, sent elsewhere". Needs a result written
with the per-request lists (cached_lens, decode_workers); the workload defaults to the registered
scenario's (pass the lengths for a result of an older workload).
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path


from pdcluster.bench.datasets import build_dataset  # noqa: E402
from pdcluster.bench.scenario import SCENARIOS  # noqa: E402
from pdcluster.deploy.cli import HelpFormatter  # noqa: E402

KINDS = ("cold", "hit", "miss on a holder", "miss, sent elsewhere")


def classify(reqs, result: dict, prefix_len: int) -> dict[str, list[float]]:
    """kind -> TTFTs (ms) over every run pooled in `result` (runs back to back, in workload order)."""
    n = len(reqs)
    runs = len(result["ttfts"]) // n
    out: dict[str, list[float]] = collections.defaultdict(list)
    for k in range(runs):
        served: dict[int, set] = collections.defaultdict(set)
        for i, r in enumerate(reqs):
            j, g = k * n + i, r.meta["group"]
            w, cached = result["decode_workers"][j], result["cached_lens"][j]
            if not served[g]:
                kind = "cold"
            elif cached >= prefix_len:
                kind = "hit"
            else:
                kind = "miss on a holder" if w in served[g] else "miss, sent elsewhere"
            out[kind].append(result["ttfts"][j])
            served[g].add(w)
    return out


def ideal_hit_rate(reqs, prefix_len: int, block_size: int = 16) -> float:
    """The prefix-cache hit rate of a perfect placement on this workload: every prompt but its
    prefix's first hits the whole prefix (in full blocks, and never its own last token) and nothing
    else, in cached tokens / prompt tokens. No router can do better; compare the measured rates."""
    seen, cached, total = set(), 0, 0
    for r in reqs:
        n = len(r.prompt_ids)
        total += n
        if r.meta["group"] in seen:
            cached += min(prefix_len // block_size, (n - 1) // block_size) * block_size
        seen.add(r.meta["group"])
    return cached / total if total else 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("result", help="JSON written by `pdcluster bench scenario prefix-routing --out`")
    ds = SCENARIOS["prefix-routing"].dataset
    ap.add_argument("--prompts-per-group", type=int, default=None,
                    help="prompts per prefix group (default: the result's num_requests / --num-groups)")
    ap.add_argument("--num-groups", type=int, default=ds["num_groups"],
                    help="shared-prefix groups the scenario ran (to rebuild its prompts)")
    ap.add_argument("--prefix-len", type=int, default=ds["prefix_len"], help="shared prefix tokens per group")
    ap.add_argument("--suffix-len", type=int, default=ds["suffix_len"], help="per-prompt tokens after the prefix")
    ap.add_argument("--seed", type=int, default=0, help="dataset seed the scenario ran with")
    ap.add_argument("--vocab-size", type=int, default=49152, help="the model's vocabulary size, tokens (SmolLM2's)")
    a = ap.parse_args(argv)
    data = json.loads(Path(a.result).read_text())
    per_group = a.prompts_per_group or data["scenario"]["num_requests"] // a.num_groups
    reqs = build_dataset({"dataset": "shared-prefix", "num_groups": a.num_groups, "prompts_per_group":
                          per_group, "prefix_len": a.prefix_len, "suffix_len": a.suffix_len,
                          "output_len": 8, "ignore_eos": True, "seed": a.seed}, a.vocab_size)
    ideal = ideal_hit_rate(reqs, a.prefix_len)
    print(f"hit rate of a perfect placement on this workload: {ideal:.3f}")
    for side in ("baseline", "candidate"):
        res = data[side]
        if "cached_lens" not in res or len(res["ttfts"]) % len(reqs):
            print(f"{side}: no per-request placement lists, or not this workload", file=sys.stderr)
            return 2
        kinds = classify(reqs, res, a.prefix_len)
        total = sum(sum(v) for v in kinds.values())
        rate = res.get("prefix_cache_hit_rate") or 0.0
        print(f"{side} ({res.get('label', '')}, {len(res['ttfts']) // len(reqs)} runs): hit rate {rate:.3f} = "
              f"{rate / ideal if ideal else 0:.0%} of the perfect placement's")
        for kind in KINDS:
            v = kinds.get(kind, [])
            mean = sum(v) / len(v) if v else 0.0
            print(f"  {kind:<22} n={len(v):4d}  mean TTFT {mean:7.0f} ms  share of summed TTFT "
                  f"{sum(v) / total if total else 0:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
