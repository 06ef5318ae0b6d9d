"""float32 linears whose weights are GGUF Q4_1 values, read as 4-bit codes (`pdcluster::q4f32_mm`, q4f32_mm.cpp),
and the torch reference.

Why: the float32 engine on a Q4_1 GGUF (the embedded SmolLM2) dequantizes each weight once at load, w =
float32(d * q) + m (numpy's two roundings; d and m float16 per 32 weights of a row, q in 0..15), and from then
on streams 4 bytes a weight every step. The same values fit in 0.75 bytes: the code and, per 32, d and m as
float32. So a step at a few rows, bound by the weights' bytes, reads 5.3x fewer, and computes the same float32
linear: the op expands each block back into the f32_mm layout in L2 and runs f32_mm's tiles (f32_tile.h), so
y is f32_mm's result on the float32 weight bit for bit (tested), whatever M and the threads.

`pack(W)` takes any float32 [N, K] and returns None unless every 32-group of every row is such a Q4_1 group,
which it checks value by value (recover()): the form is an exact re-encoding, never an approximation. Callers
keep f32_mm's float32 blocks otherwise.

Layout (`Q4F32Weight`), N padded to Np (a multiple of 64) with zero rows, block b = columns 64 b .. 64 b + 63
of W.T:
    codes  uint8   [Np / 64, K, 32]         codes[b, k, j] = q[64 b + j, k] | q[64 b + 32 + j, k] << 4
    dm     float32 [Np / 64, K / 32, 2, 64] dm[b, g, 0, j] = d[64 b + j, g], dm[b, g, 1, j] = m[64 b + j, g]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdcluster.engine import cpu_ext, hugepages
from pdcluster.kernels import f32_mm

COLS = 64                  # columns of W.T per block (f32_tile.h COLS)
GROUP = 32                 # k per (d, m): Q4_1's block
MKL_MIN_ROWS = 4096        # rows from which engine/llama.py's Linear runs MKL on unpack_into's float32 copy instead:
                           # expanding all of W to DRAM costs what the op's in-cache expansion saves until then
                           # (120 linears, one thread: the op 1.22x expand + MKL at 768 rows, 1.06x at 2,048, 0.99x at
                           # 4,096; bench/RESULTS.md, "Q4_1 codes through the op at every prefill chunk")
AVX2_MKL_MIN_ROWS = 1024   # the same with the AVX2 library (Zen 3, one thread; the op's time / expand + MKL's): 0.66x
                           # at 128 rows, 0.96x at 512, 1.01-1.04x at 1,024, 1.05x at 1,536, 1.10x at 2,048
                           # (bench/RESULTS.md, "float32 linears and the greedy head on AVX2 hosts")


def available() -> bool:
    """Whether the op loaded on this host (AVX-512, or the AVX2 library; engine/cpu_ext.py builds it)."""
    return cpu_ext.has("q4f32_mm")


def mkl_min_rows() -> int:
    """Rows from which engine/llama.py's Linear runs MKL on the expanded weight instead of the op: MKL_MIN_ROWS with
    the AVX-512 library, AVX2_MKL_MIN_ROWS with the AVX2 one (whose 8-lane tile trails MKL's GEMM sooner)."""
    return MKL_MIN_ROWS if cpu_ext.available() else AVX2_MKL_MIN_ROWS


@dataclass(frozen=True, eq=False)
class Q4F32Weight:
    codes: torch.Tensor    # uint8 [Np / 64, K, 32]
    dm: torch.Tensor       # float32 [Np / 64, K / 32, 2, 64]
    n: int                 # N: the rows of W (columns of y); past it, padding

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.codes.shape[1]

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + self.dm.numel() * 4


def dequantize(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """float32 [N, K] = d * q + m, rounded after the product and after the sum (torch's separate ops, as gguf's
    numpy dequantizer). q uint8 [N, K] (0..15); d, m float32 [N, K / 32]."""
    N, K = q.shape
    w = (d.unsqueeze(-1) * q.reshape(N, K // GROUP, GROUP).float()) + m.unsqueeze(-1)
    return w.reshape(N, K)


def recover(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(q, d, m) with dequantize(q, d, m) equal to `weight` in every bit, d and m float16 values; None where some
    group is not a Q4_1 group. A Q4_1 group's least value is m (code 0) and its greatest m + 15 d (code 15), as
    llama.cpp quantizes: d is tried as (max - m) / 15 rounded to float16 and its two float16 neighbours."""
    if weight.dim() != 2 or weight.dtype != torch.float32 or weight.shape[1] % GROUP or weight.numel() == 0:
        return None
    N, K = weight.shape
    g = weight.reshape(N, K // GROUP, GROUP)
    m = g.amin(-1)
    if not bool(torch.isfinite(m).all()) or not torch.equal(m.half().float(), m):
        return None
    mx = g.amax(-1)
    if not bool(torch.isfinite(mx).all()):
        return None
    near = ((mx - m) / 15).half()
    if not bool(torch.isfinite(near).all()):
        return None
    bits = near.view(torch.int16)
    q = torch.zeros(N, K // GROUP, GROUP, dtype=torch.uint8)
    d = torch.full_like(m, float("nan"))
    for step in (0, 1, -1):
        todo = torch.isnan(d)
        if not bool(todo.any()):
            break
        cand = (bits + step).clamp_(min=0).view(torch.float16).float()
        safe = torch.where(cand > 0, cand, torch.ones_like(cand))
        qc = torch.where(cand.unsqueeze(-1) > 0, torch.round((g - m.unsqueeze(-1)) / safe.unsqueeze(-1)),
                         torch.zeros_like(g)).clamp_(0, 15)
        ok = todo & ((cand.unsqueeze(-1) * qc + m.unsqueeze(-1)) == g).all(-1)
        d = torch.where(ok, cand, d)
        q[ok] = qc[ok].to(torch.uint8)
    if bool(torch.isnan(d).any()):
        return None
    return q.view(N, K), d, m


def pack(weight: torch.Tensor) -> Q4F32Weight | None:
    """W float32 [N, K] -> the op's form, or None where W is not all Q4_1 groups (recover)."""
    found = recover(weight)
    if found is None:
        return None
    q, d, m = found
    N, K = q.shape
    Np = -(-N // COLS) * COLS
    qp = torch.zeros(Np, K, dtype=torch.uint8)
    qp[:N] = q
    qt = qp.view(Np // COLS, COLS, K).transpose(1, 2)                      # [NB, K, 64]: q of column j at k
    codes = hugepages.empty((Np // COLS, K, 32), torch.uint8)             # streamed every step: huge pages
    codes.copy_(qt[..., :32] | (qt[..., 32:] << 4))
    dmp = torch.zeros(Np, 2, K // GROUP, dtype=torch.float32)
    dmp[:N, 0], dmp[:N, 1] = d, m
    dm = hugepages.empty((Np // COLS, K // GROUP, 2, COLS))
    dm.copy_(dmp.view(Np // COLS, COLS, 2, K // GROUP).permute(0, 3, 2, 1))
    return Q4F32Weight(codes, dm, N)


def unpack_ref(w: Q4F32Weight) -> torch.Tensor:
    """float32 [N, K]: the weight the op multiplies by, rebuilt in torch ops from the codes (the reference)."""
    NB, K, _ = w.codes.shape
    c = w.codes.transpose(1, 2)                                            # [NB, 32, K]
    q = torch.cat([c & 15, c >> 4], 1).reshape(NB * COLS, K)               # [Np, K]
    d = w.dm[:, :, 0].permute(0, 2, 1).reshape(NB * COLS, K // GROUP)
    m = w.dm[:, :, 1].permute(0, 2, 1).reshape(NB * COLS, K // GROUP)
    return dequantize(q, d, m)[:w.n]


def expand(w: Q4F32Weight) -> torch.Tensor:
    """float32 [Np / 64, K, 64]: kernels/f32_mm.py pack's blocks of the same weight, through the op."""
    return torch.ops.pdcluster.q4f32_expand(w.codes, w.dm)


def unpack_into(w: Q4F32Weight, scratch: dict) -> torch.Tensor:
    """float32 [N, K] for the steps that run MKL: the op expands the blocks, then f32_mm's unpack_into undoes its
    layout into a buffer of scratch (a dict kept by the caller, reused call after call)."""
    return f32_mm.unpack_into(f32_mm.F32Weight(expand(w), w.n), scratch)


def q4f32_mm_ref(x: torch.Tensor, w: Q4F32Weight) -> torch.Tensor:
    """float32 [M, N] = x @ W.T in torch ops (another summation order)."""
    return F.linear(x.float(), unpack_ref(w))


def q4f32_mm(x: torch.Tensor, w: Q4F32Weight) -> torch.Tensor:
    """float32 [M, N] = x [M, K] (float32) @ W.T through the op."""
    return torch.ops.pdcluster.q4f32_mm(x, w.codes, w.dm, w.n)
