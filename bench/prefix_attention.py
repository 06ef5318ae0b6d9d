"""A prefill chunk's attention on CPU, per layer call: pdcluster::paged_chunk_attention (kernels/prefill_attention.cpp,
K/V read in place) against the torch path it replaces (a cached prefix gathered into a copy, K/V repeated per query
head, SDPA with a causal mask; a whole prompt straight to causal SDPA), in the same process, alternated.

    python -m pdcluster.bench.prefix_attention --chunks 24 64 --contexts 408 1024 3000

SmolLM2-135M's attention shape by default (9 query heads over 3 KV heads of 64), float32, blocks of 16 scattered
at random in a cache of --blocks blocks. A chunk of q rows over a context of n positions: n - q cached before it
(n = q: a whole prompt; add --whole for those). Prints microseconds per call (best of --repeats runs of --calls
calls), their ratio (> 1: the op is faster) and the largest difference between the two outputs.

The engine part (--repeats-engine > 0): one float32 LLMEngine, 1 thread, whose layers' prefill attention is
swapped between the two paths, repeats alternating: a cold --prompt-len-token prompt and a hit (its first
prompt_len - tail_len tokens cached, --tail-len computed), median ms of each.

    python -m pdcluster.bench.prefix_attention --out bench/prefix-attention.json --plot bench/prefix-attention.png
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys

import torch

from pdcluster.bench import outputs
from pdcluster.bench.cpu_attention import add_shape_args, random_caches, side_by_side


def engine_part(prompt_len: int, tail_len: int, repeats: int) -> dict:
    """Median ms of a cold prompt and of a prefix hit on one engine, each path in turn."""
    import pdcluster.engine.llama as llama
    from pdcluster.bench.prefill_position import first_token_ms
    from pdcluster.engine import attention
    from pdcluster.engine.llm_engine import LLMEngine, build_config
    from pdcluster.engine.sampling_params import SamplingParams
    torch.set_num_threads(1)
    eng = LLMEngine(build_config(num_threads=1, speculative="off"))
    eng.warmup()
    rng = random.Random(0)
    sp = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    fresh = lambda n: [rng.randrange(1000, 40000) for _ in range(n)]                   # noqa: E731

    def run(ids: list[int]) -> float:
        return first_token_ms(eng, ids, sp)
    sides = {"torch": attention.prefill_attention_sdpa, "op": attention.prefill_attention}
    prefix = fresh(prompt_len - tail_len)
    run(prefix + fresh(tail_len))                                       # caches the prefix
    times = {s: {"cold_ms": [], "hit_ms": []} for s in sides}
    try:
        for _ in range(repeats):
            for side, fn in sides.items():
                llama.prefill_attention = fn
                times[side]["cold_ms"].append(run(fresh(prompt_len)))
                times[side]["hit_ms"].append(run(prefix + fresh(tail_len)))
    finally:
        llama.prefill_attention = attention.prefill_attention
    med = {s: {k: statistics.median(v) for k, v in t.items()} for s, t in times.items()}
    ratio = {k: med["torch"][k] / med["op"][k] for k in ("cold_ms", "hit_ms")}
    print(f"engine, {prompt_len}-token prompts (hit: {tail_len} computed), median of {repeats}:")
    for side in sides:
        print(f"{side:6} cold {med[side]['cold_ms']:9.1f} ms  hit {med[side]['hit_ms']:8.1f} ms")
    print(f"ratio  cold {ratio['cold_ms']:8.2f}x     hit {ratio['hit_ms']:7.2f}x  (torch / op)")
    return dict(runs=times, median=med, ratio=ratio)


def plot(result: dict, path: str) -> None:
    """torch / op per layer call against the context, one line per chunk size, and the engine's two ratios."""
    from matplotlib.figure import Figure

    from pdcluster.bench.plots import ratio_bars
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    ax, ax2 = fig.subplots(1, 2, width_ratios=(2, 1))
    for q in sorted({r["rows"] for r in result["calls"] if r["rows"] < r["ctx"]}):
        rs = [r for r in result["calls"] if r["rows"] == q and r["rows"] < r["ctx"]]
        ax.plot([r["ctx"] for r in rs], [r["ratio"] for r in rs], marker="o", label=f"{q} rows over a cached prefix")
    whole = [r for r in result["calls"] if r["rows"] == r["ctx"]]
    if whole:
        ax.plot([r["ctx"] for r in whole], [r["ratio"] for r in whole], marker="s", ls="--", label="whole prompt")
    ax.axhline(1.0, color="grey", lw=1)
    ax.set(xscale="log", xlabel="positions attended", ylabel="torch time / op time",
           title="prefill attention per layer call (SmolLM2-135M heads, float32, 1 thread)")
    ax.legend()
    ax.grid(alpha=0.3)
    if result.get("engine"):
        ratio_bars(ax2, result["engine"]["ratio"], "engine: torch / op")
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    from pdcluster.deploy.cli import HelpFormatter
    from pdcluster.bench.outputs import Listed
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--chunks", type=int, nargs="+", default=Listed([8, 24, 96, 256]), help="new rows of the chunk")
    ap.add_argument("--contexts", type=int, nargs="+", default=Listed([408, 1024, 3000]),
                    help="positions attended: cached prefix + the chunk")
    ap.add_argument("--whole", type=int, nargs="*", default=Listed([408, 1024, 2048]),
                    help="whole prompts (no cached prefix) of these lengths too")
    add_shape_args(ap, blocks=4096, threads=1, calls=10)               # 1 thread: a serving worker's default
    ap.add_argument("--repeats-engine", type=int, default=8, help="engine part: repeats, paths alternating (0: skip)")
    ap.add_argument("--prompt-len", type=int, default=408, help="engine part: prompt tokens")
    ap.add_argument("--tail-len", type=int, default=24, help="engine part: tokens computed after a cached prefix")
    outputs.add_args(ap)
    a = ap.parse_args(argv)
    if outputs.replotted(a, plot, "bench/prefix-attention.png"):
        return 0
    from pdcluster.engine import attention
    setup = random_caches(a)
    if setup is None:
        return 1
    g, kc, vc = setup
    bs, D = 16, a.head_dim
    print(f"float32, {a.heads} heads over {a.kv_heads} KV heads of {D}, {a.threads} threads")
    print(f"{'rows':>5} {'ctx':>5} {'torch us':>10} {'op us':>9} {'ratio':>7} {'max |diff|':>11}")
    calls = []
    shapes = [(q, n) for q in a.chunks for n in a.contexts if q < n] + [(n, n) for n in a.whole]
    for q_len, n in shapes:
        W = -(-n // bs)
        if W > a.blocks:
            print(f"{q_len:>5} {n:>5}  (needs {W} blocks; raise --blocks)")
            continue
        seq = attention.PrefillSeq(0, q_len, n, torch.randperm(a.blocks, generator=g)[:W])
        q = torch.randn(q_len, a.heads, D, generator=g)
        k, v = torch.randn(q_len, a.kv_heads, D, generator=g), torch.randn(q_len, a.kv_heads, D, generator=g)
        slots = torch.stack([seq.block_table[t // bs] * bs + t % bs for t in range(n - q_len, n)])
        attention.store_kv(k, v, kc, vc, slots)                         # the chunk's own K/V, as a step stores it
        ref = lambda: attention.prefill_attention_sdpa(q, k, v, kc, vc, seq, D ** -0.5)    # noqa: E731
        op = lambda: attention.prefill_attention(q, k, v, kc, vc, seq, D ** -0.5)          # noqa: E731
        r, o, diff = side_by_side(ref, op, a.calls, a.repeats)
        print(f"{q_len:>5} {n:>5} {r:>10.1f} {o:>9.1f} {r / o:>6.2f}x {diff:>11.2e}")
        calls.append(dict(rows=q_len, ctx=n, torch_us=r, op_us=o, ratio=r / o, max_diff=diff))
    result = dict(threads=a.threads, calls=calls,
                  engine=engine_part(a.prompt_len, a.tail_len, a.repeats_engine) if a.repeats_engine else None)
    outputs.save(a, result, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
