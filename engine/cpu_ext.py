"""pdcluster's own CPU ops (AVX-512 and AMX; a subset on AVX2), built once per host into one library and loaded.

    pdcluster::q4x8_mm                  engine/quant/q4x8.cpp: int4 weights x int8 activations (VNNI)
    pdcluster::int8_amx_mm              engine/quant/int8_amx.cpp: int8 x int8 -> int32 on AMX tiles (where the
                                        CPU has AMX; int8_amx.usable())
    pdcluster::quantize_rows            engine/quant/quantize_rows.cpp: x's rows to int8 on their own scales
    pdcluster::paged_decode_attention   kernels/decode_attention.cpp: decode attention over the paged cache
    pdcluster::paged_chunk_attention    kernels/prefill_attention.cpp: a prefill chunk over its paged cache
    pdcluster::rms_norm                 kernels/rms_norm.cpp: aten's rms_norm, for the compiled layer's direct call
    pdcluster::f32_mm                   kernels/f32_mm.cpp: float32 linears on weights packed once at load
    pdcluster::greedy_head              kernels/greedy_head.cpp: a float32 LM head's argmax through an int8 screen
    pdcluster::q4f32_mm                 kernels/q4f32_mm.cpp: float32 linears whose weights are Q4_1 values, read
                                        as 4-bit codes (and q4f32_expand: those codes back to f32_mm's blocks)

Each op's torch reference sits beside its source (q4x8.py's q4x8_mm_ref; int8_amx.py's int8_amx_mm_ref;
cpu_linear.py's _round_rows for quantize_rows; decode_attention.py's paged_decode_attention_ref; prefill_attention.py's
paged_prefill_attention_ref; rms_norm.cpp calls aten's own; f32_mm.py's f32_mm_ref; greedy_head.py's
greedy_head_ref; q4f32_mm.py's q4f32_mm_ref). The library is built with g++
against torch's headers, one compiler process per source at once, then one link (~20 s on 2 cores; no ninja, no
Python headers: the ops register with TORCH_LIBRARY), cached under the pdcluster cache by a hash of the sources, torch
and the flags, and written atomically, so workers that build at once never load a partial file.

Where the CPU lacks AVX-512 VNNI but has AVX2, FMA and F16C (AMD Zen 2/3, older Xeons), the library is built from
AVX2_SOURCES instead: q4x8_mm (engine/quant/q4x8_avx2.cpp, the same layout and results), int8_mm
(engine/quant/int8_mm_avx2.cpp: torch._int_mm's exact int32 sums, for cpu_linear.int8_rows), the two attention
ops (kernels/decode_attention_avx2.cpp, prefill_attention_avx2.cpp: 8 lanes, the same arithmetic per head, sums in
another order), rms_norm, the float32 linears f32_mm and q4f32_mm (kernels/f32_tile.h's tile and q4f32_mm.cpp's
expansion 8 lanes wide: the same bits as on AVX-512) and greedy_head (its screen 8 lanes wide, its exact scores the
same bits), so that decode steps on packed int4 weights still read 4-bit codes, a float32 engine on a Q4_1 file
reads its weights' codes, and attention reads the paged cache in place. `ops()` says which ops loaded, `has(op)` one
of them; `available()` is True only for the whole AVX-512 set, which the other callers need.

It is loaded RTLD_GLOBAL: each op the compiled layer may call exports an AOTInductor C shim (C_SHIMS), which the layer
(engine/cpu_compile.py) calls directly instead of through AOTI's proxy executor (~4 us a call). `available()`
is False where the CPU lacks the instructions, PDCLUSTER_CPU_OPS=0 (or the older PDCLUSTER_Q4X8=0) is set, or
the build fails (logged); callers keep torch's kernels then.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import subprocess

import torch

log = logging.getLogger(__name__)

_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = (os.path.join(_HERE, "quant", "q4x8.cpp"),
           os.path.join(_HERE, "quant", "int8_amx.cpp"),
           os.path.join(_HERE, "quant", "quantize_rows.cpp"),
           os.path.join(os.path.dirname(_HERE), "kernels", "decode_attention.cpp"),
           os.path.join(os.path.dirname(_HERE), "kernels", "prefill_attention.cpp"),
           os.path.join(os.path.dirname(_HERE), "kernels", "rms_norm.cpp"),
           os.path.join(os.path.dirname(_HERE), "kernels", "f32_mm.cpp"),
           os.path.join(os.path.dirname(_HERE), "kernels", "greedy_head.cpp"),
           os.path.join(os.path.dirname(_HERE), "kernels", "q4f32_mm.cpp"))
HEADERS = (os.path.join(os.path.dirname(_HERE), "kernels", "simd_exp.h"),
           os.path.join(os.path.dirname(_HERE), "kernels", "f32_tile.h"),
           os.path.join(os.path.dirname(_HERE), "kernels", "decode_attention_driver.h"),
           os.path.join(os.path.dirname(_HERE), "kernels", "prefill_attention_driver.h"),
           os.path.join(_HERE, "quant", "q4x8_driver.h"))        # included by the sources: in the key
FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c")      # /proc/cpuinfo names
_CFLAGS = ("-O3", "-std=c++17", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl",
           "-mavx512vnni", "-mf16c", "-mfma", "-mamx-tile", "-mamx-int8")    # AMX: int8_amx.cpp, called only
                                                                             # where the CPU has it
# the AVX2 library (hosts without AVX-512 VNNI): its sources and the ops they register
AVX2_FLAGS = ("avx2", "fma", "f16c")
AVX2_SOURCES = (os.path.join(_HERE, "quant", "q4x8_avx2.cpp"),
                os.path.join(_HERE, "quant", "int8_mm_avx2.cpp"),
                os.path.join(os.path.dirname(_HERE), "kernels", "decode_attention_avx2.cpp"),
                os.path.join(os.path.dirname(_HERE), "kernels", "prefill_attention_avx2.cpp"),
                os.path.join(os.path.dirname(_HERE), "kernels", "rms_norm.cpp"),
                os.path.join(os.path.dirname(_HERE), "kernels", "f32_mm.cpp"),
                os.path.join(os.path.dirname(_HERE), "kernels", "q4f32_mm.cpp"),
                os.path.join(os.path.dirname(_HERE), "kernels", "greedy_head.cpp"))
AVX2_OPS = ("q4x8_mm", "int8_mm", "paged_decode_attention", "paged_chunk_attention", "rms_norm", "f32_mm", "q4f32_mm",
            "q4f32_expand", "greedy_head")
_AVX2_CFLAGS = ("-O3", "-std=c++17", "-fPIC", "-fopenmp", "-mavx2", "-mfma", "-mf16c")

# AOTInductor's declarations of the ops' C shims (torch._inductor.config.aot_inductor.custom_ops_to_c_shims)
C_SHIMS = {
    "q4x8_mm": ["AOTITorchError aoti_torch_cpu_q4x8_mm(AtenTensorHandle x, AtenTensorHandle w, AtenTensorHandle d, "
                "AtenTensorHandle mn, AtenTensorHandle* ret0)"],
    "paged_decode_attention": ["AOTITorchError aoti_torch_cpu_paged_decode_attention(AtenTensorHandle q, "
                               "AtenTensorHandle k_cache, AtenTensorHandle v_cache, AtenTensorHandle tables, "
                               "AtenTensorHandle lens, double scale, AtenTensorHandle* ret0)"],
    "int8_amx_mm": ["AOTITorchError aoti_torch_cpu_int8_amx_mm(AtenTensorHandle x, AtenTensorHandle tiles, "
                    "AtenTensorHandle* ret0)"],
    "quantize_rows": ["AOTITorchError aoti_torch_cpu_quantize_rows(AtenTensorHandle x, int32_t shift, "
                      "AtenTensorHandle* ret0, AtenTensorHandle* ret1)"],
    "rms_norm": ["AOTITorchError aoti_torch_cpu_rms_norm(AtenTensorHandle x, AtenTensorHandle w, double eps, "
                 "AtenTensorHandle* ret0)"],
    "f32_mm": ["AOTITorchError aoti_torch_cpu_f32_mm(AtenTensorHandle x, AtenTensorHandle w, int64_t n, "
               "AtenTensorHandle* ret0)"],
    "q4f32_mm": ["AOTITorchError aoti_torch_cpu_q4f32_mm(AtenTensorHandle x, AtenTensorHandle codes, "
                 "AtenTensorHandle dm, int64_t n, AtenTensorHandle* ret0)"],
}


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# the /proc/cpuinfo flags that make a half-precision GEMM native on CPU (oneDNN's AMX / AVX-512 paths); without
# one, torch converts to float32 inside its kernels: a 128-token float32 prompt took 427 ms on one AVX2 thread,
# the same in bfloat16 2,829 ms (6.6x; bench/RESULTS.md, "q4x8 on AVX2 hosts")
NATIVE_HALF = {"bfloat16": ("avx512_bf16", "amx_bf16"), "float16": ("avx512_fp16", "amx_fp16")}


def slow_dtype_warning(dtype: str) -> str | None:
    """A warning for an engine on this CPU computing in `dtype` without native support for it, else None."""
    native = NATIVE_HALF.get(dtype)
    if native is None or any(f in cpu_flags() for f in native):
        return None
    return (f"dtype {dtype} on a CPU without {' or '.join(native)}: its GEMMs are emulated, several times slower "
            f"than float32 (a 128-token prompt 6.6x on an AVX2 host); set dtype float32 for this pool")


def variant() -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(sources, compiler flags) of the library this CPU builds: the AVX-512 one, else the AVX2 one, else None."""
    have = cpu_flags()
    if all(f in have for f in FLAGS):
        return SOURCES, _CFLAGS
    if all(f in have for f in AVX2_FLAGS):
        return AVX2_SOURCES, _AVX2_CFLAGS
    return None


def sources() -> bytes:
    """This host's library's C++ sources and the headers they include (the compiled layer's cache key includes
    them)."""
    out = b""
    for path in (variant() or (SOURCES, ()))[0] + HEADERS:
        with open(path, "rb") as f:
            out += f.read()
    return out


def _library_path(cflags: tuple[str, ...]) -> str:
    """Where these sources, torch and flags build to (a later start loads it as it is)."""
    from pdcluster.engine.cpu_compile import cache_dir
    key = hashlib.sha256(sources() + torch.__version__.encode() + " ".join(cflags).encode()).hexdigest()[:16]
    return os.path.join(os.path.dirname(cache_dir()), "ext", f"pdcluster-cpu-{key}.so")


def _build(out: str, srcs: tuple[str, ...], flags: tuple[str, ...]) -> None:
    """One g++ process per source, at once (the 2-core host: ~20 s instead of ~35 in one call), then one link
    against torch's libraries; written beside `out` and renamed."""
    from torch.utils.cpp_extension import include_paths, library_paths
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = f"{out}.{os.getpid()}.tmp"
    cxx = os.environ.get("CXX", "g++")
    cflags = [*flags, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
              *(f"-I{p}" for p in include_paths())]
    objs = [f"{tmp}.{i}.o" for i in range(len(srcs))]
    try:
        procs = [subprocess.Popen([cxx, *cflags, "-c", src, "-o", obj], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for src, obj in zip(srcs, objs)]
        errors = [p.communicate(timeout=600)[1] for p in procs]
        failed = [f"{os.path.basename(src)}: {err.strip()[-400:]}" for src, p, err in zip(srcs, procs, errors)
                  if p.returncode != 0]
        if failed:
            raise RuntimeError(f"{cxx} failed: " + "; ".join(failed))
        link = [cxx, "-shared", "-fopenmp", *objs, *(f"-L{p}" for p in library_paths()), "-lc10", "-ltorch_cpu",
                "-o", tmp]
        done = subprocess.run(link, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"{cxx} failed to link: {done.stderr.strip()[-500:]}")
        os.replace(tmp, out)
    finally:
        for path in objs + [tmp]:
            if os.path.exists(path):
                os.unlink(path)


# the ops' shapes, for torch.export (cpu_compile): registered once per op, for the ops that loaded
_FAKES = {
    "q4x8_mm": lambda x, w, d, mn: x.new_empty((x.shape[0], w.shape[0])),
    "paged_decode_attention": lambda q, k_cache, v_cache, block_tables, seq_lens, scale: q.new_empty(q.shape),
    "rms_norm": lambda x, w, eps: torch.empty_like(x),
    "f32_mm": lambda x, w, n: x.new_empty((x.shape[0], n)),
    "q4f32_mm": lambda x, codes, dm, n: x.new_empty((x.shape[0], n)),
    "quantize_rows": lambda x, shift: (x.new_empty(x.shape, dtype=torch.uint8 if shift else torch.int8),
                                       x.new_empty((x.shape[0], 1))),
    "int8_amx_mm": lambda x, tiles: x.new_empty((x.shape[0], tiles.shape[0] * 16), dtype=torch.int32),
    "int8_mm": lambda a, w: a.new_empty((a.shape[0], w.shape[0]), dtype=torch.int32),
}
_faked: set[str] = set()


@functools.lru_cache(maxsize=1)
def ops() -> frozenset[str]:
    """Build (once per host, sources and torch) and load this CPU's library; the names of the ops it registered.
    Empty where the CPU has neither instruction set, PDCLUSTER_CPU_OPS=0 / PDCLUSTER_Q4X8=0, or the build fails
    (logged)."""
    if "0" in (os.environ.get("PDCLUSTER_CPU_OPS", "1"), os.environ.get("PDCLUSTER_Q4X8", "1")):
        return frozenset()
    chosen = variant()
    if chosen is None:
        log.info("pdcluster's CPU kernels not used: the CPU lacks %s (or AVX2, FMA and F16C)", ", ".join(FLAGS))
        return frozenset()
    srcs, flags = chosen
    try:
        path = _library_path(flags)
        if not os.path.exists(path):
            _build(path, srcs, flags)
        ctypes.CDLL(path, mode=os.RTLD_NOW | os.RTLD_GLOBAL)   # the C shims, for compiled layers' direct calls
        torch.ops.load_library(path)
    except Exception as e:                              # no compiler, headers, ...: torch's kernels instead
        log.warning("pdcluster's CPU kernels not built (%s: %s); torch's kernels run instead", type(e).__name__, e)
        return frozenset()
    names = {*C_SHIMS, *AVX2_OPS}   # one library loads (AVX2_OPS: the ops without a C shim too)
    loaded = frozenset(op for op in names if hasattr(torch.ops.pdcluster, op))
    for op in sorted((loaded & set(_FAKES)) - _faked):
        torch.library.register_fake(f"pdcluster::{op}")(_FAKES[op])
        _faked.add(op)
    if srcs is not SOURCES:
        log.info("pdcluster's AVX2 CPU kernels loaded (%s); the AVX-512 ones need %s", ", ".join(sorted(loaded)),
                 ", ".join(FLAGS))
    return loaded


def has(op: str) -> bool:
    """Whether pdcluster::op loaded on this host (from either library)."""
    return op in ops()


def available() -> bool:
    """Whether the whole AVX-512 set loaded (every op with a C shim): False on AVX2 hosts, where has() names the
    subset."""
    return set(C_SHIMS) <= ops()


def c_shims() -> dict:
    """custom_ops_to_c_shims for torch._inductor.config.aot_inductor: the loaded ops' (empty before ops())."""
    return {getattr(torch.ops.pdcluster, name).default: decl for name, decl in C_SHIMS.items() if name in ops()}
