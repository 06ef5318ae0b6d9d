"""Packed linears on CUDA: the Triton w4a16 / w8a16 kernels (kernels/w4a16_matmul.py,
kernels/w8a16_matmul.py), or their torch references where Triton cannot run. Scales and zeros are
held in float32 (the exact GGUF mapping); x and y in the model's dtype."""
from __future__ import annotations

import torch

from pdcluster.engine.quant.packed import Int4Weight, Packed


class TritonLinear:
    __slots__ = ("w", "bias", "fn")

    def __init__(self, w: Packed, bias: torch.Tensor | None):
        from pdcluster.kernels import w4a16_matmul, w4a16_matmul_ref, w8a16_matmul, w8a16_matmul_ref
        from pdcluster.kernels._triton import triton_usable_on

        triton_ok = triton_usable_on(w.q.device) is None
        if isinstance(w, Int4Weight):
            fn = w4a16_matmul if triton_ok else w4a16_matmul_ref
            self.fn = lambda x: fn(x, w.q, w.scale, w.zero)
        else:
            fn = w8a16_matmul if triton_ok else w8a16_matmul_ref
            self.fn = lambda x: fn(x, w.q, w.scale)
        self.w, self.bias = w, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fn(x if x.stride(-1) == 1 else x.contiguous())
        return y if self.bias is None else y + self.bias

    @property
    def nbytes(self) -> int:
        from pdcluster.engine.quant.packed import nbytes
        return nbytes(self.w)
