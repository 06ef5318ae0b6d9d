"""Weight-only quantized weights, served packed (no float copy of the linear weights).

    policy.py       which weights are packed for a `quantization` mode (none | int8 | int4 | unset)
    packed.py       Int4Weight / Int8Weight: the engine's packed formats, quantizers, dequantize
    gguf_blocks.py  GGUF Q4_0/Q4_1/Q4_K/Q8_0 (and other types) -> packed, exact where they map
    cpu_linear.py   CPU linears on torch's int4pack / int8pack kernels
    gpu_linear.py   CUDA linears on the Triton w4a16 / w8a16 kernels (kernels/)
    layers.py       the linear for a device, embedding rows, fused projections
"""
from pdcluster.engine.quant.policy import QUANTIZATIONS, check_mode

__all__ = ["QUANTIZATIONS", "check_mode"]
