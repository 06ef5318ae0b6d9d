"""Chain hashes of full KV blocks: the prefix-cache key, also sent to the router's global index.

hash(block i) = H(hash(block i-1), token ids of block i, salt). A hash therefore names the
whole prefix up to and including its block, and a tenant's salt keeps its blocks apart from
everyone else's. Deterministic across processes and hosts (blake2b, not Python's hash()).
"""
from __future__ import annotations

import hashlib
import struct
from array import array

ROOT_HASH = 0  # parent of block 0


def hash_block(parent: int, token_ids, salt: str | None = None) -> int:
    """64-bit chain hash of one full block."""
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack("<Q", parent))
    h.update(array("I", token_ids).tobytes())
    if salt:
        h.update(b"\x00salt\x00" + salt.encode())
    return int.from_bytes(h.digest(), "little")


def block_hashes(token_ids, block_size: int, salt: str | None = None,
                 start: int = 0, parent: int = ROOT_HASH) -> list[int]:
    """Hashes of full blocks start, start+1, ... of `token_ids` (a trailing partial block is skipped)."""
    out = []
    for i in range(start, len(token_ids) // block_size):
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size], salt)
        out.append(parent)
    return out
