"""Backend selection: the engine asks once for the ops it will call every step.

    ops = get_ops(cfg.attention_backend, cfg.device)
    ops.store_kv(k, v, k_cache, v_cache, slot_mapping); out = ops.decode_attention(...)

backend "auto"   -> Triton kernels on CUDA, torch references everywhere else
        "triton" -> Triton kernels; on a CPU device only under TRITON_INTERPRET=1 (tests), else ValueError
        "torch"  -> torch references on any device
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# `from pdcluster.kernels.<module> import ...`: the package re-exports functions named like their modules.
from pdcluster.kernels.decode_attention import paged_decode_attention, paged_decode_attention_ref
from pdcluster.kernels.pack_kv import pack_kv, pack_kv_ref, unpack_kv, unpack_kv_ref
from pdcluster.kernels.prefill_attention import paged_prefill_attention, paged_prefill_attention_ref
from pdcluster.kernels.rms_norm import rms_norm, rms_norm_ref
from pdcluster.kernels.rotary import rotary_embedding, rotary_embedding_ref
from pdcluster.kernels.store_kv import store_kv, store_kv_ref
from pdcluster.kernels._triton import triton_usable_on

BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class Ops:
    backend: str                      # "triton" | "torch": what was actually chosen
    decode_attention: Callable        # (q, k_cache, v_cache, block_tables, seq_lens, scale, num_splits=None)
    prefill_attention: Callable       # (q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k, scale)
    store_kv: Callable                # (k, v, k_cache, v_cache, slot_mapping)
    rms_norm: Callable                # (x, weight, eps, residual=None)
    rotary_embedding: Callable        # (positions, q, k, cos_sin_cache, head_dim)
    pack_kv: Callable                 # (k_cache, v_cache, block_ids, quant=None) -> (buffer, scales)
    unpack_kv: Callable               # (buffer, scales, k_cache, v_cache, block_ids)


TRITON_OPS = Ops("triton", paged_decode_attention, paged_prefill_attention, store_kv, rms_norm,
                 rotary_embedding, pack_kv, unpack_kv)
TORCH_OPS = Ops("torch", paged_decode_attention_ref, paged_prefill_attention_ref, store_kv_ref, rms_norm_ref,
                rotary_embedding_ref, pack_kv_ref, unpack_kv_ref)


def get_ops(backend: str, device: str | torch.device) -> Ops:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    dev = torch.device(device)
    if backend == "torch":
        return TORCH_OPS
    if backend == "auto":
        return TRITON_OPS if dev.type == "cuda" and triton_usable_on(dev) is None else TORCH_OPS
    why = triton_usable_on(dev)
    if why is not None:
        raise ValueError(f"attention backend 'triton' cannot run on {dev}: {why}")
    return TRITON_OPS
