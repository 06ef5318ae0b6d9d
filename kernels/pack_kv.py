"""pack_kv / unpack_kv: one layer's blocks of a request <-> a contiguous KV transfer buffer.

    k_cache, v_cache  [num_blocks, block_size, num_kv_heads, head_dim]   each block contiguous
    block_ids         int [n] (tensor or list): the request's blocks, in order
    buffer            [2, n, block_size, num_kv_heads, head_dim]: K blocks then V blocks
                        quant None   -> cache dtype (exact copy)
                        quant "int8" -> int8,             x ~= q * scale, |q| <= 127
                        quant "fp8"  -> float8_e4m3fn,    x ~= q * scale, |q| <= 448
    scales            float32 [2, n] per (K/V, block) = amax(|block|) / QMAX (0 for an all-zero
                      block), or None when unquantized
Quantize: q = round(x * (QMAX / amax)), clamped to +-QMAX; int8 rounds half away from zero, fp8 to
nearest even (as torch's cast does).
Error bound per element: scale / 2 for int8; for fp8 half an e4m3 ulp, i.e. <= |x| / 16 + the
subnormal step scale * 2^-10.
One program per block: for quantization it reads the block twice (amax, then scale and store).
"""
from __future__ import annotations

import torch

from pdcluster.kernels._triton import FLOAT_DTYPES, check, check_launch, new_empty, tl, triton

QUANT = {None: None, "int8": torch.int8, "fp8": torch.float8_e4m3fn}
QMAX = {"int8": 127.0, "fp8": 448.0}


@triton.jit
def _round_to_e4m3(y):
    """Round float32 y (|y| <= 448) to the nearest float8 e4m3 value, ties to even, in float32.

    The result is exactly representable, so the cast to fp8 that follows cannot round again.
    (Done by hand because Triton's interpreter mis-rounds fp32 -> fp8 when rounding carries into
    the exponent, e.g. 31.5 -> 16; on GPUs the hardware cast would agree with this.)
    """
    a = tl.abs(y)
    e = (a.to(tl.int32, bitcast=True) >> 23) & 0xFF            # biased exponent of |y|
    e = tl.maximum(e, 127 - 6)                                  # below 2^-6: subnormal, fixed step
    step = ((e - 3) << 23).to(tl.float32, bitcast=True)         # 2^(exp - 3): 3 mantissa bits
    inv_step = ((257 - e) << 23).to(tl.float32, bitcast=True)   # 1 / step, built exactly
    z = a * inv_step                                            # exact: a power-of-2 scaling
    f = tl.floor(z)
    frac = z - f                                                # exact
    odd = f - 2.0 * tl.floor(f * 0.5)
    r = (f + tl.where(frac > 0.5, 1.0, tl.where(frac == 0.5, odd, 0.0))) * step
    return tl.where(y < 0, -r, r)


@triton.jit
def _copy(dst, src, ELEMS: tl.constexpr, CHUNK: tl.constexpr):
    """ELEMS elements src -> dst, CHUNK at a time (no codec)."""
    offs = tl.arange(0, CHUNK)
    for c0 in range(0, ELEMS, CHUNK):
        m = c0 + offs < ELEMS
        tl.store(dst + c0 + offs, tl.load(src + c0 + offs, mask=m), mask=m)


@triton.jit
def _pack_kernel(
    cache_ptr, ids_ptr, buf_ptr, scale_ptr,
    s_cb,                                      # cache block stride (elements)
    qmax,
    ELEMS: tl.constexpr, CHUNK: tl.constexpr,   # elements per block; elements per step
    QUANT: tl.constexpr,                       # 0 none, 1 int8, 2 fp8
):
    i = tl.program_id(0).to(tl.int64)
    src = cache_ptr + tl.load(ids_ptr + i).to(tl.int64) * s_cb
    dst = buf_ptr + i * ELEMS
    offs = tl.arange(0, CHUNK)
    if QUANT == 0:
        _copy(dst, src, ELEMS, CHUNK)
    else:
        amax = tl.zeros([CHUNK], tl.float32)
        for c0 in range(0, ELEMS, CHUNK):
            m = c0 + offs < ELEMS
            amax = tl.maximum(amax, tl.abs(tl.load(src + c0 + offs, mask=m, other=0.0).to(tl.float32)))
        a = tl.max(amax, 0)
        inv = tl.where(a > 0, qmax / tl.where(a > 0, a, 1.0), 0.0)
        tl.store(scale_ptr + i, a / qmax)
        for c0 in range(0, ELEMS, CHUNK):
            m = c0 + offs < ELEMS
            y = tl.load(src + c0 + offs, mask=m, other=0.0).to(tl.float32) * inv
            y = tl.minimum(tl.maximum(y, -qmax), qmax)
            if QUANT == 1:
                y = tl.where(y >= 0, tl.floor(y + 0.5), tl.ceil(y - 0.5))
                tl.store(dst + c0 + offs, y.to(tl.int8), mask=m)
            else:
                tl.store(dst + c0 + offs, _round_to_e4m3(y).to(tl.float8e4nv), mask=m)


@triton.jit
def _unpack_kernel(
    buf_ptr, scale_ptr, ids_ptr, cache_ptr,
    s_cb,
    ELEMS: tl.constexpr, CHUNK: tl.constexpr,
    QUANT: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    dst = cache_ptr + tl.load(ids_ptr + i).to(tl.int64) * s_cb
    src = buf_ptr + i * ELEMS
    offs = tl.arange(0, CHUNK)
    if QUANT == 0:
        _copy(dst, src, ELEMS, CHUNK)
    else:
        s = tl.load(scale_ptr + i)
        for c0 in range(0, ELEMS, CHUNK):
            m = c0 + offs < ELEMS
            x = tl.load(src + c0 + offs, mask=m).to(tl.float32) * s
            tl.store(dst + c0 + offs, x.to(cache_ptr.dtype.element_ty), mask=m)


def _block_ids(block_ids, device) -> torch.Tensor:
    if not isinstance(block_ids, torch.Tensor):
        block_ids = torch.tensor(list(block_ids), dtype=torch.int64)
    check(block_ids.dim() == 1 and block_ids.dtype in (torch.int32, torch.int64), "pack_kv",
          f"block_ids must be a 1-D int tensor or list, got {block_ids.dtype} {tuple(block_ids.shape)}")
    return block_ids.to(device).contiguous()


def _check_caches(k_cache, v_cache, name):
    check(k_cache.dim() == 4 and k_cache.shape == v_cache.shape and k_cache.dtype == v_cache.dtype, name,
          f"k_cache/v_cache must be equal [num_blocks, block_size, num_kv_heads, head_dim] of one dtype, "
          f"got {tuple(k_cache.shape)} {k_cache.dtype} and {tuple(v_cache.shape)} {v_cache.dtype}")
    check(k_cache.dtype in FLOAT_DTYPES, name, f"cache dtype must be float, got {k_cache.dtype}")
    for c in (k_cache, v_cache):
        _, bs, h, d = c.shape
        check(c.stride(3) == 1 and c.stride(2) == d and c.stride(1) == h * d, name,
              f"each cache block must be contiguous, got strides {c.stride()}")


def _check_quant(quant, name):
    check(quant in QUANT, name, f"quant must be one of {list(QUANT)}, got {quant!r}")


def _buffer_dtype(quant, cache_dtype):
    return cache_dtype if quant is None else QUANT[quant]


def _no_fp8(device: torch.device) -> bool:
    """Triton's float8e4nv needs sm_89+ (Ada, Hopper); older GPUs take the torch path for fp8."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9)


def pack_kv(k_cache, v_cache, block_ids, quant: str | None = None):
    """Triton launcher -> (buffer, scales); see the module docstring."""
    _check_caches(k_cache, v_cache, "pack_kv")
    _check_quant(quant, "pack_kv")
    if quant == "fp8" and _no_fp8(k_cache.device):
        return pack_kv_ref(k_cache, v_cache, block_ids, quant)
    ids = _block_ids(block_ids, k_cache.device)
    check_launch("pack_kv", k_cache, v_cache, ids)
    n = ids.shape[0]
    _, bs, h, d = k_cache.shape
    buf = new_empty((2, n, bs, h, d), _buffer_dtype(quant, k_cache.dtype), k_cache.device)
    scales = new_empty((2, n), torch.float32, k_cache.device) if quant else None
    if n > 0:
        elems = bs * h * d
        for j, cache in enumerate((k_cache, v_cache)):
            _pack_kernel[(n,)](
                cache, ids, buf[j], scales[j] if quant else buf, cache.stride(0), QMAX.get(quant, 1.0),
                ELEMS=elems, CHUNK=min(4096, triton.next_power_of_2(elems)),
                QUANT=(None, "int8", "fp8").index(quant), num_warps=4,
            )
    return buf, scales


def _check_buffer(buf, scales, k_cache, ids, name):
    n = ids.shape[0]
    shape = (2, n) + tuple(k_cache.shape[1:])
    check(tuple(buf.shape) == shape and buf.is_contiguous(), name,
          f"buffer must be contiguous {shape}, got {tuple(buf.shape)}")
    if buf.dtype == k_cache.dtype:
        check(scales is None, name, "scales given for an unquantized buffer")
        return None
    quant = {torch.int8: "int8", torch.float8_e4m3fn: "fp8"}.get(buf.dtype)
    check(quant is not None, name, f"buffer dtype {buf.dtype} is neither the cache dtype nor int8/fp8")
    check(scales is not None and scales.dtype == torch.float32 and tuple(scales.shape) == (2, n)
          and scales.is_contiguous(), name, f"a {quant} buffer needs contiguous float32 scales [2, {n}]")
    return quant


def unpack_kv(buffer, scales, k_cache, v_cache, block_ids) -> None:
    """Triton launcher: scatter (dequantizing) buffer into k_cache/v_cache[block_ids], in place."""
    _check_caches(k_cache, v_cache, "unpack_kv")
    ids = _block_ids(block_ids, k_cache.device)
    quant = _check_buffer(buffer, scales, k_cache, ids, "unpack_kv")
    if quant == "fp8" and _no_fp8(k_cache.device):
        return unpack_kv_ref(buffer, scales, k_cache, v_cache, ids)
    check_launch("unpack_kv", buffer, k_cache, v_cache, ids, *([scales] if quant else []))
    n = ids.shape[0]
    if n == 0:
        return
    elems = buffer[0, 0].numel()
    for j, cache in enumerate((k_cache, v_cache)):
        _unpack_kernel[(n,)](
            buffer[j], scales[j] if quant else buffer, ids, cache, cache.stride(0),
            ELEMS=elems, CHUNK=min(4096, triton.next_power_of_2(elems)),
            QUANT=(None, "int8", "fp8").index(quant), num_warps=4,
        )


def pack_kv_ref(k_cache, v_cache, block_ids, quant: str | None = None):
    """Torch reference (and the CPU path); same rounding as the kernel."""
    _check_caches(k_cache, v_cache, "pack_kv")
    _check_quant(quant, "pack_kv")
    ids = _block_ids(block_ids, k_cache.device).long()
    x = torch.stack((k_cache[ids], v_cache[ids]))                # [2, n, bs, h, d]
    if quant is None:
        return x, None
    qmax = QMAX[quant]
    xf = x.float()
    amax = xf.abs().amax(dim=(2, 3, 4))                           # [2, n]
    inv = torch.where(amax > 0, qmax / torch.where(amax > 0, amax, 1.0), 0.0)
    y = (xf * inv[:, :, None, None, None]).clamp(-qmax, qmax)
    if quant == "int8":
        y = torch.where(y >= 0, torch.floor(y + 0.5), torch.ceil(y - 0.5))
    return y.to(QUANT[quant]), amax / qmax


def unpack_kv_ref(buffer, scales, k_cache, v_cache, block_ids) -> None:
    """Torch reference (and the CPU path), in place."""
    _check_caches(k_cache, v_cache, "unpack_kv")
    ids = _block_ids(block_ids, k_cache.device)
    quant = _check_buffer(buffer, scales, k_cache, ids, "unpack_kv")
    ids = ids.long()
    x = buffer if quant is None else buffer.float() * scales[:, :, None, None, None]
    k_cache[ids] = x[0].to(k_cache.dtype)
    v_cache[ids] = x[1].to(v_cache.dtype)
