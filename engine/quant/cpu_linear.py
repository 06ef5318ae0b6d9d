"""Packed linears on CPU, on torch's own weight-only kernels.

    Int4Linear  aten._weight_int4pack_mm_for_cpu   weight: _convert_weight_to_int4pack_for_cpu's
                                                   layout; scale/zero [K/32, N, 2] bfloat16
    Int8Linear  aten._weight_int8pack_mm           weight int8 [N, K]; scale [N] bfloat16
    Dyn8Linear  quantized::linear_dynamic (fbgemm) weight: fbgemm's packed int8 per channel; x rounded
                one row; aten._int_mm several     to 8 bits per call (the int8 choice where torch
                                                   has fbgemm: engine/quant/policy.cpu_kernel)

The first two kernels are vectorized (AVX2/AVX-512) for bfloat16 activations only: with float32 ones they
run a scalar loop 10-60x slower (bench/RESULTS.md, "Quantized weights"), and float16 likewise. So
x is rounded to bfloat16, the kernel dequantizes each weight to float32 (scale and zero as
bfloat16), accumulates in float32 and rounds y to bfloat16; y returns in x's dtype.

Rows above DENSE_MIN_ROWS (prefill chunks, large decode batches) are compute-bound, and there
MKL's float32 GEMM beats both kernels ~2x: the weight is dequantized to a transient float32 [N, K]
(the same values the kernel uses) and multiplied with the same bfloat16-rounded x, the result
rounded to bfloat16 too, so both paths compute one function up to float32 summation order.
The int4 path reads the weight back out of torch's packed layout (unpack_int4pack); a build whose
layout is not one of the known ones (checked once against a probe) keeps to the kernel at every size.
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from pdcluster.engine import cpu_ext
from pdcluster.engine.quant import int8_amx
from pdcluster.engine.quant.packed import GROUP, Int4Weight, Int8Weight

BF16 = torch.bfloat16
DENSE_MIN_ROWS = 64     # rows from which dequantize + float32 GEMM is faster (bench/quant_linear.py)


def _bf16_round(x: torch.Tensor) -> torch.Tensor:
    return x.to(BF16).float()


# torch's int4pack layouts on CPU (aten/src/ATen/native/cpu/int4mm_kernel.cpp), per block of
# BLOCK_N rows (64 with AVX-512, 32 with AVX2), stored [K, BLOCK_N / 2] bytes:
#   "split": byte j holds row j (low nibble) and row j + BLOCK_N / 2 (high)
#   "pairs": byte j holds rows 2j (low) and 2j + 1 (high): the scalar build, and every build's
#            last block when N % BLOCK_N != 0 (then [K, rows left / 2] bytes)
LAYOUTS = ((64, "split"), (32, "split"), (32, "pairs"))


def unpack_int4pack(packed: torch.Tensor, N: int, K: int, layout: tuple[int, str]) -> torch.Tensor:
    """uint8 codes [N, K] out of torch's packed [N, K/2] (one of LAYOUTS)."""
    block, kind = layout
    flat = packed.reshape(-1)
    full, tail = divmod(N, block)
    out = []
    if full:
        b = flat[: full * K * block // 2].view(full, K, block // 2)
        lo, hi = b & 15, b >> 4
        rows = torch.cat([lo, hi], -1) if kind == "split" else torch.stack([lo, hi], -1).view(full, K, block)
        out.append(rows.transpose(1, 2).reshape(full * block, K))
    if tail:
        b = flat[full * K * block // 2:].view(K, tail // 2)
        out.append(torch.stack([b & 15, b >> 4], -1).view(K, tail).t())
    return torch.cat(out) if len(out) > 1 else out[0].contiguous()


@functools.lru_cache(maxsize=1)
def int4pack_layout() -> tuple[int, str] | None:
    """The layout this torch build packs in, found by packing a probe; None if none of LAYOUTS."""
    N, K = 64 * 2 + 48, 64                       # full 64- and 32-row blocks and a 16/48-row tail
    codes = torch.randint(0, 16, (N, K), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    p = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    for layout in LAYOUTS:
        if torch.equal(unpack_int4pack(p, N, K, layout).int(), codes):
            return layout
    return None


class Int4Linear:
    __slots__ = ("packed", "sz", "bias", "N", "K", "n_pad", "layout")

    def __init__(self, w: Int4Weight, bias: torch.Tensor | None):
        N, K = w.shape
        codes, scale, zero = w.codes().int(), w.scale, w.zero
        pad = -N % 16                             # the kernel takes N in multiples of 16
        if pad:
            codes = F.pad(codes, (0, 0, 0, pad), value=8)
            scale, zero = F.pad(scale, (0, 0, 0, pad)), F.pad(zero, (0, 0, 0, pad))
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
        self.sz = torch.stack([scale.t(), zero.t()], -1).to(BF16).contiguous()   # [K/32, N + pad, 2]
        self.bias, self.N, self.K, self.n_pad = bias, N, K, N + pad
        self.layout = int4pack_layout()

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K]: exactly the weights the kernel multiplies by."""
        codes = unpack_int4pack(self.packed, self.n_pad, self.K, self.layout)[: self.N]
        s, z = self.sz[..., 0].t()[: self.N].float(), self.sz[..., 1].t()[: self.N].float()   # [N, K/32]
        g = codes.view(self.N, -1, GROUP).float().sub_(8).mul_(s.unsqueeze(-1)).add_(z.unsqueeze(-1))
        return g.view(self.N, self.K)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        """bfloat16 [M, N] by torch's int4 kernel."""
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(BF16).contiguous(), self.packed, GROUP, self.sz)
        return y if self.n_pad == self.N else y[:, : self.N]

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """bfloat16 [M, N] by dequantize + float32 GEMM."""
        return F.linear(_bf16_round(x), self.dequantize()).to(BF16)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        dense = x.shape[0] >= DENSE_MIN_ROWS and self.layout is not None
        y = (self.dense(x) if dense else self.kernel(x)).to(x.dtype)
        return y if self.bias is None else y + self.bias

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.sz))


class Int8Linear:
    __slots__ = ("q", "scale", "bias")

    def __init__(self, w: Int8Weight, bias: torch.Tensor | None):
        self.q, self.scale, self.bias = w.q.contiguous(), w.scale.to(BF16), bias

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale.float().unsqueeze(-1)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x.to(BF16).contiguous(), self.q, self.scale)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_bf16_round(x), self.dequantize()).to(BF16)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = (self.dense(x) if x.shape[0] >= DENSE_MIN_ROWS else self.kernel(x)).to(x.dtype)
        return y if self.bias is None else y + self.bias

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * self.scale.element_size()


def _round_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [M, K] rounded to integers on each row's symmetric 8-bit scale, as float32 in -127..127;
    the scales [M, 1] = |max| / 127 of each row)."""
    xf = x.float()
    sx = xf.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 127
    return torch.round(xf / sx), sx


def quantize_rows(x: torch.Tensor, shift: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """_round_rows(x) as codes: int8 [M, K] (uint8, + 128, with shift) and the scales [M, 1]. In one op where
    pdcluster's CPU ops are built (engine/quant/quantize_rows.cpp: the same arithmetic, bit for bit; ~5 passes
    over x in one), else the torch ops."""
    if x.dim() == 2 and cpu_ext.available():
        return torch.ops.pdcluster.quantize_rows(x.float(), shift)
    r, sx = _round_rows(x)
    return (r.add_(128).to(torch.uint8) if shift else r.to(torch.int8)), sx


def int8_rows(x: torch.Tensor, q: torch.Tensor | None, scale: torch.Tensor,
              tiles: torch.Tensor | None = None) -> torch.Tensor:
    """float32 [M, N] = x [M, K] @ (q [N, K] int8 * scale [N] float32).T, each row of x rounded to int8 on its
    own symmetric scale (amax / 127, 255 levels), an int8 x int8 -> int32 GEMM (torch._int_mm: exact integer
    sums on any CPU, no int16 pair saturation as in fbgemm's full 8-bit range on AVX2), rescaled by the row's
    scale and the weight row's. A row's result depends on that row alone, never on its batch-mates; a
    non-finite row stays non-finite (its scale is). tiles: q in AMX tiles (engine/quant/int8_amx.py; q may
    then be None): the same integer sums on pdcluster::int8_amx_mm, so the same result."""
    codes, sx = quantize_rows(x)
    if tiles is not None:
        acc = torch.ops.pdcluster.int8_amx_mm(codes, tiles)
    elif cpu_ext.has("int8_mm"):                # AVX2 hosts: _int_mm's sums on pdcluster's op (int8_mm_avx2.cpp)
        acc = torch.ops.pdcluster.int8_mm(codes, q)
    else:
        acc = torch._int_mm(codes, q.t())
    return acc.float().mul_(sx).mul_(scale)                                     # int32 [M, N] -> float32


@functools.lru_cache(maxsize=1)
def onednn_int8_usable() -> bool:
    """oneDNN's int8 GEMM on a prepacked weight (onednn.qlinear_pointwise), where its u8 x s8 products sum in
    int32 without int16 pair saturation: VNNI or AMX hosts (plain AVX2's vpmaddubsw can saturate)."""
    try:
        exact = torch.cpu._is_vnni_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:                       # another torch's private names: keep to torch._int_mm
        return False
    return bool(exact) and torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


class OneDNNRows:
    """int8_rows' arithmetic on oneDNN's prepacked int8 weight: x per row on its own symmetric 8-bit scale,
    shifted to uint8 (+128, one zero point for every row), exact int32 sums, each row's result rescaled by its
    own scale. No per-call weight reorder (torch._int_mm blocks its weight on every call): the 49152 x 576
    head at 2-16 rows in 4.2-4.6 ms instead of 7.3-9.3 (bench/RESULTS.md, "oneDNN's prepacked int8 head")."""
    __slots__ = ("packed", "scale", "zero")

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        self.packed = torch.ops.onednn.qlinear_prepack(q.contiguous(), None)   # opaque, blocked for VNNI / AMX
        self.scale, self.zero = scale.float().contiguous(), torch.zeros(q.shape[0], dtype=torch.long)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """float32 [M, N]."""
        xq, sx = quantize_rows(x, shift=True)                              # 1..255; 128 is zero
        y = torch.ops.onednn.qlinear_pointwise(xq, 1.0, 128, self.packed, self.scale, self.zero, None, 1.0, 0,
                                               torch.float32, "none", [], "")   # float(sum) * w_scale
        return y.mul_(sx)


@functools.lru_cache(maxsize=1)
def fbgemm_usable() -> bool:
    """torch's x86 quantized engine (fbgemm) is built in: its dynamic int8 linear is the decode kernel."""
    return torch.backends.quantized.engine in ("x86", "fbgemm") and hasattr(torch.ops.quantized, "linear_dynamic")


class Dyn8Linear:
    """fbgemm's dynamic int8 linear (torch.ops.quantized.linear_dynamic) over an int8 per-channel weight:
    one row of x is quantized per call to uint8 with one (scale, zero point) (7-bit range,
    reduce_range: AVX2's u8 x s8 pair sums must not saturate int16), multiplied with the int8 codes,
    accumulated in int32, rescaled to float32 by x's and each row's scale. Several rows (2 to
    DENSE_MIN_ROWS - 1) go through rows(): a symmetric 8-bit scale per row of x and torch._int_mm (the LM head:
    oneDNN's prepacked copy, OneDNNRows).
    The weight's codes and scales are exactly Int8Weight's; only x is rounded (as llama.cpp rounds
    activations to 8 bits).
    2-6x faster than _weight_int8pack_mm and _weight_int4pack_mm_for_cpu at decode row counts on
    AVX2 (bench/RESULTS.md, "Decode step on CPU"). Rows >= DENSE_MIN_ROWS (prefill) take the
    dequantize + float32 GEMM path with bfloat16-rounded x, as Int8Linear does; it and rows() read the
    int8 codes kept beside fbgemm's copy (2 bytes per weight resident; 1 for a tied head, whose codes
    the embedding holds anyway)."""
    __slots__ = ("packed", "q", "scale", "bias", "N", "K", "onednn", "tiles")

    def __init__(self, w: Int8Weight, bias: torch.Tensor | None, onednn_rows: bool = False):
        N, K = w.shape
        # the codes stay too, for the dense path: fbgemm's unpack rebuilds the whole matrix per call
        # (measured: prefill at 0.56x); a tied head shares them with the embedding's row lookups
        self.q = w.q.contiguous()
        with warnings.catch_warnings():          # quantized tensors are deprecated, the kernel is not gone
            warnings.simplefilter("ignore")
            wq = torch._make_per_channel_quantized_tensor(w.q.contiguous(), w.scale.double(),
                                                          torch.zeros(N, dtype=torch.long), 0)
        b = bias.float() if bias is not None else None
        self.packed = torch.ops.quantized.linear_prepack(wq, b)    # fbgemm's layout; bias added in the kernel
        self.scale, self.bias, self.N, self.K = w.scale.float(), bias, N, K
        # where asked (the LM head): rows() on AMX tiles where the CPU has them (int8_amx.py; the head's logits
        # at 32 rows in ~1.5 instead of ~3 ms a step), else on oneDNN's prepacked copy where its sums are exact
        amx = onednn_rows and int8_amx.usable() and int8_amx.fits(N, K)
        self.tiles = int8_amx.pack(self.q) if amx else None
        self.onednn = OneDNNRows(self.q, self.scale) if onednn_rows and not amx and onednn_int8_usable() else None

    def codes(self) -> torch.Tensor:
        """int8 [N, K], read back out of fbgemm's packed weight."""
        return torch.ops.quantized.linear_unpack(self.packed)[0].int_repr()

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale.unsqueeze(-1)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        """float32 [M, N] (bias included)."""
        return torch.ops.quantized.linear_dynamic(x.float().contiguous(), self.packed, True)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(_bf16_round(x), self.dequantize()).to(BF16)
        return y if self.bias is None else y + self.bias

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """float32 [M, N]: int8_rows (a scale per row of x), on oneDNN's prepacked weight where its sums are
        exact (OneDNNRows: VNNI / AMX hosts), else torch._int_mm (pdcluster::int8_mm on AVX2 hosts: the same
        sums); where neither oneDNN nor that op is usable, fbgemm one row at a time (each row's batch-1 result). The latter at 16 rows 2.0-2.4x faster than
        _weight_int4pack_mm_for_cpu on the linears and 3.6x faster than _weight_int8pack_mm on the 49152 x 576
        head (bench/RESULTS.md, "Decode batches on CPU"). 7 bits per row (fbgemm's reduce_range) stepped
        outside transformers' top-5 on a near-tie. With AMX tiles: int8_rows on them."""
        if self.tiles is not None:
            y = int8_rows(x, None, self.scale, self.tiles)
        elif self.onednn is not None:
            y = self.onednn(x)
        elif not onednn_int8_usable() and not cpu_ext.has("int8_mm"):
            # no VNNI / AMX, nor pdcluster's AVX2 int8_mm: torch._int_mm is a slow generic loop there (the 49152 x
            # 576 head at 5 rows: ~99 ms, against ~11 ms for fbgemm row by row, bench/RESULTS.md "q4x8 on AVX2
            # hosts"); each
            # row through fbgemm alone is exactly its batch-1 result (bias included); fbgemm rounds a NaN to a
            # finite code, so a non-finite row is made NaN here, as int8_rows keeps it
            y = torch.cat([self.kernel(x[i:i + 1]) for i in range(x.shape[0])])
            return y.masked_fill_(~torch.isfinite(x).all(1, keepdim=True), float("nan"))
        else:
            y = int8_rows(x, self.q, self.scale)
        return y if self.bias is None else y.add_(self.bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """One row: fbgemm (its one activation scale is that row's; 3x faster than rows() there).
        Several: rows(), a scale per row, so a row's result never depends on its batch-mates (fbgemm's
        one scale over all of x made an int8 model's greedy tokens step outside transformers' top-5 in
        a batch). Prefill rows: dense, or rows() where AMX tiles or oneDNN's prepacked copy are held (the head: its
        64+ rows without dequantizing 49152 x 576 weights to float32 on every call)."""
        m = x.shape[0]
        wide = self.onednn is not None or self.tiles is not None
        y = self.kernel(x) if m == 1 else self.dense(x) if m >= DENSE_MIN_ROWS and not wide else self.rows(x)
        return y.to(x.dtype)

    @property
    def nbytes(self) -> int:
        """fbgemm's packed copy, the codes, oneDNN's packed copy and AMX tiles where rows() runs them, the float32
        scales."""
        return (2 + (self.onednn is not None) + (self.tiles is not None)) * self.N * self.K + self.scale.numel() * 4
