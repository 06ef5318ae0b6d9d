"""int8 x int8 -> int32 GEMMs on AMX tiles (`pdcluster::int8_amx_mm`, int8_amx.cpp), and its torch reference.

Why: the int8 copies of int4 linears (engine/quant/int8_rows.py) serve decode batches of 10+ rows and prefill
chunks. Through torch._int_mm, which re-blocks its weight on every call, a 32-row decode step spent ~16 ms in
SmolLM2's 120 linears, ~3x the time to read their weights once; oneDNN's prepacked path has ~30-50 us of fixed
cost a call (bench/RESULTS.md, "pdcluster's own CPU ops, called directly"). Here the weight is laid out once in
AMX's B-tile (VNNI) order and each call streams it through the tiles.

The integer sums are exact, as torch._int_mm's, so int8_rows gives the same result bit for bit on either.
`usable()` says whether the op runs here: pdcluster's CPU ops built (engine/cpu_ext.py), AMX-INT8 in the CPU,
and the OS granting the process AMX tile state.
"""
from __future__ import annotations

import functools
import logging

import torch

from pdcluster.engine import cpu_ext

log = logging.getLogger(__name__)

_FLAGS = ("amx_tile", "amx_int8")


def fits(N: int, K: int) -> bool:
    """Whether an [N, K] weight fits the op: whole 32-column output blocks, whole 64-byte K chunks."""
    return N % 32 == 0 and K % 64 == 0


def pack(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] -> its tiles, int8 [N/16, K/64, 16, 64]: tiles[nt, kc, kk, 4 n + j] = q[16 nt + n, 64 kc + 4 kk + j]."""
    N, K = q.shape
    if not fits(N, K):
        raise ValueError(f"int8_amx needs N % 32 == 0 and K % 64 == 0, got [{N}, {K}]")
    return q.reshape(N // 16, 16, K // 64, 16, 4).permute(0, 2, 3, 1, 4).contiguous().view(N // 16, K // 64, 16, 64)


def unpack(tiles: torch.Tensor) -> torch.Tensor:
    """pack's inverse: int8 [N, K]."""
    nt, kc = tiles.shape[:2]
    return tiles.view(nt, kc, 16, 16, 4).permute(0, 3, 1, 2, 4).reshape(nt * 16, kc * 64)


def int8_amx_mm_ref(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """int32 [M, N] = x int8 [M, K] @ q int8 [N, K].T, exact."""
    return torch._int_mm(x, q.t())


def int8_amx_mm(x: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
    """int8_amx_mm_ref(x, q) for tiles = pack(q), through the op."""
    return torch.ops.pdcluster.int8_amx_mm(x, tiles)


@functools.lru_cache(maxsize=1)
def usable() -> bool:
    """The op built, the CPU's AMX-INT8, and one call agreeing with the reference (the OS grants tile state)."""
    if not (cpu_ext.available() and all(f in cpu_ext.cpu_flags() for f in _FLAGS)):
        return False
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randint(-127, 128, (17, 128), dtype=torch.int8, generator=g)
        q = torch.randint(-127, 128, (64, 128), dtype=torch.int8, generator=g)
        ok = torch.equal(int8_amx_mm(x, pack(q)), int8_amx_mm_ref(x, q))
    except RuntimeError as e:                       # no tile permission from this kernel
        log.warning("AMX int8 kernel not used: %s", str(e).splitlines()[0])
        return False
    if not ok:
        log.warning("AMX int8 kernel not used: its self-check against torch._int_mm failed")
    return ok
