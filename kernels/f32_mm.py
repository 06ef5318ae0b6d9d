"""float32 linears on CPU, the weight packed once at load (`pdcluster::f32_mm`, f32_mm.cpp), and the torch reference.

Why: MKL's sgemm (F.linear) packs the weight on every call, so 4-32 rows, the rows of a decode batch, a speculative
verification or a prompt's uncached tail, cost 1.45-1.78x what they need (bench/f32_linears.py; bench/RESULTS.md,
"float32 linears packed at load"). The op reads the weight in its packed order and is no slower than MKL from 1 row
to ~400, so the packed copy replaces the [N, K] weight: no second copy is held. From ~1,000 rows it is 4-9% slower:
engine/llama.py's Linear runs those steps on MKL over unpack_into's transient copy.

Layout (`F32Weight`): w float32 [Np / 64, K, 64], block b holding columns 64 b .. 64 b + 63 of W.T
(w[b, k, j] = W[64 b + j, k]), N padded to Np, a multiple of 64, with zero rows.

Each y[m, n] is one fused multiply-add chain over k in order: the same bits whatever the other rows of x, M and
the threads, so a request's logits do not depend on its batch-mates. Against F.linear the sums differ only in
order (float32 rounding).

The op is built with pdcluster's other CPU ops (engine/cpu_ext.py) where the CPU has AVX-512, or AVX2 and FMA (the
same tile 8 lanes wide: the same bits); `available()` says whether it loaded. Callers keep F.linear otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdcluster.engine import cpu_ext, hugepages

COLS = 64                  # columns of W.T per block (f32_mm.cpp COLS)
MKL_MIN_ROWS = 768         # rows from which engine/llama.py's Linear runs MKL on unpack_into's copy instead (the op
                           # 0.92x MKL on a 2048-token prefill; the copy costs ~2.5% of the GEMM there)


def available() -> bool:
    """Whether the op loaded on this host (AVX-512, or the AVX2 library; engine/cpu_ext.py builds it)."""
    return cpu_ext.has("f32_mm")


@dataclass(frozen=True, eq=False)
class F32Weight:
    w: torch.Tensor        # float32 [Np / 64, K, 64]
    n: int                 # N: the rows of W (columns of y); past it, padding

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.w.shape[1]

    @property
    def nbytes(self) -> int:
        return self.w.numel() * self.w.element_size()


def pack(weight: torch.Tensor) -> F32Weight:
    """W float32 [N, K] -> the op's blocks (a new tensor; W can be freed)."""
    if weight.dim() != 2 or weight.dtype != torch.float32 or weight.shape[1] == 0:
        raise ValueError(f"f32_mm packs a float32 [N, K] weight with K > 0, got {weight.dtype} {tuple(weight.shape)}")
    N, K = weight.shape
    Np = -(-N // COLS) * COLS
    w = torch.zeros(Np, K, dtype=torch.float32)
    w[:N] = weight
    blocks = hugepages.empty((Np // COLS, K, COLS))        # streamed every step: in huge pages (engine/hugepages.py)
    return F32Weight(blocks.copy_(w.view(Np // COLS, COLS, K).transpose(1, 2)), N)


def unpack(q: F32Weight) -> torch.Tensor:
    """float32 [N, K]: the weight the op multiplies by (a fresh copy)."""
    return unpack_into(q, {})


def unpack_into(q: F32Weight, scratch: dict) -> torch.Tensor:
    """float32 [N, K] = unpack(q), written into a buffer of scratch (a dict kept by the caller, one buffer per
    shape, reused call after call)."""
    buf = scratch.get(q.w.shape)
    if buf is None:
        buf = scratch[q.w.shape] = torch.empty(q.w.shape[0] * COLS, q.w.shape[1], dtype=torch.float32)
    buf.view(q.w.shape[0], COLS, q.w.shape[1]).copy_(q.w.transpose(1, 2))
    return buf[:q.n]


def f32_mm_ref(x: torch.Tensor, q: F32Weight) -> torch.Tensor:
    """float32 [M, N] = x @ W.T in torch ops (another summation order)."""
    return F.linear(x.float(), unpack(q))


def f32_mm(x: torch.Tensor, q: F32Weight) -> torch.Tensor:
    """float32 [M, N] = x [M, K] (float32) @ W.T through the op."""
    return torch.ops.pdcluster.f32_mm(x, q.w, q.n)
