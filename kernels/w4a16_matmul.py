"""w4a16: y = x @ W^T with W held as 4-bit codes in groups along K (weight-only int4).

    x      [M, K]     float (any row stride, unit K stride)
    q      uint8 [N, K/2]   code of W[n, k] in byte k // 2, low nibble for even k (contiguous rows)
    scale  [N, K/G]   float, zero alike (G = K / scale.shape[1]: a power of two >= 16; 32 for GGUF)
    W[n, k] = (q[n, k] - 8) * scale[n, k // G] + zero[n, k // G]
    y      [M, N]     x.dtype, accumulated in float32
Grid (M-tiles, N-tiles), BLOCK_K packed bytes (2 x BLOCK_K of K, any number of groups) per step; GEMV
for a few rows, GEMM tiles above (kernels/quant_tile.py).
"""
from __future__ import annotations

import torch

from pdcluster.kernels._triton import FLOAT_DTYPES, check, check_launch, tl, triton
from pdcluster.kernels.quant_tile import launch_plan, mac, tile_offsets


K_STEP = (256, 32)     # BLOCK_K in packed bytes (2 weights each) for GEMV and for GEMM tiles (H200 sweep: RESULTS)


@triton.jit
def _w4a16_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, y_ptr,
    M, N, K,
    s_xm, s_qn, s_sn, s_zn, s_ym,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GEMV: tl.constexpr, PRECISION: tl.constexpr,
):
    """Each step takes BLOCK_K whole bytes of every weight row: their low nibbles are the even k, the
    high nibbles the odd k, multiplied against x's even and odd columns (no interleave needed)."""
    rm, rn, m_ok, n_ok = tile_offsets(BLOCK_M, BLOCK_N, M, N)
    jb = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    KB = K // 2
    q_rows = q_ptr + rn[:, None].to(tl.int64) * s_qn
    x_rows = x_ptr + rm[:, None].to(tl.int64) * s_xm
    for kb0 in range(0, KB, BLOCK_K):
        kb = kb0 + jb                                                      # byte index [BK]
        kb_ok = kb < KB
        w_ok = n_ok[:, None] & kb_ok[None, :]
        b = tl.load(q_rows + kb[None, :], mask=w_ok, other=0)             # uint8 [BN, BK]
        grp = (2 * kb) // GROUP                                            # both nibbles share a group
        s = tl.load(s_ptr + rn[:, None] * s_sn + grp[None, :], mask=w_ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rn[:, None] * s_zn + grp[None, :], mask=w_ok, other=0.0).to(tl.float32)
        lo = ((b & 15).to(tl.float32) - 8.0) * s + z                       # W[:, 2 kb]
        hi = ((b >> 4).to(tl.float32) - 8.0) * s + z                       # W[:, 2 kb + 1]
        x_ok = m_ok[:, None] & kb_ok[None, :]
        xe = tl.load(x_rows + (2 * kb)[None, :], mask=x_ok, other=0.0)
        xo = tl.load(x_rows + (2 * kb + 1)[None, :], mask=x_ok, other=0.0)
        acc = mac(acc, xe, lo, GEMV, PRECISION)
        acc = mac(acc, xo, hi, GEMV, PRECISION)
    tl.store(y_ptr + rm[:, None].to(tl.int64) * s_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _check(x, q, scale, zero) -> int:
    n = "w4a16_matmul"
    check(x.dim() == 2 and q.dim() == 2, n, f"x must be [M, K] and q [N, K/2], got {tuple(x.shape)}, {tuple(q.shape)}")
    M, K = x.shape
    N = q.shape[0]
    check(q.dtype == torch.uint8 and q.shape[1] * 2 == K, n, f"q must be uint8 [N, {K // 2}], got {q.dtype} {tuple(q.shape)}")
    check(scale.dim() == 2 and scale.shape[0] == N and scale.shape == zero.shape, n,
          f"scale/zero must be equal [{N}, K/group], got {tuple(scale.shape)} and {tuple(zero.shape)}")
    groups = scale.shape[1]
    G = K // groups if groups else 0
    check(groups > 0 and G * groups == K and G >= 16 and G & (G - 1) == 0, n,
          f"group size K / scale.shape[1] = {K} / {groups} must be a power of two >= 16")
    check(x.dtype in FLOAT_DTYPES and scale.dtype in FLOAT_DTYPES and zero.dtype == scale.dtype, n,
          f"x and scale/zero must be float, got {x.dtype}/{scale.dtype}/{zero.dtype}")
    check(x.stride(1) == 1 and q.stride(1) == 1 and scale.stride(1) == 1 and zero.stride(1) == 1, n,
          "K must be the unit-stride dimension of x, q, scale and zero")
    return G


def w4a16_matmul(x, q, scale, zero):
    """Triton launcher; see the module docstring."""
    G = _check(x, q, scale, zero)
    check_launch("w4a16_matmul", x, q, scale, zero)
    y, plan = launch_plan(x, q.shape[0], K_STEP)
    if plan is not None:
        grid, meta = plan
        _w4a16_kernel[grid](x, q, scale, zero, y, x.shape[0], q.shape[0], x.shape[1],
                            x.stride(0), q.stride(0), scale.stride(0), zero.stride(0), y.stride(0), GROUP=G, **meta)
    return y


def w4a16_matmul_ref(x, q, scale, zero):
    """Torch reference: dequantize W in float32, multiply, cast to x.dtype."""
    G = _check(x, q, scale, zero)
    N, K = q.shape[0], x.shape[1]
    codes = torch.stack([q & 15, q >> 4], -1).view(N, K // G, G).float()
    w = (codes - 8) * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)
    return (x.float() @ w.view(N, K).t()).to(x.dtype)
