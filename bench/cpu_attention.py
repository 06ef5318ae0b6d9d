"""Decode attention on CPU per call: pdcluster::paged_decode_attention (kernels/decode_attention.cpp, K/V read in
place through the block table) against the torch path it replaces (gather the rows' blocks, then SDPA with a mask),
in the same process, alternated.

    python -m pdcluster.bench.cpu_attention --batches 1 32 --lens 128 256 512

SmolLM2-135M's attention shape by default (9 query heads over 3 KV heads of 64), float32, a cache of --blocks
blocks of 16 with each row's blocks scattered at random, as a serving pool's are. Prints microseconds per call
(best of --repeats runs of --calls calls) and their ratio (> 1: the op is faster), and whether the two agree.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch


def _best(f, calls: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            f()
        best = min(best, (time.perf_counter() - t) / calls)
    return best * 1e6


def side_by_side(ref, op, calls: int, repeats: int) -> tuple[float, float, float]:
    """Microseconds per call of ref and of op (best of `repeats` runs each, alternated so that drift hits both) and
    the largest difference between their outputs."""
    diff = (ref() - op()).abs().max().item()
    t_ref, t_op = [], []
    for _ in range(repeats):
        t_ref.append(_best(ref, calls, 1))
        t_op.append(_best(op, calls, 1))
    return min(t_ref), min(t_op), diff


def random_caches(a) -> tuple[torch.Generator, torch.Tensor, torch.Tensor] | None:
    """For parsed add_shape_args flags: torch's threads set, a seeded generator and random float32 K and V caches
    [blocks, 16, kv_heads, head_dim]; None (said why) where pdcluster's CPU ops did not build."""
    from pdcluster.engine import cpu_ext
    if not (cpu_ext.has("paged_decode_attention") and cpu_ext.has("paged_chunk_attention")):
        print("pdcluster's CPU attention ops are not built on this host (see the log): nothing to compare")
        return None
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    kc = torch.randn(a.blocks, 16, a.kv_heads, a.head_dim, generator=g)
    vc = torch.randn(a.blocks, 16, a.kv_heads, a.head_dim, generator=g)
    return g, kc, vc


def add_shape_args(ap: argparse.ArgumentParser, blocks: int, threads: int, calls: int) -> None:
    """The attention shape (SmolLM2-135M's by default), the cache size and the timing flags both CPU attention
    benches take."""
    ap.add_argument("--heads", type=int, default=9, help="query heads")
    ap.add_argument("--kv-heads", type=int, default=3, help="KV heads")
    ap.add_argument("--head-dim", type=int, default=64, help="head size")
    ap.add_argument("--blocks", type=int, default=blocks, help="blocks of 16 in the cache (its size: the rows' "
                    "blocks are scattered in it)")
    ap.add_argument("--threads", type=int, default=threads, help="torch threads")
    ap.add_argument("--calls", type=int, default=calls, help="calls per timed run")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per side (best reported)")


def main(argv=None) -> int:
    from pdcluster.deploy.cli import HelpFormatter
    from pdcluster.bench.outputs import Listed
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=Listed([1, 8, 32]), help="decode rows per call")
    ap.add_argument("--lens", type=int, nargs="+", default=Listed([128, 256, 512]),
                    help="positions each row attends to")
    add_shape_args(ap, blocks=8192, threads=2, calls=200)
    a = ap.parse_args(argv)
    from pdcluster.engine.attention import decode_attention
    setup = random_caches(a)
    if setup is None:
        return 1
    g, kc, vc = setup
    bs, D = 16, a.head_dim
    print(f"float32, {a.heads} heads over {a.kv_heads} KV heads of {D}, cache {kc.nbytes * 2 / 2**20:.0f} MiB, "
          f"{a.threads} threads")
    print(f"{'rows':>5} {'len':>5} {'gather+SDPA us':>15} {'op us':>8} {'ratio':>7} {'max |diff|':>11}")
    for B in a.batches:
        for n in a.lens:
            W = -(-n // bs)
            if B * W > a.blocks:
                print(f"{B:>5} {n:>5}  (needs {B * W} blocks; raise --blocks)")
                continue
            q = torch.randn(B, a.heads, D, generator=g)
            tables = torch.randperm(a.blocks, generator=g)[:B * W].view(B, W)
            lens = torch.full((B,), n, dtype=torch.int64)
            mask = (torch.arange(W * bs)[None] < lens[:, None]).view(B, 1, 1, W * bs)
            ref = lambda: decode_attention(q, kc, vc, tables, mask, D ** -0.5)            # noqa: E731 (no seq_lens)
            op = lambda: decode_attention(q, kc, vc, tables, mask, D ** -0.5, lens)       # noqa: E731
            r, o, diff = side_by_side(ref, op, a.calls, a.repeats)
            print(f"{B:>5} {n:>5} {r:>15.1f} {o:>8.1f} {r / o:>6.2f}x {diff:>11.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
