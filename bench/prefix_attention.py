"""A prefill chunk's attention over a cached prefix on CPU, per layer call: the chunk's rows as causal decode rows
through pdcluster::paged_decode_attention (K/V read in place) against the gathered copy + causal-masked SDPA,
in the same process, alternated. Picks engine/attention.py's PAGED_PREFILL_MAX_SCORES.

    python -m pdcluster.bench.prefix_attention --chunks 24 64 --contexts 408 1024 3000

SmolLM2-135M's attention shape by default (9 query heads over 3 KV heads of 64), float32, blocks of 16 scattered
at random in a cache of --blocks blocks. A chunk of q rows over a context of n positions: n - q cached before it.
Prints microseconds per call (best of --repeats runs of --calls calls), their ratio (> 1: the paged rows are
faster), whether the engine takes the paged rows there (q * n <= PAGED_PREFILL_MAX_SCORES), and the largest
difference between the two outputs.
"""
from __future__ import annotations

import argparse
import sys

import torch

from pdcluster.bench.cpu_attention import _best, add_shape_args


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--chunks", type=int, nargs="+", default=[8, 24, 48, 96], help="new rows of the chunk")
    ap.add_argument("--contexts", type=int, nargs="+", default=[408, 1024, 2048, 3000],
                    help="positions attended: cached prefix + the chunk")
    add_shape_args(ap, blocks=4096, threads=1, calls=20)               # 1 thread: a serving worker's default
    a = ap.parse_args(argv)
    from pdcluster.engine import attention, cpu_ext
    if not cpu_ext.available():
        print("pdcluster's CPU ops are not built on this host (see the log): nothing to compare")
        return 1
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    bs, D, bound = 16, a.head_dim, attention.PAGED_PREFILL_MAX_SCORES
    kc = torch.randn(a.blocks, bs, a.kv_heads, D, generator=g)
    vc = torch.randn(a.blocks, bs, a.kv_heads, D, generator=g)
    print(f"float32, {a.heads} heads over {a.kv_heads} KV heads of {D}, {a.threads} threads; "
          f"PAGED_PREFILL_MAX_SCORES = {bound}")
    print(f"{'rows':>5} {'ctx':>5} {'gather+SDPA us':>15} {'paged us':>9} {'ratio':>7} {'engine':>7} {'max |diff|':>11}")
    for q_len in a.chunks:
        for n in a.contexts:
            W = -(-n // bs)
            if q_len >= n or W > a.blocks:
                continue
            seq = attention.PrefillSeq(0, q_len, n, torch.randperm(a.blocks, generator=g)[:W])
            q = torch.randn(q_len, a.heads, D, generator=g)
            k, v = torch.randn(q_len, a.kv_heads, D, generator=g), torch.randn(q_len, a.kv_heads, D, generator=g)
            slots = torch.stack([seq.block_table[t // bs] * bs + t % bs for t in range(n - q_len, n)])
            attention.store_kv(k, v, kc, vc, slots)

            def run(limit: int) -> torch.Tensor:
                attention.PAGED_PREFILL_MAX_SCORES = limit
                return attention.prefill_attention(q, k, v, kc, vc, seq, D ** -0.5)
            sdpa, paged = (lambda: run(0)), (lambda: run(q_len * n))      # noqa: E731
            diff = (sdpa() - paged()).abs().max().item()
            t_s, t_p = [], []
            for _ in range(a.repeats):                                  # alternate, so drift hits both
                t_s.append(_best(sdpa, a.calls, 1))
                t_p.append(_best(paged, a.calls, 1))
            s, p = min(t_s), min(t_p)
            took = "paged" if q_len * n <= bound else "SDPA"
            print(f"{q_len:>5} {n:>5} {s:>15.1f} {p:>9.1f} {s / p:>6.2f}x {took:>7} {diff:>11.2e}")
    attention.PAGED_PREFILL_MAX_SCORES = bound
    return 0


if __name__ == "__main__":
    sys.exit(main())
