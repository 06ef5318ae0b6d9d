"""store_kv: write new K/V rows into their paged cache slots; a quantized cache quantizes them.

    k, v          [num_tokens, num_kv_heads, head_dim]   (any token/head strides, unit head_dim stride)
    k_cache       [num_blocks, block_size, num_kv_heads, head_dim]   (v_cache alike), written in place
    slot_mapping  int64 (or int32) [num_tokens]; slot = block_id * block_size + row; -1 = skip (padding)
One program per token writes all its kv heads of K and V.

Quantized caches (k_scale / v_scale given): the caches are int8 or float8_e4m3fn and hold
x ~= q * scale[block, kv_head], scales float32 [num_blocks, num_kv_heads]: the wire codec's format
(kv_transfer/codec.py), so a compressed transfer lands as it is. A block's scale is
amax(|rows written so far|) / QMAX and only grows while the block fills:
  - the first row written into a block this call is its "lead"; lead row 0 = a fresh block: its
    old scale (a previous owner's) is dropped;
  - otherwise, when the new rows raise the scale, the lead's program requantizes the block's
    earlier rows [0, lead row) to the new scale (q' = round(q * old / new)); the new rows are
    rows >= lead row, so no two programs touch one element.
Invariants the quantized path relies on: every slot >= 0 (the engine never pads), and the tokens
that write one block are consecutive in slot_mapping in row order (a sequence's positions).
Error per element: int8 scale / 2 per rounding; a requantized row rounds once more per scale
increase (bounded by the rows of a block, block_size - 1 increases at most).
"""
from __future__ import annotations

import warnings

import torch

from pdcluster.kernels._triton import FLOAT_DTYPES, INDEX_DTYPES, check, check_launch, next_pow2, tl, triton
from pdcluster.kernels.pack_kv import QMAX, _round_to_e4m3

QUANT_DTYPES = {torch.int8: "int8", torch.float8_e4m3fn: "fp8"}   # cache dtype -> codec name
warnings.filterwarnings("ignore", message="index_reduce", category=UserWarning)   # "in beta": used as documented


@triton.jit
def _quantize(x, inv, qmax, QUANT: tl.constexpr):
    """float32 x * inv, clamped to +-qmax and rounded: int8 half away from zero, fp8 to nearest even."""
    y = tl.minimum(tl.maximum(x * inv, -qmax), qmax)
    if QUANT == 1:      # constexpr: one branch is compiled, so `q` has one type (one return: Triton wants one)
        q = tl.where(y >= 0, tl.floor(y + 0.5), tl.ceil(y - 0.5)).to(tl.int8)
    else:
        q = _round_to_e4m3(y).to(tl.float8e4nv)
    return q


@triton.jit
def _store_one(x_ptr, c_ptr, blk, row, lead_row, h, d, mask, s_cb, s_cr, s_ch,
               sc_ptr, old_ptr, t, num_heads, qmax,
               BLOCK_SIZE: tl.constexpr, QUANT: tl.constexpr):
    """Token t's rows x [BLOCK_H, BLOCK_D] (loaded from x_ptr) into cache c_ptr at (blk, row)."""
    x = tl.load(x_ptr, mask=mask)
    dst = c_ptr + blk * s_cb + row * s_cr + h[:, None] * s_ch + d[None, :]
    if QUANT == 0:
        tl.store(dst, x, mask=mask)
    else:
        h_mask = h < num_heads
        new = tl.load(sc_ptr + blk * num_heads + h, mask=h_mask, other=1.0)     # [BLOCK_H] final scale
        inv = tl.where(new > 0, 1.0 / tl.where(new > 0, new, 1.0), 0.0)
        if row == lead_row and row > 0:         # the lead of a partly filled block: requantize rows < row
            old = tl.load(old_ptr + t * num_heads + h, mask=h_mask, other=0.0)
            ratio = tl.where(new > 0, old / tl.where(new > 0, new, 1.0), 0.0)
            for r in range(0, row):
                p = c_ptr + blk * s_cb + r * s_cr + h[:, None] * s_ch + d[None, :]
                q = tl.load(p, mask=mask).to(tl.float32)
                tl.store(p, _quantize(q, ratio[:, None], qmax, QUANT), mask=mask)
        tl.store(dst, _quantize(x.to(tl.float32), inv[:, None], qmax, QUANT), mask=mask)


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
    ks_ptr, vs_ptr, kold_ptr, vold_ptr, lead_ptr,   # quantized caches only (else unused)
    s_kt, s_kh, s_vt, s_vh,                    # k, v strides (token, head)
    s_kcb, s_kcr, s_kch,                       # k_cache strides (block, row, head)
    s_vcb, s_vcr, s_vch,
    qmax,
    BLOCK_SIZE: tl.constexpr,
    NUM_HEADS: tl.constexpr, BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    QUANT: tl.constexpr,                       # 0 float cache, 1 int8, 2 fp8
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        blk = slot // BLOCK_SIZE
        row = slot % BLOCK_SIZE
        lead_row = row
        if QUANT != 0:
            lead_row = tl.load(lead_ptr + t).to(tl.int64)
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        mask = (h[:, None] < NUM_HEADS) & (d[None, :] < HEAD_DIM)
        _store_one(k_ptr + t * s_kt + h[:, None] * s_kh + d[None, :], kc_ptr, blk, row, lead_row, h, d, mask,
                   s_kcb, s_kcr, s_kch, ks_ptr, kold_ptr, t, NUM_HEADS, qmax, BLOCK_SIZE, QUANT)
        _store_one(v_ptr + t * s_vt + h[:, None] * s_vh + d[None, :], vc_ptr, blk, row, lead_row, h, d, mask,
                   s_vcb, s_vcr, s_vch, vs_ptr, vold_ptr, t, NUM_HEADS, qmax, BLOCK_SIZE, QUANT)


def _check(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> str | None:
    """Checks the arguments; the cache's codec ("int8" / "fp8") or None for a float cache."""
    n = "store_kv"
    check(k.dim() == 3 and k.shape == v.shape, n,
          f"k/v must be equal [num_tokens, num_kv_heads, head_dim], got {tuple(k.shape)} and {tuple(v.shape)}")
    check(k_cache.dim() == 4 and k_cache.shape == v_cache.shape, n,
          f"k_cache/v_cache must be equal [num_blocks, block_size, num_kv_heads, head_dim], "
          f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    check(k.shape[1:] == k_cache.shape[2:], n,
          f"k rows {tuple(k.shape[1:])} do not match cache rows {tuple(k_cache.shape[2:])}")
    check(k.stride(2) == 1 and v.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1, n,
          "head_dim must be the unit-stride dimension of k, v and the caches")
    check(slot_mapping.dtype in INDEX_DTYPES and slot_mapping.shape == (k.shape[0],)
          and slot_mapping.stride(0) == 1, n,
          f"slot_mapping must be contiguous int64/int32 [{k.shape[0]}], got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    if k_scale is None and v_scale is None:
        check(k.dtype in FLOAT_DTYPES and k.dtype == v.dtype == k_cache.dtype == v_cache.dtype, n,
              f"k/v/k_cache/v_cache must share one float dtype, got {k.dtype}/{v.dtype}/{k_cache.dtype}/{v_cache.dtype}")
        return None
    codec = QUANT_DTYPES.get(k_cache.dtype)
    check(codec is not None and k_cache.dtype == v_cache.dtype and k.dtype in FLOAT_DTYPES and k.dtype == v.dtype, n,
          f"a quantized cache is int8 or float8_e4m3fn beside float k/v, got caches {k_cache.dtype}/"
          f"{v_cache.dtype}, k/v {k.dtype}/{v.dtype}")
    want = (k_cache.shape[0], k_cache.shape[2])
    for s in (k_scale, v_scale):
        check(s is not None and s.dtype == torch.float32 and tuple(s.shape) == want and s.is_contiguous(), n,
              f"k_scale/v_scale must be contiguous float32 [num_blocks, num_kv_heads] = {list(want)}")
    check(k_cache.is_contiguous() and v_cache.is_contiguous(), n, "quantized caches must be contiguous")
    return codec


def update_scales(x: torch.Tensor, scales: torch.Tensor, blk: torch.Tensor, lead_row: torch.Tensor,
                  codec: str) -> torch.Tensor:
    """Raise scales [num_blocks, H] in place to cover the new rows x [T, H, D] written into blocks
    blk [T] (a fresh block, lead_row 0, restarts from 0). Returns the old scales per token [T, H]
    (0 for a fresh block): what the block's earlier rows were quantized with. No host sync."""
    H = scales.shape[1]
    old = torch.where((lead_row == 0)[:, None], 0.0, scales[blk])               # [T, H]
    idx = (blk[:, None] * H + torch.arange(H, device=blk.device)).reshape(-1)
    flat = scales.view(-1)
    flat.index_put_((idx,), old.reshape(-1))                                   # fresh blocks -> 0
    amax = x.detach().abs().amax(-1).float() / QMAX[codec]                     # [T, H]
    flat.scatter_reduce_(0, idx, amax.reshape(-1), reduce="amax", include_self=True)
    return old


def lead_rows(slot_mapping: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(block [T], row [T], row of the first token this call writes into the same block [T])."""
    s = slot_mapping.long()
    blk, row = s // block_size, s % block_size
    t = torch.arange(s.shape[0], device=s.device)
    first = torch.ones_like(blk, dtype=torch.bool)
    first[1:] = blk[1:] != blk[:-1]
    lead = torch.cummax(torch.where(first, t, 0), 0).values
    return blk, row, row[lead]


def quantize(x: torch.Tensor, inv: torch.Tensor, codec: str) -> torch.Tensor:
    """Torch twin of the kernel's _quantize: x * inv clamped and rounded into the codec's dtype
    (int8: trunc(y + copysign(0.5, y)), i.e. half away from zero)."""
    qmax = QMAX[codec]
    y = (x.float() * inv).clamp_(-qmax, qmax)
    if codec == "int8":
        return y.add_(torch.copysign(torch.full((), 0.5), y)).trunc_().to(torch.int8)
    return y.to(torch.float8_e4m3fn)


_plan: list = [(None, 0, None)]   # [(slot_mapping, block_size, its plan)]: every layer of a step passes the
                                  #   same tensor (a new one per step; held here, so its id cannot be reused
                                  #   meanwhile); one tuple swapped whole, so engines on two threads stay apart


def _store_plan(slot_mapping: torch.Tensor, block_size: int):
    """(blk, row, fresh [T] bool, grow [T] bool: lead of a partly filled block, any grow), once per
    slot_mapping (the check for padding too)."""
    slots, bs, plan = _plan[0]
    if slots is slot_mapping and bs == block_size:
        return plan
    check(bool((slot_mapping >= 0).all()), "store_kv", "a quantized cache takes no padding slots (-1)")
    blk, row, lead = lead_rows(slot_mapping, block_size)
    grow = (lead == row) & (row > 0)
    plan = blk, row, lead == 0, grow, bool(grow.any())
    _plan[0] = (slot_mapping, block_size, plan)
    return plan


def _store_quantized_ref(x, cache, scales, blk, row, fresh, grow, any_grow, codec) -> None:
    """x [G, T, H, D] into cache [G, num_blocks, block_size, H, D] at (blk, row), with scales
    [G, num_blocks, H] raised to cover it. G = 2: K and V in one pass (store_kv_pair_ref), or 1."""
    old = scales[:, blk].masked_fill_(fresh[None, :, None], 0.0)                  # [G, T, H]
    new = torch.maximum(old, x.abs().amax(-1).float().div_(QMAX[codec]))
    scales.index_reduce_(1, blk, new, "amax", include_self=False)               # fresh blocks restart
    new = scales[:, blk]
    # 1 / scale; a zero scale means all-zero rows, which any finite inv maps to code 0 (as the kernel's 0)
    inv = new.clamp_min(1e-30).reciprocal_()
    if any_grow:
        g = grow & (new > old).any(-1).any(0)            # leads whose earlier rows need the new scale
        if bool(g.any()):
            b, r = blk[g], row[g]
            ratio = old[:, g] / new[:, g]                  # as the kernel: exactly 1 where unchanged
            before = torch.arange(cache.shape[2], device=r.device)[None, :] < r[:, None]               # [n, bs]
            cur = cache[:, b]                                                          # [G, n, bs, H, D]
            requant = quantize(cur.float(), ratio[:, :, None, :, None], codec)
            cache[:, b] = torch.where(before[None, :, :, None, None], requant, cur)
    cache[:, blk, row] = quantize(x, inv[..., None], codec)


def store_kv_pair_ref(kv: torch.Tensor, kv_cache: torch.Tensor, kv_scale: torch.Tensor, slot_mapping) -> None:
    """store_kv_ref for a quantized layer whose K and V live in one tensor each: kv [2, T, H, D] into
    kv_cache [2, num_blocks, block_size, H, D] (int8 / fp8) with scales kv_scale [2, num_blocks, H];
    half the ops of two calls (the CPU engine's path: engine/kv_quant.py allocates caches so)."""
    codec = _check(kv[0], kv[1], kv_cache[0], kv_cache[1], slot_mapping, kv_scale[0], kv_scale[1])
    if kv.shape[1]:
        _store_quantized_ref(kv, kv_cache, kv_scale, *_store_plan(slot_mapping, kv_cache.shape[2]), codec)


def store_kv(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    """Triton launcher: k_cache/v_cache[slot // bs, slot % bs] = k/v[t] for every slot >= 0
    (quantized, with the block scales updated, when k_scale/v_scale are given)."""
    codec = _check(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    check_launch("store_kv", k, v, k_cache, v_cache, slot_mapping, *([k_scale, v_scale] if codec else []))
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    block_size = k_cache.shape[1]
    ks = vs = kold = vold = lead = k                     # unused placeholders for a float cache
    if codec:
        blk, _, lead = lead_rows(slot_mapping, block_size)
        kold = update_scales(k, k_scale, blk, lead, codec)
        vold = update_scales(v, v_scale, blk, lead, codec)
        ks, vs = k_scale, v_scale
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, ks, vs, kold, vold, lead,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        QMAX.get(codec, 1.0),
        BLOCK_SIZE=block_size,
        NUM_HEADS=num_heads, BLOCK_H=next_pow2(num_heads),
        HEAD_DIM=head_dim, BLOCK_D=next_pow2(head_dim),
        QUANT=(None, "int8", "fp8").index(codec),
        num_warps=4 if num_heads * head_dim >= 1024 else 1,
    )


def store_kv_ref(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    """Torch reference (and the CPU path): index-put of the non-padding rows (quantized caches:
    the same scale update and requantization as the kernel)."""
    codec = _check(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    block_size = k_cache.shape[1]
    if codec is None:
        keep = slot_mapping >= 0
        slots = slot_mapping[keep]
        blk, row = slots // block_size, slots % block_size
        k_cache[blk, row] = k[keep]
        v_cache[blk, row] = v[keep]
        return
    if k.shape[0] == 0:
        return
    plan = _store_plan(slot_mapping, block_size)
    _store_quantized_ref(k[None], k_cache[None], k_scale[None], *plan, codec)
    _store_quantized_ref(v[None], v_cache[None], v_scale[None], *plan, codec)
