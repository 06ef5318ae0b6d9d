"""The multiply-accumulate step and tiling shared by the weight-only matmuls (kernels/w4a16_matmul.py,
kernels/w8a16_matmul.py; their torch references are beside them): GEMV for a few rows, tl.dot tiles
of 16 rows (GEMM) above."""
import torch

from pdcluster.kernels._triton import new_empty, tl, triton

GEMV_MAX_ROWS = 4
GEMV_BLOCK_N = 16      # output columns per GEMV program: N / 16 programs (1,024 for an 8B MLP's 16384),
                       #   enough to keep every SM streaming weight rows
GEMM_BLOCK_N = 128


def launch_plan(x: torch.Tensor, N: int, k_step: tuple[int, int]):
    """y [M, N] (x.dtype, uninitialized) and, unless it is empty, the launch: (grid, meta-parameters).
    k_step: the kernel's BLOCK_K for (GEMV, GEMM). GEMM row tiles grow with M (16 / 32 / 64) so a
    weight tile is dequantized fewer times per call."""
    M = x.shape[0]
    y = new_empty((M, N), x.dtype, x.device)
    if M == 0 or N == 0:
        return y, None
    gemv = M <= GEMV_MAX_ROWS
    bm, bn = (1, GEMV_BLOCK_N) if gemv else (16 if M <= 16 else 32 if M <= 32 else 64, GEMM_BLOCK_N)
    return y, ((triton.cdiv(M, bm), triton.cdiv(N, bn)),
               dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=k_step[0] if gemv else k_step[1], GEMV=gemv,
                    PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=4))


@triton.jit
def tile_offsets(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, M, N):
    """This program's rows [BLOCK_M] and output columns [BLOCK_N], and their in-range masks."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rm, rn, rm < M, rn < N


@triton.jit
def mac(acc, x, w, GEMV: tl.constexpr, PRECISION: tl.constexpr):
    """acc [BM, BN] += x [BM, BK] @ w [BN, BK]^T, in float32 (GEMV: BM == 1, summed on the vector units)."""
    if GEMV:
        acc += tl.sum(x.to(tl.float32) * w.to(tl.float32), axis=1)[None, :]
    else:
        acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=PRECISION)
    return acc
