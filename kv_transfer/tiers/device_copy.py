"""Moving KV blocks between the device pool's caches and host memory, for the cache tiers
(kv_transfer/tiers/connector.py). Per-layer caches are [num_blocks, block_size, kv_heads, head_dim];
a block below the device is [2L, block_size, kv_heads, head_dim] (K of layers 0..L-1, then V).

On a GPU the loads run on a copy stream of their own from pinned memory; `after` (a CUDA event
recorded on the compute stream) orders a load after the work queued before it (an evicted block's
copy-out, say), and write_layers records one event per layer on the copy stream, which the compute
stream waits on (the engine thread does not). On a CPU every copy is done when the call returns.

A quantized pool (engine/kv_quant.py QuantKV) moves as it is: a block below is then the pair
(codes [2L, bs, h, d], scales [2L, h]) of block_format's codec, and staging likewise holds both.
"""
from __future__ import annotations

from typing import Callable

import torch

from pdcluster.engine.kv_quant import QuantKV


def _planes(caches: list) -> list[torch.Tensor]:
    """The tensors a copy moves, per cache layer row: the cache itself, or a QuantKV's codes."""
    return [c.data if isinstance(c, QuantKV) else c for c in caches]


class DeviceCopier:
    def __init__(self, k_caches: list, v_caches: list):
        self.native = isinstance(k_caches[0], QuantKV)
        self.k, self.v = k_caches, v_caches                      # the engine's lists, read at each copy
        self.device = self.rows[0].device
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @property
    def rows(self) -> list[torch.Tensor]:
        """2L tensors [num_blocks, bs, h, d]: K of layers 0..L-1, then V (a quantized pool's codes)."""
        return _planes(self.k + self.v)

    @property
    def scales(self) -> list[torch.Tensor] | None:
        """A quantized pool's 2L scale tensors [num_blocks, h], in the rows' order; None otherwise."""
        return [c.scale for c in self.k + self.v] if self.native else None

    @property
    def cuda(self) -> bool:
        return self.stream is not None

    def copy_out(self, block_ids: list[int], shape: tuple[int, int, int, int]):
        """Blocks' KV -> staging [2L, n, bs, h, d] on the host in the cache's dtype (shape: one block's
        [2L, bs, h, d]; native: (codes, scales [2L, n, h])); a
        CUDA event to wait on before reading it (GPU: the copy is queued on the compute stream, so it
        runs before the step that overwrites the blocks), or None (CPU: copied already)."""
        idx = torch.tensor(block_ids, dtype=torch.int64, device=self.device)
        planes = self.rows
        staging = self._gather(planes, idx, (shape[0], len(block_ids), *shape[1:]), planes[0].dtype)
        if self.native:       # (codes [2L, n, bs, h, d], scales [2L, n, h])
            staging = (staging, self._gather(self.scales, idx, (shape[0], len(block_ids), shape[2]), torch.float32))
        if not self.cuda:
            return staging, None
        ev = torch.cuda.Event()
        ev.record()
        return staging, ev

    def _gather(self, planes: list[torch.Tensor], idx: torch.Tensor, shape, dtype) -> torch.Tensor:
        """planes[i][idx] into staging[i] on the host (pinned on a GPU host; queued on the compute stream)."""
        staging = torch.empty(shape, dtype=dtype, pin_memory=self.cuda)
        for i, plane in enumerate(planes):
            if self.cuda:
                staging[i].copy_(plane.index_select(0, idx), non_blocking=True)
            else:
                torch.index_select(plane, 0, idx, out=staging[i])
        return staging

    def _targets(self, rows: list[int]):
        """(plane, its scales or None) for each row index (0..2L-1: K of layers 0..L-1, then V)."""
        planes, scales = self.rows, self.scales
        return [(planes[r], scales[r] if scales is not None else None) for r in rows]

    def write_blocks(self, block_ids: list[int], blocks: list, after=None) -> None:
        """blocks[i] [2L, bs, h, d] (host; native: (codes, scales) pairs) -> device block block_ids[i] of
        every layer's K and V; done on return."""
        codes, scales = self._stack(blocks)                     # [2L, n, bs, h, d], [2L, n, h] or None
        idx = torch.tensor(block_ids, dtype=torch.int64)
        if self.cuda:
            if after is not None:
                self.stream.wait_event(after)
            with torch.cuda.stream(self.stream):
                codes = codes.pin_memory().to(self.device, non_blocking=True)
                scales = scales.pin_memory().to(self.device, non_blocking=True) if scales is not None else None
                idx = idx.to(self.device, non_blocking=True)
                self._put(range(2 * len(self.k)), idx, codes, scales)
            self.stream.synchronize()
            return
        self._put(range(2 * len(self.k)), idx, codes, scales)

    def _stack(self, blocks: list):
        """The blocks stacked: (codes [2L, n, ...], scales [2L, n, h] or None)."""
        if self.native:
            return torch.stack([b[0] for b in blocks], dim=1), torch.stack([b[1] for b in blocks], dim=1)
        return torch.stack(blocks, dim=1), None

    def _put(self, rows, idx: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor | None) -> None:
        """codes[j] (and scales[j]) into the device rows `rows` at blocks idx (j = position in rows)."""
        for j, (plane, sc) in enumerate(self._targets(list(rows))):
            src = codes[j]
            if plane.dtype == torch.float8_e4m3fn:          # (no CPU index_copy_ for fp8: move the bytes)
                plane, src = plane.view(torch.uint8), src.view(torch.uint8)
            plane.index_copy_(0, idx, src)
            if sc is not None:
                sc.index_copy_(0, idx, scales[j])

    def write_layers(self, block_ids: list[int], layer_rows: Callable[[int], list], after,
                     layer_done: Callable[[int, object], None], cancelled: Callable[[], bool]) -> bool:
        """As write_blocks, layer after layer: layer_rows(l) gives every block's rows l and L + l (K and
        V of layer l), stacked: (codes [2, n, bs, h, d] host tensor in the cache's dtype, or a native
        pool's codes, scales [2, n, h] or None), written to block_ids; after each layer, layer_done(l, its CUDA event or None). False if
        cancelled() turned true first. An exception from layer_rows(l) stops the copy there (layers
        before l are written, none after) and propagates. On a GPU the copies are complete on return
        (the sources outlive them)."""
        num_layers = len(self.k)
        idx = torch.tensor(block_ids, dtype=torch.int64, device=self.device)
        if self.cuda and after is not None:
            self.stream.wait_event(after)
        try:
            for layer in range(num_layers):
                if cancelled():
                    return False
                rows, row_scales = layer_rows(layer)
                for j, row in enumerate((layer, num_layers + layer)):
                    codes, scales = rows[j], row_scales[j] if row_scales is not None else None   # [n, bs, h, d], [n, h]
                    if self.cuda:
                        codes, scales = codes.pin_memory(), scales.pin_memory() if scales is not None else None
                        with torch.cuda.stream(self.stream):
                            self._put([row], idx, codes.to(self.device, non_blocking=True)[None],
                                      scales.to(self.device, non_blocking=True)[None] if scales is not None else None)
                    else:
                        self._put([row], idx, codes[None], scales[None] if scales is not None else None)
                ev = None
                if self.cuda:
                    ev = torch.cuda.Event()
                    ev.record(self.stream)
                layer_done(layer, ev)
        finally:
            if self.cuda:
                self.stream.synchronize()
        return True
