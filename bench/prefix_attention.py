"""A prefill chunk's attention on CPU, per layer call: pdcluster::paged_chunk_attention (kernels/prefill_attention.cpp,
K/V read in place) against the torch path it replaces (a cached prefix gathered into a copy, K/V repeated per query
head, SDPA with a causal mask; a whole prompt straight to causal SDPA), in the same process, alternated.

    python -m pdcluster.bench.prefix_attention --chunks 24 64 --contexts 408 1024 3000

SmolLM2-135M's attention shape by default (9 query heads over 3 KV heads of 64), float32, blocks of 16 scattered
at random in a cache of --blocks blocks. A chunk of q rows over a context of n positions: n - q cached before it
(n = q: a whole prompt; add --whole for those). Prints microseconds per call (best of --repeats runs of --calls
calls), their ratio (> 1: the op is faster) and the largest difference between the two outputs.
"""
from __future__ import annotations

import argparse
import sys

import torch

from pdcluster.bench.cpu_attention import add_shape_args, side_by_side


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--chunks", type=int, nargs="+", default=[8, 24, 96, 256], help="new rows of the chunk")
    ap.add_argument("--contexts", type=int, nargs="+", default=[408, 1024, 3000],
                    help="positions attended: cached prefix + the chunk")
    ap.add_argument("--whole", type=int, nargs="*", default=[408, 1024, 2048],
                    help="whole prompts (no cached prefix) of these lengths too")
    add_shape_args(ap, blocks=4096, threads=1, calls=10)               # 1 thread: a serving worker's default
    a = ap.parse_args(argv)
    from pdcluster.engine import attention, cpu_ext
    if not cpu_ext.available():
        print("pdcluster's CPU ops are not built on this host (see the log): nothing to compare")
        return 1
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    bs, D = 16, a.head_dim
    kc = torch.randn(a.blocks, bs, a.kv_heads, D, generator=g)
    vc = torch.randn(a.blocks, bs, a.kv_heads, D, generator=g)
    print(f"float32, {a.heads} heads over {a.kv_heads} KV heads of {D}, {a.threads} threads")
    print(f"{'rows':>5} {'ctx':>5} {'torch us':>10} {'op us':>9} {'ratio':>7} {'max |diff|':>11}")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
