"""Paged decode attention: one new query token per sequence over its paged KV cache.

Split-KV (flash-decoding): the context of each sequence is cut into `num_splits` ranges of whole
BLOCK_N tiles; one program per (sequence, kv head, split) runs an online softmax over its range
for all GROUP query heads that share that kv head (GQA grouping: each K/V row is read once per
group, not once per query head).  A second kernel merges the splits by their log-sum-exp.
With one split the first kernel writes the output directly.

Shapes (one layer):
    q            [num_seqs, num_heads, head_dim]
    k_cache      [num_blocks, block_size, num_kv_heads, head_dim]   (v_cache alike)
    block_tables int32 (or int64) [num_seqs, max_blocks_per_seq]; position t of sequence s lives in
                 block block_tables[s, t // block_size], row t % block_size
    seq_lens     int32 (or int64) [num_seqs]; 0 = empty slot, its output row is zeros
    k_scale      optional float32 [num_blocks, num_kv_heads] (v_scale alike): the caches are int8 /
                 float8_e4m3fn codes, x = q * scale[block, kv_head] (kernels/store_kv.py), dequantized
                 on the fly
    out          [num_seqs, num_heads, head_dim], q.dtype
Entries of block_tables past a sequence's last block are never read.
"""
from __future__ import annotations

import functools

import torch

from pdcluster.kernels._triton import INDEX_DTYPES, check, check_launch, check_paged_kv, new_empty, next_pow2, tl, triton
from pdcluster.kernels.attention_tile import attend_tile

LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr, po_ptr, plse_ptr,
    ks_ptr, vs_ptr,                            # scales [num_blocks, num_kv_heads] (QUANT only)
    qk_scale,                                  # softmax scale * log2(e): scores live in log2 units
    num_heads, num_splits,
    s_qs, s_qh,                                # q strides (seq, head); head_dim is unit-stride
    s_kb, s_kr, s_kh,                          # k_cache strides (block, row, head)
    s_vb, s_vr, s_vh,
    s_bt,                                      # block_tables row stride
    s_os, s_oh,                                # out strides (used when SINGLE_SPLIT)
    BLOCK_SIZE: tl.constexpr,                  # tokens per cache block
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr,   # query heads per kv head, padded to >= 16
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,                     # KV positions per loop step
    SINGLE_SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
    QUANT: tl.constexpr = False, NUM_KV_HEADS: tl.constexpr = 1,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(lens_ptr + seq).to(tl.int32)

    # This split's range [start, end): whole tiles, the last split may be short or empty.
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), num_splits)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    heads = kvh * GROUP + g                                     # [BLOCK_G] query heads
    q = tl.load(q_ptr + seq * s_qs + heads[:, None] * s_qh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)      # running max (log2 units)
    l_i = tl.zeros([BLOCK_G], tl.float32)                     # running sum of exp2
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        n_mask = pos < end                                      # every tile has >= 1 valid row
        blk = tl.load(bt_ptr + seq * s_bt + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        row = pos % BLOCK_SIZE
        kv_mask = n_mask[:, None] & d_mask[None, :]
        ks = None
        vs = None
        if QUANT:
            ks = tl.load(ks_ptr + blk * NUM_KV_HEADS + kvh, mask=n_mask, other=0.0)
            vs = tl.load(vs_ptr + blk * NUM_KV_HEADS + kvh, mask=n_mask, other=0.0)
        m_i, l_i, acc = attend_tile(q, k_ptr + (blk * s_kb + row * s_kr + kvh * s_kh)[:, None] + d[None, :],
                                    v_ptr + (blk * s_vb + row * s_vr + kvh * s_vh)[:, None] + d[None, :],
                                    kv_mask, n_mask[None, :], m_i, l_i, acc, qk_scale, PRECISION,
                                    ks, vs, QUANT)

    has = l_i > 0                                               # false for an empty range
    o = acc / tl.where(has, l_i, 1.0)[:, None]                 # zeros where empty
    o_mask = g_mask[:, None] & d_mask[None, :]
    if SINGLE_SPLIT:
        tl.store(out_ptr + seq * s_os + heads[:, None] * s_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        # partials: po [num_seqs, num_heads, num_splits, HEAD_DIM], plse [num_seqs, num_heads, num_splits]
        row_id = (seq * num_heads + heads) * num_splits + split
        tl.store(po_ptr + row_id[:, None] * HEAD_DIM + d[None, :], o, mask=o_mask)
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(plse_ptr + row_id, lse, mask=g_mask)


@triton.jit
def _decode_reduce_kernel(
    po_ptr, plse_ptr, out_ptr,
    num_heads, num_splits,
    s_os, s_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = sp < num_splits
    base = (seq * num_heads + head) * num_splits
    lse = tl.load(plse_ptr + base + sp, mask=s_mask, other=float("-inf"))   # [BLOCK_S]
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)                   # all splits empty: weights all 0
    w = tl.exp2(lse - m)
    denom = tl.sum(w, 0)
    o = tl.load(po_ptr + (base + sp)[:, None] * HEAD_DIM + d[None, :],
                mask=s_mask[:, None] & (d[None, :] < HEAD_DIM), other=0.0)  # [BLOCK_S, BLOCK_D]
    res = tl.sum(o * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + seq * s_os + head * s_oh + d, res.to(out_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)


def _check(q, k_cache, v_cache, block_tables, seq_lens, k_scale=None, v_scale=None) -> bool:
    """Checks the arguments; whether the caches are quantized."""
    n = "paged_decode_attention"
    check(q.dim() == 3, n, f"q must be [num_seqs, num_heads, head_dim], got {tuple(q.shape)}")
    quant = check_paged_kv(n, q, k_cache, v_cache, k_scale, v_scale)
    num_seqs = q.shape[0]
    check(block_tables.dtype in INDEX_DTYPES and block_tables.dim() == 2
          and block_tables.shape[0] == num_seqs and block_tables.stride(1) == 1, n,
          f"block_tables must be int32/int64 [num_seqs={num_seqs}, max_blocks] with unit column stride, "
          f"got {block_tables.dtype} {tuple(block_tables.shape)}")
    check(seq_lens.dtype in INDEX_DTYPES and seq_lens.shape == (num_seqs,) and seq_lens.stride(0) == 1, n,
          f"seq_lens must be contiguous int32/int64 [{num_seqs}], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    return quant


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def default_num_splits(num_seqs: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """Enough programs to fill the GPU (~4 per SM), but >= 256 positions per split.

    Uses only host-side sizes (max_context = block_tables width * block_size), so no device sync.
    """
    sms = _num_sms(torch.device(device))
    programs = max(1, num_seqs * num_kv_heads)
    want = -(-4 * sms // programs)
    return max(1, min(want, -(-max_context // 256), 64))


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale: float,
                           num_splits: int | None = None, *, k_scale=None, v_scale=None,
                           block_n: int | None = None, num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """Triton launcher; see the module docstring for shapes. block_n: KV tile (a power of 2 >= 16)."""
    quant = _check(q, k_cache, v_cache, block_tables, seq_lens, k_scale, v_scale)
    check_launch("paged_decode_attention", q, k_cache, v_cache, block_tables, seq_lens,
                 *([k_scale, v_scale] if quant else []))
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    if num_splits is None:
        num_splits = default_num_splits(num_seqs, num_kv_heads, block_tables.shape[1] * block_size, q.device)
    check(isinstance(num_splits, int) and num_splits >= 1, "paged_decode_attention",
          f"num_splits must be an int >= 1, got {num_splits!r}")
    if block_n is None:
        block_n = 64 if head_dim <= 128 else 32
    check(block_n >= 16 and block_n & (block_n - 1) == 0, "paged_decode_attention",
          f"block_n must be a power of 2 >= 16, got {block_n}")
    out = new_empty((num_seqs, num_heads, head_dim), q.dtype, q.device)
    if num_seqs == 0:
        return out
    single = num_splits == 1
    if single:
        po = plse = out                                     # unused
    else:
        po = new_empty((num_seqs, num_heads, num_splits, head_dim), torch.float32, q.device)
        plse = new_empty((num_seqs, num_heads, num_splits), torch.float32, q.device)
    block_d = max(16, next_pow2(head_dim))
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, po, plse,
        k_scale if quant else q, v_scale if quant else q,
        float(scale) * LOG2E, num_heads, num_splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        BLOCK_SIZE=block_size, GROUP=group, BLOCK_G=max(16, next_pow2(group)),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=block_n,
        SINGLE_SPLIT=single, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        QUANT=quant, NUM_KV_HEADS=num_kv_heads,
        num_warps=num_warps, num_stages=num_stages,
    )
    if not single:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            po, plse, out, num_heads, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=next_pow2(num_splits), num_warps=4,
        )
    return out


def paged_decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale: float,
                               num_splits: int | None = None, *, k_scale=None, v_scale=None) -> torch.Tensor:
    """Torch reference (and the CPU path): gather each sequence's blocks (dequantized to float32
    when quantized), masked softmax in fp32.

    num_splits is accepted for signature parity and ignored (the math is split-free).
    """
    quant = _check(q, k_cache, v_cache, block_tables, seq_lens, k_scale, v_scale)
    num_seqs, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    out = torch.zeros_like(q)
    if num_seqs == 0:
        return out
    lens = seq_lens.long()
    max_len = int(lens.max())                               # host sync: fine for the reference
    if max_len == 0:
        return out
    nb = -(-max_len // block_size)
    cols = torch.arange(nb, device=q.device)
    # Entries past each sequence's own blocks may be stale or -1: point them at block 0 (masked).
    bt = torch.where(cols[None, :] * block_size < lens[:, None], block_tables[:, :nb].long(), 0)
    n_pos = nb * block_size
    flat = bt.reshape(-1)
    k = k_cache.index_select(0, flat).float()                   # [S * nb, block_size, kvh, D]
    v = v_cache.index_select(0, flat).float()
    if quant:
        k = k * k_scale.index_select(0, flat)[:, None, :, None]
        v = v * v_scale.index_select(0, flat)[:, None, :, None]
    k = k.view(num_seqs, n_pos, num_kv_heads, head_dim)
    v = v.view(num_seqs, n_pos, num_kv_heads, head_dim)
    pad = torch.arange(n_pos, device=q.device)[None, :] >= lens[:, None]          # [S, n_pos]
    if bool(pad.any()):                     # rows past seq_len may hold garbage, even NaN: 0 * NaN
        v[pad] = 0.0
    qf = q.float().reshape(num_seqs, num_kv_heads, group, head_dim)
    scores = torch.matmul(qf, k.permute(0, 2, 3, 1)) * scale                      # [S, kvh, G, n_pos]
    scores.masked_fill_(pad[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num_(0.0)      # empty rows: NaN -> 0
    o = torch.matmul(p, v.transpose(1, 2))                  # [S, kvh, G, D]
    out.copy_(o.reshape(num_seqs, num_heads, head_dim))
    return out


CPU_HEAD_DIMS = (32, 64, 96, 128, 256)      # decode_attention.cpp's specializations


def cpu_kernel_fits(dtype: torch.dtype, k_cache, op: str = "paged_decode_attention") -> bool:
    """Whether rows of activations in `dtype` over this cache take pdcluster's CPU attention op `op`
    (paged_decode_attention: decode_attention.cpp; paged_chunk_attention: prefill_attention.cpp; built by
    engine/cpu_ext.py, AVX-512 or AVX2): a contiguous float32 cache on CPU, float32 queries, a head_dim the decode op
    is specialized for, and the op built on this host. The eager step and the compiled layer both ask this, so they
    run the same arithmetic."""
    if not (isinstance(k_cache, torch.Tensor) and k_cache.device.type == "cpu" and dtype == torch.float32
            and k_cache.dtype == torch.float32 and k_cache.dim() == 4 and k_cache.shape[-1] in CPU_HEAD_DIMS
            and k_cache.is_contiguous()):
        return False
    from pdcluster.engine.cpu_ext import has
    return has(op)


def paged_decode_attention_cpu(q, k_cache, v_cache, block_tables, seq_lens, scale: float) -> torch.Tensor:
    """paged_decode_attention_ref's result through the C++ op (float32 on CPU; see cpu_kernel_fits): K/V read in
    place through the block table, no gathered copy. block_tables, seq_lens: int64."""
    return torch.ops.pdcluster.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)
