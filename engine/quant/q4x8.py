"""4-bit weights x 8-bit activations on AVX-512 VNNI or AVX2 (`pdcluster::q4x8_mm`), and its torch reference.

Why: torch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`) dequantizes every weight to float and
multiplies in float, so at the rows of a decode step much of its time is that arithmetic rather than
reading the weights. No torch or fbgemm op on x86 takes group-wise int4 weights with int8
activations (bench/RESULTS.md, "int4 decode linears on AVX-512"). This is llama.cpp's Q4_1 x Q8_1 dot
product: the activations are rounded to int8 per 32-block on a symmetric scale, and the integer sums
run on vpdpbusd (u8 x s8 -> s32, exact).

Layout (`Q4x8Weight`), rows interleaved 16 at a time (N padded to a multiple of 16 with zero rows):
    w   uint8   [Np, K/2]  for block b (rows 16b..16b+15) and group g (weights 32g..32g+31), 256 bytes at
                           (b * K/32 + g) * 256: for u in 0..3, 64 bytes, byte 4 l + j = c(16b + l, 32g + 8u + j)
                           | c(16b + l, 32g + 8u + 4 + j) << 4. A 64-byte vector holds 4 weights of each of 16
                           rows, so vpdpbusd sums each row's group in its own int32 lane, and a block's 16
                           results come out as one vector: no horizontal sums (1.1-2.5x the earlier layout per call,
                           which put 16 groups of one row in a vector: bench/RESULTS.md, "q4x8 with rows
                           interleaved").
    d   float16 [Np, K/32] w[n, k] = d[n, g] * c[n, k] + mn[n, g],  c in 0..15,  g = k // 32; stored per block
    mn  float16 [Np, K/32] as (b * K/32 + g) * 16 + l (GGUF Q4_1's form: its d and m are float16 already)

The op is compiled once per host with pdcluster's other CPU ops (engine/cpu_ext.py) where the CPU has
AVX-512 F/BW/VL, VNNI and F16C, and from q4x8_avx2.cpp (vpmaddubsw + vpmaddwd, the same results) where it has
AVX2, FMA and F16C instead; `available()` says whether it loaded. Callers keep torch's int4 kernel as the
fallback.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdcluster.engine import cpu_ext
from pdcluster.engine.quant.cpu_linear import DENSE_MIN_ROWS
from pdcluster.engine.quant.packed import GROUP, Int4Weight

ROWS = 16                  # weight rows per block: one int32 lane each (N is padded to a multiple)


@dataclass(frozen=True, eq=False)
class Q4x8Weight:
    w: torch.Tensor          # uint8 [Np, K/2], Np = N rounded up to 16
    d: torch.Tensor          # float16 [Np, K/32]
    mn: torch.Tensor         # float16 [Np, K/32]
    n: int                   # N: the rows past it are padding (zero codes, scales and mins: results 0)

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.w.shape[1] * 2

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w, self.d, self.mn))


def available() -> bool:
    """Whether pdcluster::q4x8_mm loaded here (either library: engine/cpu_ext.py builds it on first call)."""
    return cpu_ext.has("q4x8_mm")


def dense_min_rows() -> int | None:
    """Rows from which Q4x8Linear dequantizes to float32 and runs MKL's GEMM instead of the op: DENSE_MIN_ROWS with
    the AVX-512 library; None (never) with the AVX2 one, where the op (vpmaddubsw) beat MKL's float32 GEMM on the
    weight dequantized beforehand at every row count measured, 16 to 2,048 (2.0-3.5x; a cold 128-token int4 prompt
    857 -> 222 ms; bench/RESULTS.md, "AVX2 hosts: the attention ops, and int4 prefill on q4x8")."""
    return DENSE_MIN_ROWS if cpu_ext.available() else None


def supported(K: int) -> bool:
    """Whether a weight of in_features K fits the op (whole groups of 32)."""
    return K % GROUP == 0 and K > 0


def _interleave(t: torch.Tensor, Np: int) -> torch.Tensor:
    """[N, G, ...] -> [Np / 16, G, 16, ...]: rows padded with zeros, then blocks of 16 rows, group-major."""
    if t.shape[0] < Np:
        t = torch.cat([t, t.new_zeros((Np - t.shape[0],) + tuple(t.shape[1:]))])
    return t.view(Np // ROWS, ROWS, *t.shape[1:]).transpose(1, 2)


def pack(wt: Int4Weight) -> Q4x8Weight:
    """The same codes in the op's block order, with scale / min as float16 (engine/quant/packed.py's zero
    is the value of code 8: mn = zero - 8 * scale)."""
    N, K = wt.shape
    if not supported(K):
        raise ValueError(f"q4x8 needs in_features divisible by {GROUP}, got {K}")
    Np = -(-N // ROWS) * ROWS
    c = _interleave(wt.codes().view(N, K // GROUP, 4, 2, 4), Np)     # [b, g, l, u, half, j]: weight 8u + 4 half + j
    w = (c[..., 0, :] | (c[..., 1, :] << 4)).transpose(2, 3)          # [b, g, u, l, j]
    d = wt.scale.float()
    d16, m16 = d.half(), (wt.zero.float() - 8 * d).half()
    if not (torch.isfinite(d16).all() and torch.isfinite(m16).all()):
        raise ValueError("q4x8 needs scales and mins inside float16's range")   # (GGUF's Q4 are float16)
    return Q4x8Weight(w.contiguous().view(Np, K // 2), _interleave(d16, Np).contiguous().view(Np, K // GROUP),
                      _interleave(m16, Np).contiguous().view(Np, K // GROUP), N)


def _deinterleave(t: torch.Tensor, n: int, G: int) -> torch.Tensor:
    """[Np / 16, G, 16, ...] in any view -> [n, G, ...]."""
    return t.reshape(-1, G, ROWS, *t.shape[3:]).transpose(1, 2).reshape(-1, G, *t.shape[3:])[:n]


def codes(q: Q4x8Weight) -> torch.Tensor:
    """uint8 [N, K] in natural order, values 0..15."""
    N, K = q.shape
    G = K // GROUP
    b = q.w.view(-1, G, 4, ROWS, 4).transpose(2, 3)                   # [b, g, l, u, j]
    c = torch.stack([b & 15, b >> 4], 4)                               # [b, g, l, u, half, j]
    return _deinterleave(c, N, G).reshape(N, K)


def scales(q: Q4x8Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """(d, mn) float16 [N, K/32] in natural row order."""
    N, K = q.shape
    G = K // GROUP
    return tuple(_deinterleave(t.view(-1, G, ROWS), N, G) for t in (q.d, q.mn))


def dequantize(q: Q4x8Weight) -> torch.Tensor:
    """float32 [N, K]: the weights the op multiplies by."""
    N, K = q.shape
    d, mn = scales(q)
    c = codes(q).view(N, K // GROUP, GROUP).float()
    return (c * d.float().unsqueeze(-1) + mn.float().unsqueeze(-1)).view(N, K)


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
    d, mn = scales(q)
    isum = torch.einsum("mgk,ngk->mng", qx.double(), c.double())   # exact integers
    dxg, sx = dx[..., 0].double(), (qx.sum(-1) * dx[..., 0]).double()   # [M, G]
    y = (isum * d.double() * dxg[:, None]).sum(-1) + (mn.double()[None] * sx[:, None]).sum(-1)
    bad = ~torch.isfinite(x).all(-1)
    return y.float().masked_fill(bad[:, None], float("nan"))


def q4x8_mm(x: torch.Tensor, q: Q4x8Weight) -> torch.Tensor:
    """float32 [M, N] = x [M, K] (float32) @ dequantize(q).T, through the op (x rounded per 32-block to int8)."""
    y = torch.ops.pdcluster.q4x8_mm(x, q.w, q.d, q.mn)
    return y if y.shape[1] == q.n else y[:, :q.n].contiguous()       # (callers view the rows: no strided slice)


class Q4x8Linear:
    """A packed int4 CPU linear on the op: rows below dense_min_rows() (decode steps) through q4x8_mm, more rows
    (prefill chunks, on AVX-512 hosts) dequantize to a transient float32 [N, K] and run a float32 GEMM (the same
    weights; x unrounded). y returns in x's dtype. Selected by engine/quant/policy.cpu_kernel where available() and
    supported(K); torch's Int4Linear otherwise."""
    __slots__ = ("q", "bias", "N", "K", "dense_from")

    def __init__(self, w: Int4Weight, bias: torch.Tensor | None):
        self.q, self.bias = pack(w), bias
        self.N, self.K = w.shape
        self.dense_from = dense_min_rows()

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.q)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        return q4x8_mm(x.float().contiguous(), self.q)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.dequantize())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        dense = self.dense_from is not None and x.shape[0] >= self.dense_from
        y = (self.dense(x) if dense else self.kernel(x)).to(x.dtype)
        return y if self.bias is None else y + self.bias

    @property
    def nbytes(self) -> int:
        return self.q.nbytes
