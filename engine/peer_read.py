"""Read cached blocks by chain hash: the holder's half of a peer pull (kv_transfer/pull.py).

`read_blocks(engine, hashes)` runs on the engine thread, between steps: it looks each hash up in
the device pool's prefix cache and copies those blocks of every layer to host memory in one
index_select per layer and cache (K, V). Between steps no block can be evicted or rewritten, so the
copy needs no hold on the blocks; once it returns the engine steps on and the copy is sent from a
transport thread. Cost on the engine thread: one gather of n blocks x num_layers x 2 (the bytes the
pull sends), nothing per token.

A lower cache tier (host, disk) serves the same call later: `read_blocks` is the one place that
resolves hashes to bytes, so a tier lookup for the hashes the device pool lacks goes here.
All-or-nothing: None when any hash is missing (evicted), so a pull never lands a partial prefix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

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


def read_blocks(engine: LLMEngine, hashes: list[int]) -> ReadBlocks | None:
    """The blocks cached under `hashes` (chain hashes, salted: a tenant names only its own), copied
    to host; None if any is not in the device pool. Engine thread only."""
    if not hashes:
        raise ValueError("no block hashes to read")
    pool = engine.kv.pool
    blocks = [pool.lookup(h) for h in hashes]
    if any(b is None for b in blocks):
        return None
    k_caches, v_caches = engine.kv_caches()
    ids = torch.tensor([b.block_id for b in blocks], dtype=torch.int64, device=k_caches[0].device)
    return ReadBlocks([k.index_select(0, ids).cpu() for k in k_caches],
                      [v.index_select(0, ids).cpu() for v in v_caches])
