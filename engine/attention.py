"""Paged attention on the torch path (CPU; the reference semantics of kernels/ on CUDA).

Cache layout per layer: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim], float
tensors or QuantKV (engine/kv_quant.py: int8 / fp8 codes + a scale per (block, kv head), written
quantized by kernels/store_kv.py's reference and dequantized here as blocks are gathered).
Token t of a sequence lives at slot block_table[t // block_size] * block_size + t % block_size.

A step's tokens are laid out as [prefill chunks ..., decode tokens ...]:
  - prefill chunk i: rows q_start..q_start+q_len of the flat batch, attending causally to the
    first ctx_len positions of its sequence (ctx_len - q_len of them cached before this step);
  - decodes: one row each, attending to seq_lens[j] positions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdcluster.engine.kv_quant import QuantKV, gather_blocks
from pdcluster.kernels.decode_attention import cpu_kernel_fits, paged_decode_attention_cpu
from pdcluster.kernels.prefill_attention import paged_chunk_attention_cpu
from pdcluster.kernels.store_kv import store_kv_pair_ref, store_kv_ref


@dataclass
class PrefillSeq:
    q_start: int                    # first row in the flat batch
    q_len: int                      # new tokens this step
    ctx_len: int                    # positions attended (cached prefix + this chunk)
    block_table: torch.Tensor       # int64 [cdiv(ctx_len, block_size)]


@dataclass
class AttnMeta:
    slot_mapping: torch.Tensor      # int64 [num_tokens]: cache slot of each new token
    prefills: list[PrefillSeq]
    num_prefill_tokens: int         # decode rows start here
    decode_block_tables: torch.Tensor | None   # int64 [num_decodes, max_blocks]
    decode_seq_lens: torch.Tensor | None       # int64 [num_decodes] (includes the new token)
    decode_mask: torch.Tensor | None           # bool [num_decodes, 1, 1, max_blocks * block_size]
    # the same prefills as padded tensors, for the Triton kernel (one launch for all of them)
    prefill_block_tables: torch.Tensor | None = None   # int32 [num_prefills, max_blocks]
    prefill_cu_seqlens_q: torch.Tensor | None = None   # int32 [num_prefills + 1]
    prefill_seq_lens_k: torch.Tensor | None = None     # int32 [num_prefills]


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache, v_cache, slot_mapping: torch.Tensor) -> None:
    """k, v: [T, kv_heads, head_dim] into their slots (quantized into a QuantKV cache)."""
    if isinstance(k_cache, QuantKV) and k_cache.pair is not None and k_cache.pair is v_cache.pair:
        store_kv_pair_ref(torch.stack((k, v)), *k_cache.pair, slot_mapping)     # K and V in one pass
        return
    if isinstance(k_cache, QuantKV):
        # (the small-batch linears hand back head_dim-strided rows: the kernels' check wants unit stride)
        store_kv_ref(k.contiguous(), v.contiguous(), k_cache.data, v_cache.data, slot_mapping, k_scale=k_cache.scale, v_scale=v_cache.scale)
        return
    nb, bs, h, d = k_cache.shape
    k_cache.view(nb * bs, h, d).index_copy_(0, slot_mapping, k)
    v_cache.view(nb * bs, h, d).index_copy_(0, slot_mapping, v)


def _gather(cache, block_table: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """[n, kv_heads, head_dim] of positions 0..n-1 of the sequence, float `dtype`."""
    return gather_blocks(cache, block_table, dtype).flatten(0, 1)[:n]


CHUNK_MAX_GROUP = 48    # query heads per KV head kernels/prefill_attention*.cpp take (their MAX_LANES)


def prefill_attention(q, k, v, k_cache, v_cache, seq: PrefillSeq, scale: float) -> torch.Tensor:
    """q: [q_len, H, D]; k, v: [q_len, KVH, D] (this chunk, already stored in the cache). Returns [q_len, H, D].
    float32 on CPU where built: pdcluster's paged chunk kernel (kernels/prefill_attention.cpp; K/V read in place,
    with or without a cached prefix: 3.1x the torch path per layer at 24 rows over 408 positions, 1.5-2.2x for whole
    prompts of 408-2,048; bench/prefix_attention.py). Else (more than CHUNK_MAX_GROUP query heads per KV head
    too) prefill_attention_sdpa."""
    if cpu_kernel_fits(q.dtype, k_cache, "paged_chunk_attention") and q.shape[1] // k.shape[1] <= CHUNK_MAX_GROUP:
        return paged_chunk_attention_cpu(q, k_cache, v_cache, seq.block_table, seq.ctx_len, scale)
    return prefill_attention_sdpa(q, k, v, k_cache, v_cache, seq, scale)


def prefill_attention_sdpa(q, k, v, k_cache, v_cache, seq: PrefillSeq, scale: float) -> torch.Tensor:
    """prefill_attention through torch: a cached prefix is gathered from the paged cache into a copy.
    SDPA gets 4-D inputs with K/V repeated to H heads: that runs torch's fused (flash) CPU kernel,
    ~3.7x faster here than the 3-D / enable_gqa call, which falls back to the unfused math path."""
    H, KVH = q.shape[1], k.shape[1]
    mask, causal = None, True
    # a cached prefix: attend over the paged cache; a quantized cache is read back even without one, so a chunk
    # attends to the values every later read sees (as the Triton kernels do): not to its own unquantized rows,
    # which made a request's tokens differ cold and with its prefix cached
    if seq.ctx_len > seq.q_len or isinstance(k_cache, QuantKV):
        k = _gather(k_cache, seq.block_table, seq.ctx_len, q.dtype)
        v = _gather(v_cache, seq.block_table, seq.ctx_len, q.dtype)
    if seq.ctx_len > seq.q_len:
        qpos = torch.arange(seq.ctx_len - seq.q_len, seq.ctx_len, device=q.device).unsqueeze(1)
        mask, causal = torch.arange(seq.ctx_len, device=q.device).unsqueeze(0) <= qpos, False  # [q_len, ctx_len]
    if H != KVH:
        k, v = k.repeat_interleave(H // KVH, 1), v.repeat_interleave(H // KVH, 1)
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],  # [1, H, L, D]
                                       v.transpose(0, 1)[None], attn_mask=mask, is_causal=causal,
                                       scale=scale)
    return o[0].transpose(0, 1)


def decode_attention(q, k_cache, v_cache, block_tables, mask, scale: float,
                     seq_lens: torch.Tensor | None = None) -> torch.Tensor:
    """q: [B, H, D]; block_tables [B, max_blocks]; mask [B, 1, 1, L] (positions < seq_lens). Returns [B, H, D].
    float32 on CPU with seq_lens given: pdcluster's paged kernel (kernels/decode_attention.cpp; K/V read in place),
    where built. Else a gather + SDPA, GQA folded into the query length: each KV head serves its group of H/KVH
    query heads."""
    if seq_lens is not None and cpu_kernel_fits(q.dtype, k_cache):
        return paged_decode_attention_cpu(q, k_cache, v_cache, block_tables, seq_lens, scale)
    B, H, D = q.shape
    KVH = k_cache.shape[2]
    nb, bs = block_tables.shape[1], k_cache.shape[1]
    flat = block_tables.reshape(-1)
    k = gather_blocks(k_cache, flat, q.dtype).view(B, nb * bs, KVH, D).transpose(1, 2)   # [B, KVH, L, D]
    v = gather_blocks(v_cache, flat, q.dtype).view(B, nb * bs, KVH, D).transpose(1, 2)
    o = F.scaled_dot_product_attention(q.view(B, KVH, H // KVH, D), k, v, attn_mask=mask, scale=scale)
    return o.reshape(B, H, D)
