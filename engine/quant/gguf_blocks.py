"""GGUF quantized tensors -> packed engine weights (engine/quant/packed.py), without a float copy
where the format maps exactly.

    Q4_0   w = d (q - 8)                 -> Int4Weight  scale = d, zero = 0             exact
    Q4_1   w = d q + m                   -> Int4Weight  scale = d, zero = m + 8 d       exact (1 f32 rounding in zero)
    Q4_K   w = d sc_g q - dmin m_g       -> Int4Weight  scale = d sc_g, zero = 8 scale - dmin m_g   exact (idem)
    Q8_0   w = d_b q, d_b per 32 along K -> Int8Weight  one scale per row (requantized, see below)
    other quantized types: dequantized by gguf, then quantized at load (quantize_int4 for types of
    at most 4 bits, quantize_int8 above), i.e. a second rounding on top of the file's.

Q8_0 -> int8 per row: torch's int8 weight kernel takes one scale per output channel, so each row is
requantized from its exact Q8_0 values with scale = max |w| / 127 of the row. The added error per
weight is at most half that scale, i.e. <= (max_b d_b) / 2, where the file's own rounding was
<= d_b / 2 in each block b: blocks whose scale is the row's largest keep their codes exactly, the
others lose log2(max d / d_b) bits. Measured on SmolLM2-135M's Q8_0 token_embd: relative RMS error
of the weights vs the file's values, printed by bench/engine.py.

Raw blocks arrive as GGUFReader gives them: uint8 [rows, bytes per row] in torch order (rows =
out_features). Q4_0/Q4_1 blocks hold 32 weights: byte j carries weight j (low nibble) and j + 16.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGML_QUANT_SIZES
from gguf.quants import Q4_K, dequantize

from pdcluster.engine.quant.packed import Int4Weight, Packed, pack_codes, quantize

FLOAT_TYPES = (T.F32, T.F16, T.BF16, T.F64)
NATIVE = {T.Q4_0: "int4", T.Q4_1: "int4", T.Q4_K: "int4", T.Q8_0: "int8"}


def native_kind(qtype: T) -> str | None:
    """The packed kind a GGUF tensor type is held in ("int4" | "int8"), None for float types."""
    if qtype in FLOAT_TYPES:
        return None
    if qtype in NATIVE:
        return NATIVE[qtype]
    return "int4" if qtype.name.startswith(("Q2", "Q3", "Q4", "IQ", "TQ", "MXFP4", "NVFP4")) else "int8"


def _blocks(data: np.ndarray, qtype: T, N: int) -> np.ndarray:
    """uint8 [N, blocks per row, bytes per block]."""
    return np.ascontiguousarray(data).reshape(N, -1, GGML_QUANT_SIZES[qtype][1])


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """uint8 [..., 16] block bytes -> codes [..., 32] in weight order (j, then j + 16)."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def _int4(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, N: int) -> Int4Weight:
    return Int4Weight(pack_codes(torch.from_numpy(codes.reshape(N, -1))),
                      torch.from_numpy(np.ascontiguousarray(scale.reshape(N, -1), np.float32)),
                      torch.from_numpy(np.ascontiguousarray(zero.reshape(N, -1), np.float32)))


def _q4_0(b: np.ndarray, N: int) -> Int4Weight:
    d = _f16(b[..., 0:2])                                       # [N, B]
    return _int4(_nibbles(b[..., 2:18]), d, np.zeros_like(d), N)


def _q4_1(b: np.ndarray, N: int) -> Int4Weight:
    d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    return _int4(_nibbles(b[..., 4:20]), d, m + 8 * d, N)


def _q4_k(b: np.ndarray, N: int) -> Int4Weight:
    """256-weight super-blocks: d, dmin (f16), 12 bytes of 6-bit (scale, min) for 8 groups of 32,
    then 4 chunks of 32 bytes: chunk c's byte j carries weight 64 c + j (low) and 64 c + 32 + j."""
    nb = b.shape[1]
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])              # [N, nb]
    sc, mn = Q4_K.get_scale_min(b[..., 4:16].reshape(-1, 12))   # [N * nb, 8] each
    sc, mn = sc.reshape(N, nb, 8).astype(np.float32), mn.reshape(N, nb, 8).astype(np.float32)
    qs = b[..., 16:144].reshape(N, nb, 4, 32)
    codes = np.stack([qs & 15, qs >> 4], axis=3)                # [N, nb, 4, 2, 32] = groups in order
    scale = d[..., None] * sc                                   # [N, nb, 8]
    return _int4(codes, scale, 8 * scale - dmin[..., None] * mn, N)


_EXACT = {T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q4_K: _q4_k}


def dequantize_tensor(data: np.ndarray, qtype: T, shape: tuple[int, int]) -> torch.Tensor:
    """gguf's own dequantization, float32 [N, K]."""
    return torch.from_numpy(np.ascontiguousarray(dequantize(data, qtype), np.float32).reshape(shape))


def to_packed(data: np.ndarray, qtype: T, shape: tuple[int, int], kind: str | None = None) -> Packed:
    """A quantized GGUF tensor (raw blocks, torch shape [N, K]) as `kind` (default: native_kind):
    exact where the table above says so, else through gguf's dequantization and a load-time quantizer."""
    kind = kind or native_kind(qtype)
    if kind == "int4" and qtype in _EXACT:
        return _EXACT[qtype](_blocks(data, qtype, shape[0]), shape[0])
    return quantize(dequantize_tensor(data, qtype, shape), kind)
