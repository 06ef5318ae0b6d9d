"""pdcluster's own CPU ops (AVX-512, AMX), built once per host into one library and loaded on first use.

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
           os.path.join(os.path.dirname(_HERE), "kernels", "f32_tile.h"))     # included by SOURCES: in the key
FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c")      # /proc/cpuinfo names
_CFLAGS = ("-O3", "-std=c++17", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl",
           "-mavx512vnni", "-mf16c", "-mfma", "-mamx-tile", "-mamx-int8")    # AMX: int8_amx.cpp, called only
                                                                             # where the CPU has it

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


def sources() -> bytes:
    """The library's C++ sources and the headers they include (the compiled layer's cache key includes them)."""
    out = b""
    for path in SOURCES + HEADERS:
        with open(path, "rb") as f:
            out += f.read()
    return out


def _library_path() -> str:
    """Where these sources, torch and flags build to (a later start loads it as it is)."""
    from pdcluster.engine.cpu_compile import cache_dir
    key = hashlib.sha256(sources() + torch.__version__.encode() + " ".join(_CFLAGS).encode()).hexdigest()[:16]
    return os.path.join(os.path.dirname(cache_dir()), "ext", f"pdcluster-cpu-{key}.so")


def _build(out: str) -> None:
    """One g++ process per source, at once (the 2-core host: ~20 s instead of ~35 in one call), then one link
    against torch's libraries; written beside `out` and renamed."""
    from torch.utils.cpp_extension import include_paths, library_paths
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = f"{out}.{os.getpid()}.tmp"
    cxx = os.environ.get("CXX", "g++")
    cflags = [*_CFLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
              *(f"-I{p}" for p in include_paths())]
    objs = [f"{tmp}.{i}.o" for i in range(len(SOURCES))]
    try:
        procs = [subprocess.Popen([cxx, *cflags, "-c", src, "-o", obj], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for src, obj in zip(SOURCES, objs)]
        errors = [p.communicate(timeout=600)[1] for p in procs]
        failed = [f"{os.path.basename(src)}: {err.strip()[-400:]}" for src, p, err in zip(SOURCES, procs, errors)
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


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Build (once per host, sources and torch) and load the ops; False where the CPU lacks the instructions,
    PDCLUSTER_CPU_OPS=0 / PDCLUSTER_Q4X8=0, or the build fails (logged)."""
    if "0" in (os.environ.get("PDCLUSTER_CPU_OPS", "1"), os.environ.get("PDCLUSTER_Q4X8", "1")):
        return False
    missing = [f for f in FLAGS if f not in cpu_flags()]
    if missing:
        log.info("pdcluster's CPU kernels not used: the CPU lacks %s", ", ".join(missing))
        return False
    try:
        path = _library_path()
        if not os.path.exists(path):
            _build(path)
        ctypes.CDLL(path, mode=os.RTLD_NOW | os.RTLD_GLOBAL)   # the C shims, for compiled layers' direct calls
        torch.ops.load_library(path)
    except Exception as e:                              # no compiler, headers, ...: torch's kernels instead
        log.warning("pdcluster's CPU kernels not built (%s: %s); torch's kernels run instead", type(e).__name__, e)
        return False
    if not all(hasattr(torch.ops.pdcluster, op) for op in C_SHIMS):
        return False
    if not _faked:                                      # their shapes, for torch.export (cpu_compile); once
        torch.library.register_fake("pdcluster::q4x8_mm")(lambda x, w, d, mn: x.new_empty((x.shape[0], w.shape[0])))
        torch.library.register_fake("pdcluster::paged_decode_attention")(
            lambda q, k_cache, v_cache, block_tables, seq_lens, scale: q.new_empty(q.shape))
        torch.library.register_fake("pdcluster::rms_norm")(lambda x, w, eps: torch.empty_like(x))
        torch.library.register_fake("pdcluster::f32_mm")(lambda x, w, n: x.new_empty((x.shape[0], n)))
        torch.library.register_fake("pdcluster::q4f32_mm")(lambda x, codes, dm, n: x.new_empty((x.shape[0], n)))
        torch.library.register_fake("pdcluster::quantize_rows")(
            lambda x, shift: (x.new_empty(x.shape, dtype=torch.uint8 if shift else torch.int8),
                              x.new_empty((x.shape[0], 1))))
        torch.library.register_fake("pdcluster::int8_amx_mm")(
            lambda x, tiles: x.new_empty((x.shape[0], tiles.shape[0] * 16), dtype=torch.int32))
        _faked.append(True)
    return True


_faked: list[bool] = []


def c_shims() -> dict:
    """custom_ops_to_c_shims for torch._inductor.config.aot_inductor (only once available())."""
    return {getattr(torch.ops.pdcluster, name).default: decl for name, decl in C_SHIMS.items()}
