"""4-bit weights x 8-bit activations on AVX-512 VNNI (`pdcluster::q4x8_mm`, q4x8.cpp), and its torch reference.

Why: torch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`) dequantizes every weight to float and
multiplies in float, so at the rows of a decode step much of its time is that arithmetic rather than
reading the weights. No torch or fbgemm op on x86 takes group-wise int4 weights with int8
activations (bench/RESULTS.md, "int4 decode linears on AVX-512"). This is llama.cpp's Q4_1 x Q8_1 dot
product: the activations are rounded to int8 per 32-block on a symmetric scale, and the integer sums
run on vpdpbusd (u8 x s8 -> s32, exact).

Layout (`Q4x8Weight`):
    w   uint8   [N, K/2]   a row in blocks of ng = min(16, groups left) groups of 32; per block, for u in
                           0..3, 4 * ng bytes: byte 4 l + j = c(l, 8u + j) | c(l, 8u + 4 + j) << 4 (c(l, i):
                           weight i of the block's group l). A 64-byte vector then holds 4 weights of each
                           of 16 groups, and vpdpbusd sums each group in its own int32 lane. A last
                           block of <= 4 groups (CHUNK_TAIL; K = 576 is 16 + 2) is in chunks of 2 groups:
                           32 bytes each, byte i = c(i) | c(32 + i) << 4 (c(i): weight i of its 64).
    d   float16 [N, K/32]  w[n, k] = d[n, g] * c[n, k] + mn[n, g],  c in 0..15,  g = k // 32
    mn  float16 [N, K/32]  (GGUF Q4_1's form: its d and m are float16 already)

The op is compiled once per host with pdcluster's other CPU ops (engine/cpu_ext.py) where the CPU has
AVX-512 F/BW/VL, VNNI and F16C; `available()` says whether it loaded. Callers keep torch's int4 kernel as the
fallback.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdcluster.engine.cpu_ext import FLAGS as _FLAGS, available, cpu_flags  # noqa: F401 (the op's build and load)
from pdcluster.engine.quant.cpu_linear import DENSE_MIN_ROWS
from pdcluster.engine.quant.packed import GROUP, Int4Weight

CHUNK = 64                 # K must be a multiple (whole bytes of codes per block vector)
BLOCK = 16                 # groups per block: one int32 lane each
CHUNK_TAIL = 4             # a last block of at most this many groups is in 2-group chunks
_SRC = os.path.join(os.path.dirname(__file__), "q4x8.cpp")


@dataclass(frozen=True, eq=False)
class Q4x8Weight:
    w: torch.Tensor          # uint8 [N, K/2]
    d: torch.Tensor          # float16 [N, K/32]
    mn: torch.Tensor         # float16 [N, K/32]

    @property
    def shape(self) -> tuple[int, int]:
        return self.w.shape[0], self.w.shape[1] * 2

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w, self.d, self.mn))


def supported(K: int) -> bool:
    """Whether a weight of in_features K fits the op (whole 64-weight chunks)."""
    return K % CHUNK == 0


def _blocks(G: int):
    """(first group, groups) of each block of a row."""
    return [(g0, min(BLOCK, G - g0)) for g0 in range(0, G, BLOCK)]


def pack(wt: Int4Weight) -> Q4x8Weight:
    """The same codes in the op's block order, with scale / min as float16 (engine/quant/packed.py's zero
    is the value of code 8: mn = zero - 8 * scale)."""
    N, K = wt.shape
    if not supported(K):
        raise ValueError(f"q4x8 needs in_features divisible by {CHUNK}, got {K}")
    c = wt.codes().view(N, K // GROUP, 4, 2, 4)                # [N, group, u, half, j]: weight 8u + 4 half + j
    parts = []
    for g0, ng in _blocks(K // GROUP):
        b = c[:, g0:g0 + ng]
        if ng <= CHUNK_TAIL and ng < BLOCK:
            h = b.reshape(N, ng // 2, 2, GROUP)                    # [N, chunk, half, i]: weight 32 half + i
            parts.append((h[:, :, 0] | (h[:, :, 1] << 4)).reshape(N, -1))
            continue
        parts.append((b[:, :, :, 0] | (b[:, :, :, 1] << 4)).permute(0, 2, 1, 3).reshape(N, -1))   # [N, u, l, j]
    d = wt.scale.float()
    d16, m16 = d.half(), (wt.zero.float() - 8 * d).half()
    if not (torch.isfinite(d16).all() and torch.isfinite(m16).all()):
        raise ValueError("q4x8 needs scales and mins inside float16's range")   # (GGUF's Q4 are float16)
    return Q4x8Weight(torch.cat(parts, 1).contiguous(), d16.contiguous(), m16.contiguous())


def codes(q: Q4x8Weight) -> torch.Tensor:
    """uint8 [N, K] in natural order, values 0..15."""
    N, K = q.shape
    out, off = [], 0
    for g0, ng in _blocks(K // GROUP):
        if ng <= CHUNK_TAIL and ng < BLOCK:
            h = q.w[:, off:off + 16 * ng].reshape(N, ng // 2, 1, GROUP)
            out.append(torch.cat([h & 15, h >> 4], 2).reshape(N, ng * GROUP))
            off += 16 * ng
            continue
        b = q.w[:, off:off + 16 * ng].reshape(N, 4, ng, 4).permute(0, 2, 1, 3)   # [N, l, u, j]
        out.append(torch.stack([b & 15, b >> 4], 3).reshape(N, ng * GROUP))      # [N, l, u, half, j]
        off += 16 * ng
    return torch.cat(out, 1)


def dequantize(q: Q4x8Weight) -> torch.Tensor:
    """float32 [N, K]: the weights the op multiplies by."""
    N, K = q.shape
    c = codes(q).view(N, K // GROUP, GROUP).float()
    return (c * q.d.float().unsqueeze(-1) + q.mn.float().unsqueeze(-1)).view(N, K)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x float32 [M, K] -> (codes float32 [M, K/32, 32] in -127..127, scales dx [M, K/32, 1] = amax / 127):
    each 32-block of a row on its own symmetric scale; an all-zero block gets scale 0 and codes 0."""
    M, K = x.shape
    b = x.float().view(M, K // GROUP, GROUP)
    dx = b.abs().amax(-1, keepdim=True) / 127
    q = torch.where(dx > 0, torch.round(b / torch.where(dx > 0, dx, 1)), 0)
    return q, dx


def q4x8_mm_ref(x: torch.Tensor, q: Q4x8Weight) -> torch.Tensor:
    """float32 [M, N]: the op's arithmetic in torch ops (sums in another order: equal to float32 rounding)."""
    M, K = x.shape
    N = q.shape[0]
    qx, dx = quantize_rows(x)                                      # [M, G, 32], [M, G, 1]
    c = codes(q).view(N, K // GROUP, GROUP).float()                # [N, G, 32]
    isum = torch.einsum("mgk,ngk->mng", qx.double(), c.double())   # exact integers
    dxg, sx = dx[..., 0].double(), (qx.sum(-1) * dx[..., 0]).double()   # [M, G]
    y = (isum * q.d.double() * dxg[:, None]).sum(-1) + (q.mn.double()[None] * sx[:, None]).sum(-1)
    bad = ~torch.isfinite(x).all(-1)
    return y.float().masked_fill(bad[:, None], float("nan"))


def q4x8_mm(x: torch.Tensor, q: Q4x8Weight) -> torch.Tensor:
    """float32 [M, N] = x [M, K] (float32) @ dequantize(q).T, through the op (x rounded per 32-block to int8)."""
    return torch.ops.pdcluster.q4x8_mm(x, q.w, q.d, q.mn)


class Q4x8Linear:
    """A packed int4 CPU linear on the op: rows below DENSE_MIN_ROWS (decode steps) through q4x8_mm, more rows
    (prefill chunks) dequantize to a transient float32 [N, K] and run a float32 GEMM (the same weights; x
    unrounded). y returns in x's dtype. Selected by engine/quant/policy.cpu_kernel where available() and
    supported(K); torch's Int4Linear otherwise."""
    __slots__ = ("q", "bias", "N", "K")

    def __init__(self, w: Int4Weight, bias: torch.Tensor | None):
        self.q, self.bias = pack(w), bias
        self.N, self.K = w.shape

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.q)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        return q4x8_mm(x.float().contiguous(), self.q)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.dequantize())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = (self.dense(x) if x.shape[0] >= DENSE_MIN_ROWS else self.kernel(x)).to(x.dtype)
        return y if self.bias is None else y + self.bias

    @property
    def nbytes(self) -> int:
        return self.q.nbytes
