"""Decode steps replayed as CUDA graphs (the Triton backend on CUDA; vLLM's default, its --enforce-eager off).

Why: a decode step is ~10 kernel launches per layer plus Python around each; at small batches the GPU
waits on the host (bench/RESULTS.md: ~19 ms a step for a 135M model whose weights read in 0.1 ms).
Captured once per batch-size bucket at engine start, a step is one host->device copy and one replay.

Static inputs: one flat int64 device buffer, segments of Bmax rows each (tables Bmax x W),
    [ ids | positions | slots | seq_lens | block tables (row-major) ]
with a pinned host twin. A bucket b reads the first b rows of each segment (contiguous views), so a
step copies the buffer's prefix up to the end of its b table rows. W = cdiv(max_model_len, block_size).

Rows past the batch (padding up to the bucket) decode token 0 at position 0 into the scratch block
(a KV block the block pool never hands out: the runner allocates one past the pool) and attend to
that one position, so they touch no request's KV. A table row's entries past its sequence's blocks
are never read (the kernel stops at seq_lens), so they are left as they were.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from pdcluster.engine.attention import AttnMeta

ID, POS, SLOT, LEN = range(4)          # segment order in the flat buffer; tables follow


def batch_buckets(max_num_seqs: int, cap: int = 256) -> tuple[int, ...]:
    """Captured batch sizes: 1, 2, 4, 8, then every 16 up to min(max_num_seqs, cap), which is always one."""
    top = max(1, min(max_num_seqs, cap))
    out = {b for b in (1, 2, 4, 8) if b < top} | set(range(16, top, 16)) | {top}
    return tuple(sorted(out))


def bucket_for(buckets: tuple[int, ...], n: int) -> int | None:
    """The smallest bucket holding n rows; None when n exceeds the largest (that step runs eagerly)."""
    for b in buckets:
        if b >= n:
            return b
    return None


def pure_decode(reqs, num_new_tokens) -> bool:
    """Every request decodes one token after a computed context, with no drafts to verify."""
    return all(n == 1 and r.num_computed_tokens > 0 and not r.spec_token_ids
               for r, n in zip(reqs, num_new_tokens))


def fill_inputs(host: np.ndarray, bmax: int, width: int, b: int, reqs, block_size: int, scratch: int) -> int:
    """Write a pure-decode batch into the host buffer's first b rows (padding rows past len(reqs));
    returns how many int64 elements from the buffer's start the step must copy to the device."""
    seg = host[:4 * bmax].reshape(4, bmax)
    tables = host[4 * bmax:].reshape(bmax, width)
    for i, r in enumerate(reqs):
        t = r.num_computed_tokens                       # the new token's position
        blocks = r.block_ids
        seg[ID, i] = r.token_ids[t]
        seg[POS, i] = t
        seg[SLOT, i] = blocks[t // block_size] * block_size + t % block_size
        seg[LEN, i] = t + 1
        tables[i, :len(blocks)] = blocks
    n = len(reqs)
    seg[ID, n:b] = 0
    seg[POS, n:b] = 0
    seg[SLOT, n:b] = scratch * block_size
    seg[LEN, n:b] = 1
    tables[n:b, 0] = scratch
    return 4 * bmax + b * width


class DecodeGraphs:
    """One captured forward pass per bucket over the runner's KV caches. `run` returns the final hidden
    states [len(reqs), E] of a pure-decode batch (the caller takes logits and samples eagerly)."""

    def __init__(self, forward: Callable, k_caches, v_caches, *, buckets: tuple[int, ...], block_size: int,
                 max_blocks: int, scratch_block: int, device: str):
        self.buckets, self.bs, self.scratch = buckets, block_size, scratch_block
        self.bmax, self.width = buckets[-1], max_blocks
        n = 4 * self.bmax + self.bmax * self.width
        self.dev = torch.zeros(n, dtype=torch.int64, device=device)
        self.host_t = torch.zeros(n, dtype=torch.int64, pin_memory=True)
        self.host = self.host_t.numpy()
        self.copied = torch.cuda.Event()
        self.replays = 0                                  # steps served by a graph (tests, stats)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._capture(forward, k_caches, v_caches)

    def _views(self, b: int):
        seg = self.dev[:4 * self.bmax].view(4, self.bmax)
        tables = self.dev[4 * self.bmax:4 * self.bmax + b * self.width].view(b, self.width)
        meta = AttnMeta(seg[SLOT, :b], [], 0, tables, seg[LEN, :b], None)
        return seg[ID, :b], seg[POS, :b], meta

    @torch.inference_mode()
    def _capture(self, forward, k_caches, v_caches) -> None:
        """Largest bucket first, all graphs in one memory pool. Each bucket runs once eagerly first, on a
        side stream: Triton compiles its kernels for that shape there, never inside a capture."""
        n = fill_inputs(self.host, self.bmax, self.width, self.bmax, [], self.bs, self.scratch)
        self.dev[:n].copy_(self.host_t[:n])
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for b in reversed(self.buckets):
                forward(*self._views(b), k_caches, v_caches)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        pool = None
        for b in reversed(self.buckets):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                out = forward(*self._views(b), k_caches, v_caches)
            pool = g.pool()
            self.graphs[b] = (g, out)
        torch.cuda.synchronize()

    def bucket(self, n: int) -> int | None:
        return bucket_for(self.buckets, n)

    def run(self, reqs) -> torch.Tensor:
        b = self.bucket(len(reqs))
        self.copied.synchronize()                         # the last step's copy has read the host buffer
        n = fill_inputs(self.host, self.bmax, self.width, b, reqs, self.bs, self.scratch)
        self.dev[:n].copy_(self.host_t[:n], non_blocking=True)
        self.copied.record()
        g, out = self.graphs[b]
        g.replay()
        self.replays += 1
        return out[:len(reqs)]
