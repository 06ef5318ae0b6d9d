"""Which weights are held packed, and how, for a `quantization` mode. Pure Python.

    mode      Hugging Face safetensors              GGUF
    None      float (the checkpoint's own)          the file's own: Q4_0/Q4_1/Q4_K (and other <= 4-bit
                                                    types) int4, Q5/Q6/Q8 types int8, F32/F16 float
    "none"    float                                 dequantized to float (the engine's dtype)
    "int4"    linears int4 (group 32), head int8    linears int4, head int8
    "int8"    linears int8 (per channel), head int8 linears int8, head int8

"linears" are the per-layer q/k/v/o and gate/up/down projections; the "head" is the token embedding
and the LM head (tied or not): the largest matrix a decode step reads, kept at 8 bits in the int
modes (vLLM's weight-only modes leave it in 16-bit). Norm weights and biases are never packed.
"""
from __future__ import annotations

QUANTIZATIONS = ("none", "int8", "int4")
CPU_KERNELS = ("fbgemm", "int8pack", "int4pack", "q4x8")
HEAD = ("model.embed_tokens.weight", "lm_head.weight")
_LINEAR = tuple(f".{p}_proj.weight" for p in ("q", "k", "v", "o", "gate", "up", "down"))


def check_mode(mode: str | None) -> None:
    if mode is not None and mode not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)} (or unset), got {mode!r}")


def packable(name: str) -> bool:
    return name in HEAD or name.endswith(_LINEAR)


def weight_kind(name: str, mode: str | None, file_kind: str | None = None) -> str | None:
    """"int4" | "int8" | None (float) for weight `name`. file_kind: a GGUF tensor's native kind
    (None for float tensors and for Hugging Face checkpoints)."""
    if not packable(name) or mode == "none":
        return None
    if mode is None:
        return file_kind
    return "int8" if name in HEAD else mode


def cpu_kernel(kind: str, fbgemm: bool, q4x8: bool = False) -> str:
    """The CPU kernel for a packed weight of `kind` at decode row counts (engine/quant/cpu_linear.py):
    int8 weights take fbgemm's dynamic int8 linear where torch has it (x rounded to 8 bits per call;
    2-6x faster than _weight_int8pack_mm on AVX2 for every decode-step shape of SmolLM2, 1-32 rows,
    bench/RESULTS.md "Decode step on CPU"), else _weight_int8pack_mm. int4 weights keep
    _weight_int4pack_mm_for_cpu: fbgemm has no group-wise int4 form, and requantizing a GGUF Q4 weight
    to per-row int8 would lose its exact values and double its bytes (cpu_int8_rows adds such a copy beside
    the packed weights for wide steps only: engine/quant/int8_rows.py). q4x8: the host runs pdcluster's own
    int4 x int8 kernel (engine/quant/q4x8.py: AVX-512 VNNI, llama.cpp's Q4_1 x Q8_1 arithmetic), which int4
    weights then take instead: 1.7-3.4x torch's int4 kernel per call at 1-8 rows (bench/RESULTS.md, "q4x8 with
    rows interleaved")."""
    if kind == "int4":
        return "q4x8" if q4x8 else "int4pack"
    if kind == "int8":
        return "fbgemm" if fbgemm else "int8pack"
    raise ValueError(f"no CPU kernel for weight kind {kind!r}")
