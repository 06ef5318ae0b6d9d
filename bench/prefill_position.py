"""What a computed prompt token costs against where it sits: a tail of t tokens after p cached ones, and the
whole p + t prompt computed from scratch, on one engine (1 thread, a serving worker's default), alternated.

    python -m pdcluster.bench.prefill_position --out bench/prefill-position.json --plot bench/prefill-position.png

Why: a prefix hit saves the prefix's tokens, but the tail it leaves attends over the whole cached prefix, and a
short tail fills the linears' rows poorly; so the tokens a hit leaves cost more each than a whole prompt's do, and
a tier's per-token prefill rate (bench/trace_breakdown.py) rises while its prefill time falls. Prints, per (p, t),
the median ms per tail token, per whole-prompt token, and the hit's time saving (whole / tail).
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

from tqdm import tqdm

from pdcluster.bench import outputs


def first_token_ms(eng, ids: list[int], sp) -> float:
    """ms an LLMEngine with nothing else to do takes to run a prompt to its end (sp: max_tokens=1: its prefill;
    the step budget may chunk it)."""
    t = time.perf_counter()
    eng.add_request(ids, sp)
    while eng.has_work():
        eng.step()
    return (time.perf_counter() - t) * 1e3


def measure(prefixes: list[int], tails: list[int], repeats: int, progress: bool = True) -> list[dict]:
    """Per (prefix, tail): median ms per tail token (prefix cached) and per token of the whole prompt (cold)."""
    import torch
    from pdcluster.engine.llm_engine import LLMEngine, build_config
    from pdcluster.engine.sampling_params import SamplingParams
    torch.set_num_threads(1)
    eng = LLMEngine(build_config(num_threads=1, speculative="off"))
    eng.warmup()
    rng = random.Random(0)
    sp = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    def fresh(n: int) -> list[int]:         # ids no earlier prompt shares (its blocks miss the prefix cache)
        return [rng.randrange(1000, 40000) for _ in range(n)]

    def run(ids: list[int]) -> float:
        return first_token_ms(eng, ids, sp)
    rows, shapes = [], [(p, t) for p in prefixes for t in tails]
    for p, t in tqdm(shapes, desc="prefix x tail", disable=not progress):
        tail_ms, whole_ms = [], []
        for _ in range(repeats):
            prefix = fresh(p)
            if p:
                run(prefix + fresh(1))                          # caches the prefix's whole blocks
            tail_ms.append(run(prefix + fresh(t)))
            whole_ms.append(run(fresh(p + t)))
        tail, whole = statistics.median(tail_ms), statistics.median(whole_ms)
        rows.append(dict(prefix=p, tail=t, tail_ms=tail, whole_ms=whole, tail_ms_per_token=tail / t,
                         whole_ms_per_token=whole / (p + t), saving=whole / tail))
    return rows


def plot(result: dict, path: str) -> None:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    ax, ax2 = fig.subplots(1, 2)
    for t in sorted({r["tail"] for r in result["rows"]}):
        rs = [r for r in result["rows"] if r["tail"] == t]
        ax.plot([r["prefix"] for r in rs], [r["tail_ms_per_token"] for r in rs], marker="o", label=f"tail {t}")
        ax2.plot([r["prefix"] for r in rs], [r["saving"] for r in rs], marker="o", label=f"tail {t}")
    ax.set(xlabel="cached prefix tokens", ylabel="ms per computed tail token", title="a hit's tail, per token")
    ax2.set(xlabel="cached prefix tokens", ylabel="whole prompt ms / tail ms", title="the hit's time saving")
    for a in (ax, ax2):
        a.grid(alpha=0.3)
        a.legend()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    from pdcluster.deploy.cli import HelpFormatter
    from pdcluster.bench.outputs import Listed
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--prefixes", type=int, nargs="+", default=Listed([0, 512, 1024, 2048]),
                    help="cached prefix tokens (multiples of the block size are cached whole)")
    ap.add_argument("--tails", type=int, nargs="+", default=Listed([16, 64, 256, 1024]), help="computed tail tokens")
    ap.add_argument("--repeats", type=int, default=3, help="runs per shape (median)")
    ap.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    outputs.add_args(ap, plot_help="PNG: ms per tail token and the saving against the prefix")
    a = ap.parse_args(argv)
    if outputs.replotted(a, plot, "bench/prefill-position.png"):
        return 0
    if min(a.tails) < 1 or min(a.prefixes) < 0 or a.repeats < 1:
        ap.error("--tails and --repeats take numbers >= 1, --prefixes >= 0")
    rows = measure(a.prefixes, a.tails, a.repeats, progress=not a.disable_tqdm)
    print("1 thread, float32 engine defaults; ms are medians of", a.repeats)
    print(f"{'prefix':>7} {'tail':>5} {'tail ms/tok':>12} {'whole ms/tok':>13} {'tail/whole':>11} {'saving':>7}")
    for r in rows:
        print(f"{r['prefix']:>7} {r['tail']:>5} {r['tail_ms_per_token']:>12.3f} {r['whole_ms_per_token']:>13.3f} "
              f"{r['tail_ms_per_token'] / r['whole_ms_per_token']:>10.2f}x {r['saving']:>6.2f}x")
    outputs.save(a, dict(threads=1, repeats=a.repeats, rows=rows), plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
