"""Moving KV blocks between the device pool's caches and host memory, for the cache tiers
(kv_transfer/tiers/connector.py). Per-layer caches are [num_blocks, block_size, kv_heads, head_dim];
a block below the device is [2L, block_size, kv_heads, head_dim] (K of layers 0..L-1, then V).

On a GPU the loads run on a copy stream of their own from pinned memory; `after` (a CUDA event
recorded on the compute stream) orders a load after the work queued before it (an evicted block's
copy-out, say), and write_layers records one event per layer on the copy stream, which the compute
stream waits on (the engine thread does not). On a CPU every copy is done when the call returns.
"""
from __future__ import annotations

from typing import Callable

import torch


class DeviceCopier:
    def __init__(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]):
        self.k, self.v = k_caches, v_caches
        self.device = k_caches[0].device
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @property
    def cuda(self) -> bool:
        return self.stream is not None

    def copy_out(self, block_ids: list[int], shape: tuple[int, int, int, int], dtype: torch.dtype):
        """Blocks' KV -> staging [2L, n, bs, h, d] on the host (shape: one block's [2L, bs, h, d]); a
        CUDA event to wait on before reading it (GPU: the copy is queued on the compute stream, so it
        runs before the step that overwrites the blocks), or None (CPU: copied already)."""
        staging = torch.empty((shape[0], len(block_ids), *shape[1:]), dtype=dtype, pin_memory=self.cuda)
        idx = torch.tensor(block_ids, dtype=torch.int64, device=self.device)
        for i, cache in enumerate(self.k + self.v):
            if self.cuda:
                staging[i].copy_(cache.index_select(0, idx), non_blocking=True)
            else:
                torch.index_select(cache, 0, idx, out=staging[i])
        if not self.cuda:
            return staging, None
        ev = torch.cuda.Event()
        ev.record()
        return staging, ev

    def write_blocks(self, block_ids: list[int], blocks: list[torch.Tensor], after=None) -> None:
        """blocks[i] [2L, bs, h, d] (host) -> device block block_ids[i] of every layer's K and V; done on return."""
        stacked = torch.stack(blocks, dim=1)                     # [2L, n, bs, h, d]
        idx = torch.tensor(block_ids, dtype=torch.int64)
        if self.cuda:
            if after is not None:
                self.stream.wait_event(after)
            with torch.cuda.stream(self.stream):
                src = stacked.pin_memory().to(self.device, non_blocking=True)
                idx = idx.to(self.device, non_blocking=True)
                for i, cache in enumerate(self.k + self.v):
                    cache.index_copy_(0, idx, src[i])
            self.stream.synchronize()
            return
        for i, cache in enumerate(self.k + self.v):
            cache.index_copy_(0, idx, stacked[i])

    def write_layers(self, block_ids: list[int], blocks: list[torch.Tensor], after,
                     layer_done: Callable[[int, object], None], cancelled: Callable[[], bool]) -> bool:
        """As write_blocks, layer after layer (K then V of layer l for every block); after each,
        layer_done(l, its CUDA event or None). False if cancelled() turned true first. On a GPU the
        copies are complete on return (the pinned sources outlive them)."""
        num_layers = len(self.k)
        idx = torch.tensor(block_ids, dtype=torch.int64, device=self.device)
        if self.cuda and after is not None:
            self.stream.wait_event(after)
        for layer in range(num_layers):
            if cancelled():
                return False
            for row, cache in ((layer, self.k[layer]), (num_layers + layer, self.v[layer])):
                if self.cuda:
                    src = torch.empty((len(blocks), *blocks[0].shape[1:]), dtype=blocks[0].dtype, pin_memory=True)
                    torch.stack([b[row] for b in blocks], out=src)
                    with torch.cuda.stream(self.stream):
                        cache.index_copy_(0, idx, src.to(self.device, non_blocking=True))
                else:
                    cache.index_copy_(0, idx, torch.stack([b[row] for b in blocks]))
            ev = None
            if self.cuda:
                ev = torch.cuda.Event()
                ev.record(self.stream)
            layer_done(layer, ev)
        if self.cuda:
            self.stream.synchronize()
        return True
