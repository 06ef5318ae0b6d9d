"""w8a16: y = x @ W^T with W held as int8 codes and one scale per output channel (weight-only int8).

    x      [M, K]         float (any row stride, unit K stride)
    q      int8 [N, K]    (unit K stride)
    scale  [N]            float
    W[n, k] = q[n, k] * scale[n]
    y      [M, N]         x.dtype, accumulated in float32 (the scale applied once, after the sum)
Grid (M-tiles, N-tiles), BLOCK_K of K per step; GEMV for a few rows, GEMM tiles above
(kernels/quant_tile.py).
"""
from __future__ import annotations

import torch

from pdcluster.kernels._triton import FLOAT_DTYPES, check, check_launch, tl, triton
from pdcluster.kernels.quant_tile import launch_plan, mac, tile_offsets


K_STEP = (64, 64)      # BLOCK_K for GEMV (an int8 [16, 64] weight tile per step) and GEMM tiles (H200 sweep: RESULTS)


@triton.jit
def _w8a16_kernel(
    x_ptr, q_ptr, s_ptr, y_ptr,
    M, N, K,
    s_xm, s_qn, s_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GEMV: tl.constexpr, PRECISION: tl.constexpr,
):
    rm, rn, m_ok, n_ok = tile_offsets(BLOCK_M, BLOCK_N, M, N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_ok = k < K
        w = tl.load(q_ptr + rn[:, None].to(tl.int64) * s_qn + k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                    other=0)                                               # int8 [BN, BK]
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * s_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        acc = mac(acc, x, w, GEMV, PRECISION)
    s = tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rm[:, None].to(tl.int64) * s_ym + rn[None, :], (acc * s[None, :]).to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _check(x, q, scale) -> None:
    n = "w8a16_matmul"
    check(x.dim() == 2 and q.dim() == 2 and x.shape[1] == q.shape[1], n,
          f"x must be [M, K] and q [N, K], got {tuple(x.shape)}, {tuple(q.shape)}")
    check(q.dtype == torch.int8, n, f"q must be int8, got {q.dtype}")
    check(scale.shape == (q.shape[0],) and scale.dtype in FLOAT_DTYPES, n,
          f"scale must be float [{q.shape[0]}], got {scale.dtype} {tuple(scale.shape)}")
    check(x.dtype in FLOAT_DTYPES, n, f"x must be float, got {x.dtype}")
    check(x.stride(1) == 1 and q.stride(1) == 1, n, "K must be the unit-stride dimension of x and q")


def w8a16_matmul(x, q, scale):
    """Triton launcher; see the module docstring."""
    _check(x, q, scale)
    check_launch("w8a16_matmul", x, q, scale)
    y, plan = launch_plan(x, q.shape[0], K_STEP)
    if plan is not None:
        grid, meta = plan
        _w8a16_kernel[grid](x, q, scale, y, x.shape[0], q.shape[0], x.shape[1], x.stride(0), q.stride(0),
                            y.stride(0), **meta)
    return y


def w8a16_matmul_ref(x, q, scale):
    """Torch reference: dequantize W in float32, multiply, cast to x.dtype."""
    _check(x, q, scale)
    return (x.float() @ (q.float() * scale.float().unsqueeze(-1)).t()).to(x.dtype)
