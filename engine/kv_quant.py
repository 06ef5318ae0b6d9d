"""A paged KV cache layer that stays quantized (EngineConfig.kv_cache_dtype int8 / fp8).

    data   int8 | float8_e4m3fn  [num_blocks, block_size, num_kv_heads, head_dim]
    scale  float32               [num_blocks, num_kv_heads]      x ~= data * scale[block, kv_head]

The wire codec's format (kv_transfer/codec.py: q [n, bs, h, d], scales [n, h]), so an int8 frame
lands into an int8 cache as bytes + scales. kernels/store_kv.py quantizes rows as they are written
(a block's scale grows as it fills; its earlier rows are requantized then); the attention paths
(engine/attention.py on CPU, kernels/ on CUDA) dequantize on the fly.

Bytes per block and layer, K or V: block_size * num_kv_heads * head_dim * 1 + num_kv_heads * 4,
vs * 4 (float32) or * 2 (16-bit) for a float cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

KV_CACHE_DTYPES = ("auto", "int8", "fp8")       # auto = the model's dtype (a float cache)
CODES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
SCALE_BYTES = 4                                 # float32, one per (block, kv head)


def check_kv_cache_dtype(kv_cache_dtype: str) -> None:
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")


def block_bytes(kv_cache_dtype: str, dtype_bytes: int, block_size: int, num_kv_heads: int, head_dim: int) -> int:
    """Bytes of one block of one layer's K (or V) in a cache of kv_cache_dtype (auto: dtype_bytes
    per element), scales included."""
    if kv_cache_dtype == "auto":
        return block_size * num_kv_heads * head_dim * dtype_bytes
    return block_size * num_kv_heads * head_dim * CODES[kv_cache_dtype].itemsize + num_kv_heads * SCALE_BYTES


@dataclass(eq=False)
class QuantKV:
    """One layer's K (or V) cache, quantized. Not one tensor: transports that register raw cache
    memory (direct landing) see is_contiguous() False and take their staged path, which lands
    through kv_transfer/receiver.py's CacheWriter."""

    data: torch.Tensor              # codes [num_blocks, block_size, num_kv_heads, head_dim]
    scale: torch.Tensor             # float32 [num_blocks, num_kv_heads]
    codec: str                      # "int8" | "fp8" (kv_transfer/codec.py's names)
    dtype: torch.dtype              # the float dtype it stands for (the model's)
    pair: tuple[torch.Tensor, torch.Tensor] | None = None   # (codes [2, ...], scales [2, ...]) when this
                                    #   layer's K and V are views [0] / [1] of them: stored in one pass

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def is_cuda(self) -> bool:
        return self.data.is_cuda

    def is_contiguous(self) -> bool:
        return False

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    def dequant(self, ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Blocks `ids` (int64 [n]) as float [n, block_size, num_kv_heads, head_dim] in `dtype`
        (default: self.dtype)."""
        q = self.data.index_select(0, ids)
        q = q if self.codec == "int8" else q.float()    # int8 * float32 promotes in one pass; fp8 does not
        return (q * self.scale.index_select(0, ids)[:, None, :, None]).to(dtype or self.dtype)


def new_quant_kv(codec: str, shape: tuple[int, ...], dtype: torch.dtype, zeros) -> QuantKV:
    """A zeroed cache layer of `shape` [num_blocks, block_size, kv_heads, head_dim]; zeros(shape,
    dtype) allocates (engine/model_runner.py's lazily zeroed allocator)."""
    return QuantKV(zeros(shape, CODES[codec]), zeros((shape[0], shape[2]), torch.float32), codec, dtype)


def new_quant_kv_pair(codec: str, shape: tuple[int, ...], dtype: torch.dtype, zeros) -> tuple[QuantKV, QuantKV]:
    """A layer's K and V caches as views [0] / [1] of one codes tensor [2, *shape] and one scales
    tensor [2, num_blocks, kv_heads]: the CPU store writes both in one pass."""
    codes, scales = zeros((2, *shape), CODES[codec]), zeros((2, shape[0], shape[2]), torch.float32)
    return (QuantKV(codes[0], scales[0], codec, dtype, (codes, scales)),
            QuantKV(codes[1], scales[1], codec, dtype, (codes, scales)))


def cache_args(kc, vc) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(k data, v data, the kernels' scale keywords) for a layer's caches, float or quantized."""
    if isinstance(kc, QuantKV):
        return kc.data, vc.data, {"k_scale": kc.scale, "v_scale": vc.scale}
    return kc, vc, {}


def gather_blocks(cache, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Blocks `ids` of a float or quantized cache layer, as float `dtype` [n, bs, kvh, D]."""
    if isinstance(cache, QuantKV):
        return cache.dequant(ids, dtype)
    return cache.index_select(0, ids)
