"""store_kv: write new K/V rows into their paged cache slots.

    k, v          [num_tokens, num_kv_heads, head_dim]   (any token/head strides, unit head_dim stride)
    k_cache       [num_blocks, block_size, num_kv_heads, head_dim]   (v_cache alike), written in place
    slot_mapping  int64 (or int32) [num_tokens]; slot = block_id * block_size + row; -1 = skip (padding)
One program per token writes all its kv heads of K and V.
"""
from __future__ import annotations

from pdcluster.kernels._triton import FLOAT_DTYPES, INDEX_DTYPES, check, check_launch, next_pow2, tl, triton


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
    s_kt, s_kh, s_vt, s_vh,                    # k, v strides (token, head)
    s_kcb, s_kcr, s_kch,                       # k_cache strides (block, row, head)
    s_vcb, s_vcr, s_vch,
    BLOCK_SIZE: tl.constexpr,
    NUM_HEADS: tl.constexpr, BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        blk = slot // BLOCK_SIZE
        row = slot % BLOCK_SIZE
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        mask = (h[:, None] < NUM_HEADS) & (d[None, :] < HEAD_DIM)
        k = tl.load(k_ptr + t * s_kt + h[:, None] * s_kh + d[None, :], mask=mask)
        v = tl.load(v_ptr + t * s_vt + h[:, None] * s_vh + d[None, :], mask=mask)
        tl.store(kc_ptr + blk * s_kcb + row * s_kcr + h[:, None] * s_kch + d[None, :], k, mask=mask)
        tl.store(vc_ptr + blk * s_vcb + row * s_vcr + h[:, None] * s_vch + d[None, :], v, mask=mask)


def _check(k, v, k_cache, v_cache, slot_mapping) -> None:
    n = "store_kv"
    check(k.dim() == 3 and k.shape == v.shape, n,
          f"k/v must be equal [num_tokens, num_kv_heads, head_dim], got {tuple(k.shape)} and {tuple(v.shape)}")
    check(k_cache.dim() == 4 and k_cache.shape == v_cache.shape, n,
          f"k_cache/v_cache must be equal [num_blocks, block_size, num_kv_heads, head_dim], "
          f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    check(k.shape[1:] == k_cache.shape[2:], n,
          f"k rows {tuple(k.shape[1:])} do not match cache rows {tuple(k_cache.shape[2:])}")
    check(k.dtype in FLOAT_DTYPES and k.dtype == v.dtype == k_cache.dtype == v_cache.dtype, n,
          f"k/v/k_cache/v_cache must share one float dtype, got {k.dtype}/{v.dtype}/{k_cache.dtype}/{v_cache.dtype}")
    check(k.stride(2) == 1 and v.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1, n,
          "head_dim must be the unit-stride dimension of k, v and the caches")
    check(slot_mapping.dtype in INDEX_DTYPES and slot_mapping.shape == (k.shape[0],)
          and slot_mapping.stride(0) == 1, n,
          f"slot_mapping must be contiguous int64/int32 [{k.shape[0]}], got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")


def store_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Triton launcher: k_cache/v_cache[slot // bs, slot % bs] = k/v[t] for every slot >= 0."""
    _check(k, v, k_cache, v_cache, slot_mapping)
    check_launch("store_kv", k, v, k_cache, v_cache, slot_mapping)
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        BLOCK_SIZE=k_cache.shape[1],
        NUM_HEADS=num_heads, BLOCK_H=next_pow2(num_heads),
        HEAD_DIM=head_dim, BLOCK_D=next_pow2(head_dim),
        num_warps=4 if num_heads * head_dim >= 1024 else 1,
    )


def store_kv_ref(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Torch reference (and the CPU path): index-put of the non-padding rows."""
    _check(k, v, k_cache, v_cache, slot_mapping)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    block_size = k_cache.shape[1]
    blk, row = slots // block_size, slots % block_size
    k_cache[blk, row] = k[keep]
    v_cache[blk, row] = v[keep]
