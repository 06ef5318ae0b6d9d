"""Rotary position embedding, NeoX / HF-Llama "rotate_half" style, in place on q and k.

    positions      int64 (or int32) [n]
    q              [n, num_heads * head_dim] or [n, num_heads, head_dim]    (unit last stride)
    k              [n, num_kv_heads * head_dim] or [n, num_kv_heads, head_dim]
    cos_sin_cache  [max_position, rot_dim]: cos in [:, :rot_dim/2], sin in [:, rot_dim/2:]
Per head, with h = rot_dim / 2, x1 = x[:h], x2 = x[h:rot_dim] (dims past rot_dim are untouched):
    x1' = x1 * cos - x2 * sin,   x2' = x2 * cos + x1 * sin        (math in float32)
rot_dim == head_dim for Llama.  One program per token rotates all its q and k heads.
"""
from __future__ import annotations

import torch

from pdcluster.kernels._triton import FLOAT_DTYPES, check, check_launch, next_pow2, tl, triton


@triton.jit
def _rotate(x_ptr, base, s_h, cos, sin,
            NUM_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    h = tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_HALF)
    mask = (h[:, None] < NUM_HEADS) & (j[None, :] < HALF)
    p1 = x_ptr + base + h[:, None] * s_h + j[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * cos[None, :] - x2 * sin[None, :]).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(p1 + HALF, (x2 * cos[None, :] + x1 * sin[None, :]).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    pos_ptr, q_ptr, k_ptr, cs_ptr,
    s_qt, s_qh, s_kt, s_kh, s_cs,              # q/k strides (token, head); cache row stride
    NUM_Q_HEADS: tl.constexpr, BLOCK_QH: tl.constexpr,
    NUM_K_HEADS: tl.constexpr, BLOCK_KH: tl.constexpr,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cs_ptr + pos * s_cs + j, mask=j < HALF, other=0.0).to(tl.float32)
    sin = tl.load(cs_ptr + pos * s_cs + HALF + j, mask=j < HALF, other=0.0).to(tl.float32)
    _rotate(q_ptr, t * s_qt, s_qh, cos, sin, NUM_Q_HEADS, BLOCK_QH, HALF, BLOCK_HALF)
    _rotate(k_ptr, t * s_kt, s_kh, cos, sin, NUM_K_HEADS, BLOCK_KH, HALF, BLOCK_HALF)


def _heads_view(x: torch.Tensor, head_dim: int, name: str) -> torch.Tensor:
    """[n, H*D] or [n, H, D] -> a [n, H, D] view sharing x's storage."""
    check(x.dim() in (2, 3), "rotary_embedding", f"{name} must be 2-D or 3-D, got {tuple(x.shape)}")
    if x.dim() == 3:
        check(x.shape[2] == head_dim, "rotary_embedding", f"{name} head_dim {x.shape[2]} != {head_dim}")
        return x
    check(x.shape[1] % head_dim == 0, "rotary_embedding",
          f"{name} width {x.shape[1]} is not a multiple of head_dim {head_dim}")
    check(x.stride(1) == 1, "rotary_embedding", f"{name} must have a unit last stride")
    return x.view(x.shape[0], x.shape[1] // head_dim, head_dim)


def _check(positions, q, k, cos_sin_cache, head_dim):
    n = "rotary_embedding"
    qv, kv = _heads_view(q, head_dim, "q"), _heads_view(k, head_dim, "k")
    check(positions.dim() == 1 and positions.dtype in (torch.int32, torch.int64) and positions.stride(0) == 1
          and qv.shape[0] == kv.shape[0] == positions.shape[0], n,
          f"positions must be contiguous int [n] with q/k of n rows, got {positions.dtype} "
          f"{tuple(positions.shape)}, q {tuple(q.shape)}, k {tuple(k.shape)}")
    check(q.dtype in FLOAT_DTYPES and q.dtype == k.dtype, n, f"q/k must share a float dtype, got {q.dtype}/{k.dtype}")
    check(qv.stride(2) == 1 and kv.stride(2) == 1, n, "head_dim must be the unit-stride dimension of q and k")
    check(cos_sin_cache.dim() == 2 and cos_sin_cache.shape[1] % 2 == 0 and cos_sin_cache.shape[1] <= head_dim
          and cos_sin_cache.stride(1) == 1 and cos_sin_cache.dtype in FLOAT_DTYPES, n,
          f"cos_sin_cache must be float [max_position, rot_dim] (rot_dim even, <= head_dim {head_dim}), "
          f"got {cos_sin_cache.dtype} {tuple(cos_sin_cache.shape)}")
    return qv, kv


def rotary_embedding(positions, q, k, cos_sin_cache, head_dim: int) -> None:
    """Triton launcher; rotates q and k in place (positions must be < cos_sin_cache.shape[0])."""
    qv, kv = _check(positions, q, k, cos_sin_cache, head_dim)
    check_launch("rotary_embedding", positions, q, k, cos_sin_cache)
    n = positions.shape[0]
    if n == 0:
        return
    half = cos_sin_cache.shape[1] // 2
    _rotary_kernel[(n,)](
        positions, qv, kv, cos_sin_cache,
        qv.stride(0), qv.stride(1), kv.stride(0), kv.stride(1), cos_sin_cache.stride(0),
        NUM_Q_HEADS=qv.shape[1], BLOCK_QH=next_pow2(qv.shape[1]),
        NUM_K_HEADS=kv.shape[1], BLOCK_KH=next_pow2(kv.shape[1]),
        HALF=half, BLOCK_HALF=next_pow2(half),
        num_warps=4 if qv.shape[1] * head_dim >= 2048 else 1,
    )


def rotary_embedding_ref(positions, q, k, cos_sin_cache, head_dim: int) -> None:
    """Torch reference (and the CPU path), in place."""
    qv, kv = _check(positions, q, k, cos_sin_cache, head_dim)
    half = cos_sin_cache.shape[1] // 2
    cs = cos_sin_cache[positions.long()].float()               # [n, rot_dim]
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    for x in (qv, kv):
        x1, x2 = x[..., :half], x[..., half:2 * half]
        f1, f2 = x1.float(), x2.float()
        o1, o2 = f1 * cos - f2 * sin, f2 * cos + f1 * sin       # both computed before either write
        x1.copy_(o1)
        x2.copy_(o2)
