"""Hot-path kernels: each file holds a Triton kernel, its checking launcher and its torch reference.

The engine picks one set with `get_ops(backend, device)` (Triton on CUDA, references on CPU); the
weight-only quantized matmuls (w4a16, w8a16) are picked per packed linear (engine/quant/layers.py).
Importing this package never needs a GPU, nor TRITON_INTERPRET, nor even a working Triton.
"""
from pdcluster.kernels.decode_attention import paged_decode_attention, paged_decode_attention_ref
from pdcluster.kernels.pack_kv import pack_kv, pack_kv_ref, unpack_kv, unpack_kv_ref
from pdcluster.kernels.prefill_attention import paged_prefill_attention, paged_prefill_attention_ref
from pdcluster.kernels.rms_norm import rms_norm, rms_norm_ref
from pdcluster.kernels.rotary import rotary_embedding, rotary_embedding_ref
from pdcluster.kernels.select import Ops, get_ops
from pdcluster.kernels.store_kv import store_kv, store_kv_ref
from pdcluster.kernels.w4a16_matmul import w4a16_matmul, w4a16_matmul_ref
from pdcluster.kernels.w8a16_matmul import w8a16_matmul, w8a16_matmul_ref

__all__ = [
    "paged_decode_attention", "paged_decode_attention_ref",
    "paged_prefill_attention", "paged_prefill_attention_ref",
    "store_kv", "store_kv_ref",
    "rms_norm", "rms_norm_ref",
    "rotary_embedding", "rotary_embedding_ref",
    "pack_kv", "pack_kv_ref", "unpack_kv", "unpack_kv_ref",
    "w4a16_matmul", "w4a16_matmul_ref", "w8a16_matmul", "w8a16_matmul_ref",
    "get_ops", "Ops",
]
