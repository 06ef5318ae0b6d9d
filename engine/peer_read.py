"""Read cached blocks by chain hash: the holder's half of a peer pull (kv_transfer/pull.py).

`read_blocks(engine, hashes)` runs on the engine thread, between steps: it looks each hash up in
the device pool's prefix cache and copies those blocks of every layer to host memory in one
index_select per layer and cache (K, V). Between steps no block can be evicted or rewritten, so the
copy needs no hold on the blocks; once it returns the engine steps on and the copy is sent from a
transport thread. Cost on the engine thread: one gather of n blocks x num_layers x 2 (the bytes the
pull sends), nothing per token.

`read_device_blocks` is the partial form: the blocks the device pool holds, and which of the hashes
those are. `read_device_blocks_now` is that read from the calling thread while the engine steps (a KV
cache in host memory only): a pull no longer waits for the holder's step to end (a prefill chunk
of 2,048 tokens holds one-thread CPU workers ~4 s). It snapshots each hash's block and its `gen`,
copies, then keeps only the rows whose block still holds that hash at the same gen. That suffices:
a block is written only after allocate() handed it out, which first unhashes it and then moves its
gen, and a block holding a hash is full and computed (published after its step), never rewritten.
Rows that moved are left out, as evicted ones are. The holder's lower cache tiers (host, disk)
read the rest off the engine thread (kv_transfer/pull.py serve_pull, kv_transfer/tiers
TierConnector.read_blocks), so a disk read never stalls a step. `read_blocks` is all-or-nothing:
None when any hash is missing (evicted), so a pull never lands a partial prefix.
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


def reads_off_thread(engine: LLMEngine) -> bool:
    """Whether read_device_blocks_now may serve this engine's pool: its KV cache is in host memory.
    A CUDA cache keeps the engine-thread read (its writes are ordered on the engine's stream, and
    there its steps are short)."""
    k_caches, _ = engine.kv_caches()
    return bool(k_caches) and k_caches[0].device.type == "cpu"


def snapshot(pool, hashes: list[int]) -> list[tuple[int, object, int]]:
    """(i, block, gen) for each hashes[i] the pool caches now. Any thread: each step is one dict
    lookup or attribute read (atomic under the GIL); a block whose hash left it meanwhile is skipped."""
    out = []
    for i, h in enumerate(hashes):
        b = pool.cached.get(h)
        if b is None:
            continue
        gen = b.gen
        if b.block_hash == h:
            out.append((i, b, gen))
    return out


def unmoved(snap: list[tuple[int, object, int]], hashes: list[int]) -> list[bool]:
    """Per snapshot row: its block still holds that hash, not handed out since (read after the copy)."""
    return [b.gen == gen and b.block_hash == hashes[i] for i, b, gen in snap]


def read_device_blocks_now(engine: LLMEngine, hashes: list[int]) -> tuple[list[int], ReadBlocks | None]:
    """read_device_blocks from the calling thread while the engine steps (reads_off_thread engines
    only; see the module doc): rows whose block was handed out during the copy are left out."""
    if not hashes:
        raise ValueError("no block hashes to read")
    snap = snapshot(engine.kv.pool, hashes)
    if not snap:
        return [], None
    k_caches, v_caches = engine.kv_caches()
    ids = torch.tensor([b.block_id for _, b, _ in snap], dtype=torch.int64)
    k = [gather_blocks(c, ids, c.dtype) for c in k_caches]
    v = [gather_blocks(c, ids, c.dtype) for c in v_caches]
    keep = unmoved(snap, hashes)
    if not all(keep):
        rows = torch.tensor([j for j, ok in enumerate(keep) if ok], dtype=torch.int64)
        if not len(rows):
            return [], None
        k, v = [x.index_select(0, rows) for x in k], [x.index_select(0, rows) for x in v]
        snap = [s for s, ok in zip(snap, keep) if ok]
    return [i for i, _, _ in snap], ReadBlocks(k, v)


def read_blocks(engine: LLMEngine, hashes: list[int]) -> ReadBlocks | None:
    """The blocks cached under `hashes`, copied to host; None if any is not in the device pool.
    Engine thread only."""
    found, blocks = read_device_blocks(engine, hashes)
    return blocks if len(found) == len(hashes) else None
