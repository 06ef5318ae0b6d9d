"""The host-memory tier's storage: `capacity` block-sized slots (kv_transfer/tiers/block_format.py).

    data    [capacity, 2L, block_size, kv_heads, head_dim]   stored dtype (the cache's, or int8/fp8)
    scales  [capacity, 2L, kv_heads]                         float32, quantizing codecs only
On a CPU host both are fresh calloc'd pages (numpy): capacity costs nothing until a slot is written.
With `pin` (a GPU host) they are page-locked, so loads into the device pool are async DMA copies.
Which slot holds which block is the TierIndex's business; this class only moves bytes.
"""
from __future__ import annotations

import numpy as np
import torch

from pdcluster.kv_transfer.tiers.block_format import Geometry, decode, encode


def _host_zeros(shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> torch.Tensor:
    if pin:
        return torch.zeros(shape, dtype=dtype, pin_memory=True)
    raw = np.zeros(shape[:-1] + (shape[-1] * dtype.itemsize,), dtype=np.uint8)   # calloc: lazy pages
    return torch.from_numpy(raw).view(dtype)


class HostPool:
    def __init__(self, geom: Geometry, capacity: int, pin: bool = False):
        self.geom, self.capacity = geom, capacity
        self.data = _host_zeros((capacity, *geom.shape), geom.stored_dtype, pin)
        self.scales = None if geom.codec == "none" else \
            _host_zeros((capacity, 2 * geom.num_layers, geom.kv_heads), torch.float32, pin)

    def put(self, slot: int, data: torch.Tensor, scales: torch.Tensor | None) -> None:
        """Store an encoded block (block_format.encode's output) in `slot`."""
        self.data[slot].copy_(data)
        if scales is not None:
            self.scales[slot].copy_(scales)

    def put_kv(self, slot: int, kv: torch.Tensor) -> None:
        """Store kv [2L, bs, h, d] (cache dtype) in `slot`, encoding it."""
        self.put(slot, *encode(self.geom, kv))

    def get(self, slot: int) -> torch.Tensor:
        """Slot's block as [2L, bs, h, d] in the cache dtype: a view of the pool for codec none (valid
        while the slot is pinned), a new tensor otherwise."""
        return decode(self.geom, self.data[slot], None if self.scales is None else self.scales[slot])

    def encoded(self, slot: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Slot's stored bytes as (data, scales) views: what the disk tier writes."""
        return self.data[slot], None if self.scales is None else self.scales[slot]
