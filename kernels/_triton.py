"""Triton import shim and launcher checks shared by every kernel file.

`import pdcluster.kernels` must work on a CPU-only box even where Triton is missing or broken: the torch
references are what the engine runs there.  Kernel files do `from pdcluster.kernels._triton import triton, tl`;
when Triton is unusable these are stubs good enough to *define* (never launch) a @triton.jit kernel.

Where a kernel can launch:
  CUDA tensors                       compiled Triton
  CPU tensors + TRITON_INTERPRET=1   Triton's interpreter (float32/int/fp8, small shapes)
  CPU tensors otherwise              refused with ValueError (use the *_ref torch reference)
TRITON_INTERPRET is read when each @triton.jit runs, i.e. when `kernels` is first imported.
"""
from __future__ import annotations

import os
import types

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
    _IMPORT_ERROR: Exception | None = None
except Exception as e:  # noqa: BLE001 - any failure means "references only"
    HAS_TRITON = False
    _IMPORT_ERROR = e

    def _jit(fn=None, **_):
        return fn if fn is not None else (lambda f: f)

    triton = types.SimpleNamespace(jit=_jit)                  # type: ignore[assignment]
    tl = types.SimpleNamespace(constexpr=int)                 # type: ignore[assignment]

# Fixed at import, like @triton.jit's own choice between compiled and interpreted kernels.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable_on(device: str | torch.device) -> str | None:
    """None when Triton kernels can run on `device`, else the reason they cannot."""
    dev = torch.device(device)
    if not HAS_TRITON:
        return f"triton is not importable ({_IMPORT_ERROR!r})"
    if dev.type == "cuda":
        return None                    # compiled (or, under TRITON_INTERPRET=1, interpreted: slow)
    if dev.type == "cpu":
        return None if INTERPRET else ("Triton kernels on CPU need TRITON_INTERPRET=1 set before "
                                       "`import pdcluster.kernels`; use the torch backend on CPU")
    return f"no Triton backend for device type {dev.type!r}"


def check_launch(name: str, *tensors: torch.Tensor) -> None:
    """Every tensor on one device where Triton can run."""
    dev = tensors[0].device
    for t in tensors:
        if t.device != dev:
            raise ValueError(f"{name}: tensors on different devices ({dev} and {t.device})")
    why = triton_usable_on(dev)
    if why is not None:
        raise ValueError(f"{name}: cannot launch a Triton kernel on {dev}: {why}")


def check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{name}: {msg}")


def check_paged_kv(n: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> bool:
    """q [tokens, num_heads, head_dim] against paged caches [num_blocks, block_size, num_kv_heads,
    head_dim]: shapes, GQA grouping, one float dtype, unit-stride head_dim. With k_scale/v_scale
    (float32 [num_blocks, num_kv_heads], contiguous) the caches hold int8 / float8_e4m3fn codes
    (kernels/store_kv.py). Returns whether they do."""
    check(k_cache.dim() == 4 and k_cache.shape == v_cache.shape, n,
          f"k_cache/v_cache must be equal [num_blocks, block_size, num_kv_heads, head_dim], "
          f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    check(k_cache.shape[3] == head_dim, n, f"head_dim {head_dim} != cache head_dim {k_cache.shape[3]}")
    check(num_heads % num_kv_heads == 0, n, f"num_heads {num_heads} % num_kv_heads {num_kv_heads} != 0")
    check(q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1, n,
          "head_dim must be the unit-stride dimension of q, k_cache and v_cache")
    if k_scale is None and v_scale is None:
        check(q.dtype in FLOAT_DTYPES and q.dtype == k_cache.dtype == v_cache.dtype, n,
              f"q/k_cache/v_cache must share one float dtype, got {q.dtype}/{k_cache.dtype}/{v_cache.dtype}")
        return False
    check(q.dtype in FLOAT_DTYPES and k_cache.dtype == v_cache.dtype
          and k_cache.dtype in (torch.int8, torch.float8_e4m3fn), n,
          f"a quantized cache is int8 / float8_e4m3fn beside a float q, got q {q.dtype}, caches "
          f"{k_cache.dtype}/{v_cache.dtype}")
    want = (k_cache.shape[0], num_kv_heads)
    for s in (k_scale, v_scale):
        check(s is not None and s.dtype == torch.float32 and tuple(s.shape) == want and s.is_contiguous(), n,
              f"k_scale/v_scale must be contiguous float32 [num_blocks, num_kv_heads] = {list(want)}")
    return True


# Tests set POISON = True: every buffer a launcher allocates starts as NaN (floats) or -128 (ints),
# so an element the kernel forgets to write fails the comparison instead of passing by luck.
POISON = False


def new_empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        t.fill_(float("nan") if dtype.is_floating_point else -128)
    return t


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# Float dtypes a kernel may read or write (the interpreter has no bf16).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Block tables, lengths, offsets and slots: int32 preferred (half the bytes), int64 accepted.
INDEX_DTYPES = (torch.int32, torch.int64)
