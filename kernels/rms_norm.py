"""RMSNorm with an optional fused residual add (the Llama add-then-norm).

    x, residual  [n, hidden]   (any row stride, unit hidden stride)
    weight       [hidden]
    rms_norm(x, w, eps)            -> normed(x)
    rms_norm(x, w, eps, residual)  -> (normed(x + residual), x + residual)
normed(s) = s * rsqrt(mean(s^2) + eps) * weight, computed in float32, cast to x.dtype.  The sum
x + residual is rounded to x.dtype first (it is the next residual) and normed from that rounded
value, as HF Llama does.  One program per row.
"""
from __future__ import annotations

import torch

from pdcluster.kernels._triton import FLOAT_DTYPES, check, check_launch, new_empty, next_pow2, tl, triton


@triton.jit
def _rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, out_ptr, rout_ptr,
    eps,
    s_x, s_r, s_o, s_ro,                       # row strides
    HIDDEN: tl.constexpr, BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    mask = c < HIDDEN
    x = tl.load(x_ptr + i * s_x + c, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        s = x.to(tl.float32) + tl.load(r_ptr + i * s_r + c, mask=mask, other=0.0).to(tl.float32)
        s = s.to(rout_ptr.dtype.element_ty)                    # the new residual, in x.dtype
        tl.store(rout_ptr + i * s_ro + c, s, mask=mask)
        x = s
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / HIDDEN + eps)
    w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + i * s_o + c, (xf * inv * w).to(out_ptr.dtype.element_ty), mask=mask)


def _check(x, weight, residual) -> None:
    n = "rms_norm"
    check(x.dim() == 2, n, f"x must be [n, hidden], got {tuple(x.shape)}")
    check(weight.shape == (x.shape[1],), n, f"weight must be [{x.shape[1]}], got {tuple(weight.shape)}")
    check(x.dtype in FLOAT_DTYPES and weight.dtype in FLOAT_DTYPES, n,
          f"x/weight must be float, got {x.dtype}/{weight.dtype}")
    check(x.stride(1) == 1 and weight.stride(0) == 1, n, "hidden must be the unit-stride dimension")
    if residual is not None:
        check(residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(1) == 1, n,
              f"residual must match x ({tuple(x.shape)}, {x.dtype}) with unit hidden stride, "
              f"got {tuple(residual.shape)}, {residual.dtype}")


def rms_norm(x, weight, eps: float, residual=None):
    """Triton launcher; see the module docstring."""
    _check(x, weight, residual)
    check_launch("rms_norm", *(t for t in (x, weight, residual) if t is not None))
    n, hidden = x.shape
    out = new_empty(x.shape, x.dtype, x.device)
    rout = new_empty(x.shape, x.dtype, x.device) if residual is not None else out
    if n > 0:
        block = next_pow2(hidden)
        _rms_norm_kernel[(n,)](
            x, residual if residual is not None else x, weight, out, rout, float(eps),
            x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0), rout.stride(0),
            HIDDEN=hidden, BLOCK=block, HAS_RESIDUAL=residual is not None,
            num_warps=min(16, max(1, block // 256)),
        )
    return (out, rout) if residual is not None else out


def rms_norm_ref(x, weight, eps: float, residual=None):
    """Torch reference (and the CPU path)."""
    _check(x, weight, residual)
    if residual is not None:
        s = (x.float() + residual.float()).to(x.dtype)
        return _norm(s, weight, eps), s
    return _norm(x, weight, eps)


def _norm(x, weight, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
