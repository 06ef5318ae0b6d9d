"""Packed weights in the model: the linear for a device, embedding rows, fused projections.

    quant_linear(w, bias, device)   CPU: the kernel policy.cpu_kernel picks (cpu_linear.py: fbgemm's
                                    dynamic int8 linear, torch's int4pack / int8pack kernels; q4x8.py:
                                    pdcluster's int4 x int8 kernel)
                                    CUDA: the Triton w4a16 / w8a16 kernels (gpu_linear.py)
                                    anything else: dequantize + matmul (the kernels' torch reference)
    embed_rows(w, ids, dtype)       rows of a packed embedding [T, E], dequantized
    fuse(parts)                     row-concatenation of tensors or packed weights (q|k|v, gate|up)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pdcluster.engine.quant.packed import Int4Weight, Int8Weight, Packed, cat_rows, dequantize, quantize


class RefLinear:
    """Dequantize on every call (devices without a kernel; slow, exact)."""
    __slots__ = ("w", "bias")

    def __init__(self, w: Packed, bias: torch.Tensor | None):
        self.w, self.bias = w, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize(self.w).to(x.dtype), self.bias)

    @property
    def nbytes(self) -> int:
        from pdcluster.engine.quant.packed import nbytes
        return nbytes(self.w)


def quant_linear(w: Packed, bias: torch.Tensor | None, device: str | torch.device, head: bool = False):
    """head: the LM head, which an int8 CPU model also multiplies 2-63 rows by through a oneDNN-prepacked copy
    (cpu_linear.OneDNNRows: 49152 x 576 at 2-16 rows in ~4.4 ms instead of ~8; one more byte per weight, so
    only there, the largest matrix a step reads)."""
    dev = torch.device(device)
    if dev.type == "cpu":
        from pdcluster.engine.quant import cpu_linear
        from pdcluster.engine.quant.policy import cpu_kernel
        from pdcluster.engine.quant import q4x8
        own = w.kind == "int4" and q4x8.supported(w.shape[1]) and q4x8.available()   # (built for int4 only)
        kernel = cpu_kernel(w.kind, cpu_linear.fbgemm_usable(), own)
        if kernel == "q4x8":
            try:
                return q4x8.Q4x8Linear(w, bias)
            except ValueError:                   # scales past float16's range: torch's kernel keeps float32 ones
                kernel = "int4pack"
        if kernel == "fbgemm":
            return cpu_linear.Dyn8Linear(w, bias, onednn_rows=head)
        return {"int4pack": cpu_linear.Int4Linear, "int8pack": cpu_linear.Int8Linear}[kernel](w, bias)
    if dev.type == "cuda":
        from pdcluster.engine.quant.gpu_linear import TritonLinear
        return TritonLinear(w, bias)
    return RefLinear(w, bias)


def embed_rows(w: Packed | torch.Tensor, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[T, E] rows `ids` of an embedding, float or packed."""
    if isinstance(w, torch.Tensor):
        return F.embedding(ids, w)
    if isinstance(w, Int8Weight):
        return (w.q[ids].float() * w.scale[ids].unsqueeze(-1)).to(dtype)
    return dequantize(w.rows(ids)).to(dtype)


def fuse(parts: list[torch.Tensor | Packed]) -> torch.Tensor | Packed:
    """One weight of all parts' rows in order. A float part beside packed ones is quantized to their kind."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts)
    kind = next(p.kind for p in parts if not isinstance(p, torch.Tensor))
    return cat_rows([quantize(p, kind) if isinstance(p, torch.Tensor) else p for p in parts])
