"""KV compression on the wire: a frame's K/V blocks as int8 or fp8 (e4m3) with per (block, kv_head) scales.

    x       [n, block_size, num_kv_heads, head_dim]   float32 / bfloat16 / float16 (the cache dtype)
    q       same shape, int8 or float8_e4m3fn           x ~= q * scale[block, head]
    scales  float32 [n, num_kv_heads] = amax(|x[block, :, head, :]|) / QMAX (0 for an all-zero slice)

Rounding is that of kernels/pack_kv.py's torch reference (int8: half away from zero, fp8: torch's
cast, nearest even), at a finer granularity: one scale per (block, kv_head) instead of per block,
which on the embedded model's KV lowers int8's relative error by ~15-20% (K 1.53% -> 1.33%, V 1.30%
-> 1.06%, mean over layers) for 8 * num_kv_heads header bytes per block. Error bound per element:
scale / 2 for int8; for fp8 |x| / 16 + scale * 2^-10 (pack_kv.py's docstring). Encoding is 4x
smaller than float32, 2x smaller than 16-bit caches, plus the scales.

On the wire (wire.py) a frame names its codec; the K scales then the V scales travel in the header
as float32 little-endian bytes [2, n, num_kv_heads], covered by the frame's crc32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pdcluster.kernels.pack_kv import QMAX, QUANT

CODECS = ("none", "int8", "fp8")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # caches a codec may decode into
SCALE_BYTES = 4  # float32


@dataclass(frozen=True, eq=False)
class Encoded:
    """K (or V) blocks as a quantized frame carries them, not decoded: what lands as it is in a
    cache of the same codec (engine/kv_quant.py's QuantKV holds this very format)."""
    codec: str                      # "int8" | "fp8"
    q: torch.Tensor                 # codes [n, block_size, num_kv_heads, head_dim]
    scales: torch.Tensor            # float32 [n, num_kv_heads]
    dtype: torch.dtype              # the float dtype the frame decodes into

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def decode(self) -> torch.Tensor:
        return decode(self.q, self.scales, self.dtype)


def to_codec(x: "torch.Tensor | Encoded", codec: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of blocks x in `codec`: an Encoded of that codec as it is (no dequantize),
    anything else (float blocks, another codec) decoded and re-encoded at this boundary."""
    if isinstance(x, Encoded) and x.codec == codec:
        return x.q, x.scales
    return encode(codec, x.decode() if isinstance(x, Encoded) else x)


def check_codec(codec: str) -> None:
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")


def num_scales(shape) -> int:
    """Scales a quantized frame carries for K/V of `shape` [n, block_size, num_kv_heads, head_dim]."""
    return 2 * shape[0] * shape[2]


def block_wire_bytes(block: torch.Tensor, codec: str) -> int:
    """Bytes one K+V block of `block`'s shape/dtype costs on the wire (payload + scales)."""
    if codec == "none":
        return 2 * block.numel() * block.element_size()
    return 2 * block.numel() * QUANT[codec].itemsize + SCALE_BYTES * num_scales((1, *block.shape))


def encode(codec: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x [n, bs, h, d] (CPU): (q contiguous [n, bs, h, d], scales float32 [n, h])."""
    qmax = QMAX[codec]
    xf = x.float()
    amax = xf.abs().amax(dim=(1, 3))                                         # [n, h]
    inv = torch.where(amax > 0, qmax / torch.where(amax > 0, amax, 1.0), 0.0)
    y = (xf * inv[:, None, :, None]).clamp_(-qmax, qmax)
    if codec == "int8":
        y = torch.where(y >= 0, torch.floor(y + 0.5), torch.ceil(y - 0.5))
    return y.to(QUANT[codec]).contiguous(), amax / qmax


def decode(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize q [n, bs, h, d] with scales [n, h] into a new `dtype` tensor of q's shape."""
    return (q.float() * scales[:, None, :, None]).to(dtype)


def check_scales(scales: torch.Tensor, codec: str, dtype: torch.dtype) -> str | None:
    """Why these scales may not land in a `dtype` cache (None if they may): every scale finite and >= 0,
    and none that takes a code past the dtype's range (1e37 in bf16, 1e5 in fp16: inf in the cache;
    an encoder's scale is amax / QMAX, so scale x QMAX is a value the cache held)."""
    if scales.numel() and not bool(torch.isfinite(scales).all() and (scales >= 0).all()):
        return "scales must be finite and >= 0"
    if scales.numel() and float(scales.max()) * QMAX[codec] > torch.finfo(dtype).max:
        return f"a scale of {float(scales.max()):g} takes {codec} codes past {dtype}'s range"
    return None


def payload_bytes(codec: str, shape, dtype: torch.dtype) -> int:
    """Payload bytes (K + V) of a frame of `shape` blocks decoding into `dtype`."""
    itemsize = dtype.itemsize if codec == "none" else QUANT[codec].itemsize
    return 2 * math.prod(shape) * itemsize
