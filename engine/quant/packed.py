"""Weight-only quantized linear weights as the engine holds them: device-neutral torch tensors.

    Int4Weight  q      uint8 [N, K/2]   weight k of row n in byte k // 2, low nibble for even k
                scale  float32 [N, K/32]
                zero   float32 [N, K/32]
                w[n, k] = (q[n, k] - 8) * scale[n, g] + zero[n, g],   g = k // GROUP
                (torch's int4pack convention: `zero` is the value of the middle code q = 8, not an
                integer zero point; GGUF Q4_1's w = d * q + m is scale = d, zero = m + 8 d)
    Int8Weight  q      int8 [N, K]
                scale  float32 [N]
                w[n, k] = q[n, k] * scale[n]

N = out_features, K = in_features (rows as in a torch Linear). GROUP = 32: GGUF's Q4_0/Q4_1 block,
Q4_K's sub-block, and torch's smallest int4pack group. quantize_int4/int8 are the load-time
quantizers (round-to-nearest, as vLLM's weight-only modes without calibration).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP = 32


@dataclass(frozen=True, eq=False)
class Int4Weight:
    q: torch.Tensor          # uint8 [N, K/2]
    scale: torch.Tensor      # float32 [N, K/GROUP]
    zero: torch.Tensor       # float32 [N, K/GROUP]
    kind = "int4"

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[0], self.q.shape[1] * 2

    def rows(self, index: torch.Tensor) -> Int4Weight:
        return Int4Weight(self.q[index], self.scale[index], self.zero[index])

    def to(self, device) -> Int4Weight:
        return Int4Weight(self.q.to(device), self.scale.to(device), self.zero.to(device))

    def codes(self) -> torch.Tensor:
        """uint8 [N, K], values 0..15."""
        return torch.stack([self.q & 15, self.q >> 4], -1).view(self.q.shape[0], -1)


@dataclass(frozen=True, eq=False)
class Int8Weight:
    q: torch.Tensor          # int8 [N, K]
    scale: torch.Tensor      # float32 [N]
    kind = "int8"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def rows(self, index: torch.Tensor) -> Int8Weight:
        return Int8Weight(self.q[index], self.scale[index])

    def to(self, device) -> Int8Weight:
        return Int8Weight(self.q.to(device), self.scale.to(device))


Packed = Int4Weight | Int8Weight


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] values 0..15 -> uint8 [N, K/2] (low nibble = even k)."""
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def quantize_int4(w: torch.Tensor) -> Int4Weight:
    """Asymmetric round-to-nearest per group of 32 along K: the group's min and max land on codes
    0 and 15 (a constant group: scale 0, every code 0, zero = the value)."""
    N, K = w.shape
    if K % GROUP:
        raise ValueError(f"int4 quantization needs in_features divisible by {GROUP}, got {K}")
    g = w.float().reshape(N, K // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = (hi - lo) / 15
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    codes = torch.round((g - lo.unsqueeze(-1)) * inv.unsqueeze(-1)).clamp_(0, 15)
    return Int4Weight(pack_codes(codes.reshape(N, K)), scale, lo + 8 * scale)


def quantize_int8(w: torch.Tensor) -> Int8Weight:
    """Symmetric round-to-nearest per output channel: scale = max |w| / 127 of the row."""
    wf = w.float()
    scale = wf.abs().amax(-1) / 127
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    return Int8Weight(torch.round(wf * inv.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8), scale)


def dequantize(w: Packed) -> torch.Tensor:
    """float32 [N, K]: the definition above (the torch reference every kernel is tested against)."""
    if isinstance(w, Int8Weight):
        return w.q.float() * w.scale.unsqueeze(-1)
    N, K = w.shape
    c = w.codes().float().reshape(N, K // GROUP, GROUP)
    return ((c - 8) * w.scale.unsqueeze(-1) + w.zero.unsqueeze(-1)).reshape(N, K)


def quantize(w: torch.Tensor, kind: str) -> Packed:
    return quantize_int4(w) if kind == "int4" else quantize_int8(w)


def cat_rows(parts: list[Packed]) -> Packed:
    """Row-concatenation (fused q/k/v or gate/up). Parts of different kinds are requantized to int8,
    the wider one (GGUF Q4_K_M files keep attn_v in Q6_K beside Q4_K q/k)."""
    kinds = {p.kind for p in parts}
    if len(kinds) > 1:
        parts = [p if p.kind == "int8" else quantize_int8(dequantize(p)) for p in parts]
    if parts[0].kind == "int8":
        return Int8Weight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]))
    return Int4Weight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                      torch.cat([p.zero for p in parts]))


def nbytes(w: Packed | torch.Tensor) -> int:
    ts = [w] if isinstance(w, torch.Tensor) else [w.q, w.scale] + ([w.zero] if isinstance(w, Int4Weight) else [])
    return sum(t.numel() * t.element_size() for t in ts)
