"""Rotary position embedding tables (HF Llama "rotate_half" convention), incl. llama3 scaling."""
from __future__ import annotations

import math

import torch


def inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """[head_dim // 2] float32 inverse frequencies."""
    f = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    if kind in (None, "default"):
        return f
    if kind == "linear":
        return f / scaling["factor"]
    if kind == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / f
        scaled = torch.where(wavelen > old_ctx / lo, f / factor, f)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
        return torch.where(is_mid, mid, scaled)
    raise ValueError(f"unsupported rope_scaling type {kind!r}")


def cos_sin_cache(max_pos: int, head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """[max_pos, head_dim] float32: cos in the first half, sin in the second (per frequency)."""
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq(head_dim, theta, scaling))
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos, sin: [T, 1, D] (frequencies repeated twice). Returns rotated x."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def rotary_tables(cos_sin: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, signed sin), each [T, 1, D] in `dtype`, for apply_rotary_rolled: cos repeated over both
    halves; sin negated in the first half (rotate_half's sign folded into the table)."""
    cs = cos_sin[positions].unsqueeze(1)                                # [T, 1, D] float32
    half = cs.shape[-1] // 2
    c, s = cs[..., :half], cs[..., half:]
    return torch.cat([c, c], -1).to(dtype), torch.cat([-s, s], -1).to(dtype)


def apply_rotary_rolled(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary in 3 kernels instead of 6: rotate_half(x) * sin == roll(x, D/2) * signed_sin.
    x: [T, heads, D] (any row stride: q and k side by side in one call). The sum lands in x * cos's own buffer
    (addcmul_: the same kernel and bits as addcmul, one [T, heads, D] allocation less)."""
    return (x * cos).addcmul_(x.roll(x.shape[-1] // 2, -1), signed_sin)
