"""Read cached blocks by chain hash: the holder's half of a peer pull (kv_transfer/pull.py).

`read_blocks(engine, hashes)` runs on the engine thread, between steps: it looks each hash up in
the device pool's prefix cache and copies those blocks of every layer to host memory in one
index_select per layer and cache (K, V). Between steps no block can be evicted or rewritten, so the
copy needs no hold on the blocks; once it returns the engine steps on and the copy is sent from a
transport thread. Cost on the engine thread: one gather of n blocks x num_layers x 2 (the bytes the
pull sends), nothing per token.

`read_device_blocks` is the partial form: the blocks the device pool holds, and which of the hashes
those are; the holder's lower cache tiers (host, disk) read the rest off the engine thread
(kv_transfer/pull.py serve_pull, kv_transfer/tiers TierConnector.read_blocks), so a disk read never
stalls a step. `read_blocks` is all-or-nothing: None when any hash is missing (evicted), so a pull
never lands a partial prefix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pdcluster.engine.kv_quant import gather_blocks

if TYPE_CHECKING:
    from pdcluster.engine.llm_engine import LLMEngine


@dataclass(frozen=True)
class ReadBlocks:
    """Host copies of n blocks: k[layer], v[layer] are [n, block_size, num_kv_heads, head_dim]."""
    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @property
    def num_blocks(self) -> int:
        return self.k[0].shape[0] if self.k else 0


def read_device_blocks(engine: LLMEngine, hashes: list[int]) -> tuple[list[int], ReadBlocks | None]:
    """(positions i in `hashes` whose block the device pool caches, ascending; host copies of those
    blocks in that order, None when there are none). Chain hashes are salted: a tenant names only
    its own. Engine thread only."""
    if not hashes:
        raise ValueError("no block hashes to read")
    pool = engine.kv.pool
    found = [(i, b.block_id) for i, h in enumerate(hashes) if (b := pool.lookup(h)) is not None]
    if not found:
        return [], None
    k_caches, v_caches = engine.kv_caches()
    ids = torch.tensor([b for _, b in found], dtype=torch.int64, device=k_caches[0].device)
    # a quantized pool's blocks leave dequantized (the transfer's codec encodes them again)
    return [i for i, _ in found], ReadBlocks([gather_blocks(k, ids, k.dtype).cpu() for k in k_caches],
                                             [gather_blocks(v, ids, v.dtype).cpu() for v in v_caches])


def read_blocks(engine: LLMEngine, hashes: list[int]) -> ReadBlocks | None:
    """The blocks cached under `hashes`, copied to host; None if any is not in the device pool.
    Engine thread only."""
    found, blocks = read_device_blocks(engine, hashes)
    return blocks if len(found) == len(hashes) else None
