"""Paged prefill attention: causal attention of a ragged chunk of new tokens over the paged cache.

Sequence i's new tokens are q[cu_seqlens_q[i]:cu_seqlens_q[i+1]] (n_new_i of them); its KV is the
first seq_lens_k[i] positions of its paged cache: the cached prefix followed by the new tokens
themselves, which store_kv has ALREADY written.  New token j sits at absolute position
seq_lens_k[i] - n_new_i + j and attends to positions <= its own.  Requires seq_lens_k[i] >= n_new_i.

Shapes (one layer):
    q            [total_new_tokens, num_heads, head_dim]
    k_cache      [num_blocks, block_size, num_kv_heads, head_dim]   (v_cache alike)
    block_tables int32 [num_seqs, max_blocks_per_seq]
    cu_seqlens_q int32 [num_seqs + 1], cu_seqlens_q[0] == 0
    seq_lens_k   int32 [num_seqs]
    (each of the three int32 or int64)
    k_scale      optional float32 [num_blocks, num_kv_heads] (v_scale alike): quantized caches
                 (int8 / float8_e4m3fn codes, kernels/store_kv.py), dequantized on the fly
    out          [total_new_tokens, num_heads, head_dim], q.dtype
One program per (query tile of BLOCK_M new tokens, sequence, query head); it walks KV tiles of
BLOCK_N positions up to the tile's last query position (causal tiles past it are skipped).
"""
from __future__ import annotations

import torch

from pdcluster.kernels._triton import INDEX_DTYPES, check, check_launch, check_paged_kv, new_empty, next_pow2, tl, triton
from pdcluster.kernels.attention_tile import attend_tile

LOG2E = 1.4426950408889634


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, cu_q_ptr, lens_k_ptr, out_ptr,
    ks_ptr, vs_ptr,                            # scales [num_blocks, num_kv_heads] (QUANT only)
    qk_scale,                                  # softmax scale * log2(e)
    s_qt, s_qh,                                # q strides (token, head)
    s_kb, s_kr, s_kh,                          # k_cache strides (block, row, head)
    s_vb, s_vr, s_vh,
    s_bt,
    s_ot, s_oh,
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    QUANT: tl.constexpr = False, NUM_KV_HEADS: tl.constexpr = 1,
):
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + seq).to(tl.int32)
    n_new = tl.load(cu_q_ptr + seq + 1).to(tl.int32) - q_start
    if tile * BLOCK_M < n_new:                  # grid is sized for the longest chunk
        seq_len = tl.load(lens_k_ptr + seq).to(tl.int32)
        ctx = seq_len - n_new                   # cached prefix length
        kvh = head // GROUP
        m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, BLOCK_D)
        m_mask = m < n_new
        d_mask = d < HEAD_DIM
        q_pos = ctx + m                                         # absolute positions [BLOCK_M]
        q = tl.load(q_ptr + (q_start + m)[:, None] * s_qt + head * s_qh + d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # Last position any row of this tile may see, + 1.  Position 0 is in the first KV tile and
        # visible to every row, so no row's max stays -inf after it.
        end = tl.minimum(seq_len, ctx + (tile + 1) * BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        for n0 in range(0, end, BLOCK_N):
            pos = n0 + offs_n
            n_mask = pos < end
            blk = tl.load(bt_ptr + seq * s_bt + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
            row = pos % BLOCK_SIZE
            kv_mask = n_mask[:, None] & d_mask[None, :]
            causal = n_mask[None, :] & (pos[None, :] <= q_pos[:, None])     # [BLOCK_M, BLOCK_N]
            ks = None
            vs = None
            if QUANT:
                ks = tl.load(ks_ptr + blk * NUM_KV_HEADS + kvh, mask=n_mask, other=0.0)
                vs = tl.load(vs_ptr + blk * NUM_KV_HEADS + kvh, mask=n_mask, other=0.0)
            m_i, l_i, acc = attend_tile(q, k_ptr + (blk * s_kb + row * s_kr + kvh * s_kh)[:, None] + d[None, :],
                                        v_ptr + (blk * s_vb + row * s_vr + kvh * s_vh)[:, None] + d[None, :],
                                        kv_mask, causal, m_i, l_i, acc, qk_scale, PRECISION,
                                        ks, vs, QUANT)

        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + (q_start + m)[:, None] * s_ot + head * s_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def _check(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k, k_scale=None, v_scale=None) -> bool:
    """Checks the arguments; whether the caches are quantized."""
    n = "paged_prefill_attention"
    check(q.dim() == 3, n, f"q must be [total_new_tokens, num_heads, head_dim], got {tuple(q.shape)}")
    quant = check_paged_kv(n, q, k_cache, v_cache, k_scale, v_scale)
    num_seqs = seq_lens_k.shape[0] if seq_lens_k.dim() == 1 else -1
    check(seq_lens_k.dtype in INDEX_DTYPES and seq_lens_k.dim() == 1 and seq_lens_k.stride(0) == 1, n,
          f"seq_lens_k must be contiguous int32/int64 [num_seqs], got {seq_lens_k.dtype} {tuple(seq_lens_k.shape)}")
    check(cu_seqlens_q.dtype in INDEX_DTYPES and cu_seqlens_q.shape == (num_seqs + 1,)
          and cu_seqlens_q.stride(0) == 1, n,
          f"cu_seqlens_q must be contiguous int32/int64 [num_seqs + 1 = {num_seqs + 1}], "
          f"got {cu_seqlens_q.dtype} {tuple(cu_seqlens_q.shape)}")
    check(block_tables.dtype in INDEX_DTYPES and block_tables.dim() == 2
          and block_tables.shape[0] == num_seqs and block_tables.stride(1) == 1, n,
          f"block_tables must be int32/int64 [num_seqs={num_seqs}, max_blocks] with unit column stride, "
          f"got {block_tables.dtype} {tuple(block_tables.shape)}")
    return quant


def paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k, scale: float,
                            *, k_scale=None, v_scale=None,
                            max_seqlen_q: int | None = None, block_m: int | None = None,
                            block_n: int | None = None, num_warps: int = 4,
                            num_stages: int = 2) -> torch.Tensor:
    """Triton launcher; see the module docstring. Pass max_seqlen_q (longest chunk) to avoid a
    device->host sync; block_m/block_n are tile sizes (powers of 2 >= 16)."""
    quant = _check(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k, k_scale, v_scale)
    check_launch("paged_prefill_attention", q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k,
                 *([k_scale, v_scale] if quant else []))
    total, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens_k.shape[0]
    out = new_empty((total, num_heads, head_dim), q.dtype, q.device)
    if num_seqs == 0 or total == 0:
        return out
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    block_m = block_m or (64 if head_dim <= 128 else 32)
    block_n = block_n or (64 if head_dim <= 128 else 32)
    for name, b in (("block_m", block_m), ("block_n", block_n)):
        check(b >= 16 and b & (b - 1) == 0, "paged_prefill_attention", f"{name} must be a power of 2 >= 16, got {b}")
    if max_seqlen_q == 0:
        return out
    grid = (triton.cdiv(max_seqlen_q, block_m), num_seqs, num_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k, out,
        k_scale if quant else q, v_scale if quant else q,
        float(scale) * LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        BLOCK_SIZE=block_size, GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim, BLOCK_D=max(16, next_pow2(head_dim)),
        BLOCK_M=block_m, BLOCK_N=block_n,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        QUANT=quant, NUM_KV_HEADS=num_kv_heads,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def paged_prefill_attention_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k,
                                scale: float, *, k_scale=None, v_scale=None, **_unused) -> torch.Tensor:
    """Torch reference (and the CPU path): per sequence, gather its blocks (dequantized when
    quantized) and run SDPA in fp32 with an offset causal mask.  Extra keyword arguments of the
    launcher are accepted and ignored."""
    quant = _check(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k, k_scale, v_scale)
    total, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    out = torch.zeros_like(q)
    cu = cu_seqlens_q.tolist()
    lens = seq_lens_k.tolist()
    for i, seq_len in enumerate(lens):
        a, b = cu[i], cu[i + 1]
        n_new = b - a
        if n_new == 0:
            continue
        if seq_len < n_new:
            raise ValueError(f"paged_prefill_attention: seq_lens_k[{i}]={seq_len} < new tokens {n_new}")
        blocks = block_tables[i, : -(-seq_len // block_size)].long()
        k, v = k_cache[blocks].float(), v_cache[blocks].float()              # [nb, bs, kvh, D]
        if quant:
            k, v = k * k_scale[blocks][:, None, :, None], v * v_scale[blocks][:, None, :, None]
        k = k.reshape(-1, num_kv_heads, head_dim)[:seq_len]                  # [L, kvh, D]
        v = v.reshape(-1, num_kv_heads, head_dim)[:seq_len]
        k = k.float().transpose(0, 1).repeat_interleave(group, dim=0)          # [H, L, D]
        v = v.float().transpose(0, 1).repeat_interleave(group, dim=0)
        qi = q[a:b].float().transpose(0, 1)                                    # [H, n_new, D]
        q_pos = torch.arange(seq_len - n_new, seq_len, device=q.device)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]   # [n_new, L]
        o = torch.nn.functional.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=scale)
        out[a:b] = o.transpose(0, 1).to(q.dtype)
    return out


def paged_chunk_attention_cpu(q, k_cache, v_cache, block_table, ctx_len: int, scale: float) -> torch.Tensor:
    """One sequence's chunk through pdcluster::paged_chunk_attention (prefill_attention.cpp, built by
    engine/cpu_ext.py; float32 on CPU, where decode_attention.cpu_kernel_fits): q [Q, H, D] are the last Q of its
    ctx_len positions, block_table int64 [W]. The same result as paged_prefill_attention_ref with
    cu_seqlens_q = [0, Q], seq_lens_k = [ctx_len] and block_table as its one row; K/V read in place."""
    return torch.ops.pdcluster.paged_chunk_attention(q, k_cache, v_cache, block_table, ctx_len, scale)
