"""w4a16 / w8a16 weight-only matmuls (Triton) against their torch references: GEMV and GEMM row
counts, N and K off the block sizes, strided x rows, group sizes 16 and 32."""
import pytest
import torch

from pdcluster.kernels import w4a16_matmul, w4a16_matmul_ref, w8a16_matmul, w8a16_matmul_ref

from .kernel_testlib import assert_rel


def _int4(N, K, G, device):
    q = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=device)
    scale = torch.rand(N, K // G, device=device) * 0.1 + 0.01
    zero = torch.randn(N, K // G, device=device) * 0.1
    return q, scale, zero


def _x(M, K, device):
    return torch.randn(M, K + 16, device=device)[:, 8:8 + K]             # strided rows


@pytest.mark.parametrize("M", [1, 3, 5, 21, 40])                          # GEMV (<= 4 rows), GEMM tiles of 16 / 32 / 64
@pytest.mark.parametrize("N,K,G", [(96, 64, 32), (40, 96, 32), (64, 48, 16), (72, 320, 32)])   # K off the step
def test_w4a16_matches_reference(device, M, N, K, G):
    q, s, z = _int4(N, K, G, device)
    x = _x(M, K, device)
    assert_rel(w4a16_matmul(x, q, s, z), w4a16_matmul_ref(x, q, s, z), tol=1e-5)


@pytest.mark.parametrize("M", [1, 4, 18, 40])
@pytest.mark.parametrize("N,K", [(96, 64), (40, 100), (72, 300)])         # K off BLOCK_K (128 / 64)
def test_w8a16_matches_reference(device, M, N, K):
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=device)
    s = torch.rand(N, device=device) * 0.01
    x = _x(M, K, device)
    assert_rel(w8a16_matmul(x, q, s), w8a16_matmul_ref(x, q, s), tol=1e-5)


def test_references_are_the_definition():
    """Element by element: W[n, k] = (code - 8) * scale + zero, code = nibble k % 2 of byte k // 2."""
    N, K, G = 5, 32, 16
    q, s, z = _int4(N, K, G, "cpu")
    x = torch.randn(3, K)
    w = torch.empty(N, K, dtype=torch.float64)
    for n in range(N):
        for k in range(K):
            code = (int(q[n, k // 2]) >> (4 * (k % 2))) & 15
            w[n, k] = (code - 8) * float(s[n, k // G]) + float(z[n, k // G])
    torch.testing.assert_close(w4a16_matmul_ref(x, q, s, z).double(), x.double() @ w.t(), rtol=1e-5, atol=1e-5)
    q8 = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    s8 = torch.rand(N) * 0.01         # |w| <= 1.27, as test_w8a16_matches_reference's; with torch.rand(N) alone
                                      # (|w| to 127) float32's own rounding of the reference exceeded atol for a
                                      # seed in ~1 of a few hundred
    want = x.double() @ (q8.double() * s8.double()[:, None]).t()
    torch.testing.assert_close(w8a16_matmul_ref(x, q8, s8).double(), want, rtol=1e-5, atol=1e-5)


def test_quant_matmuls_reject_bad_inputs():
    q, s, z = _int4(8, 64, 32, "cpu")
    with pytest.raises(ValueError, match="q must be uint8"):
        w4a16_matmul(torch.randn(2, 32), q, s, z)
    with pytest.raises(ValueError, match="group size"):
        w4a16_matmul(torch.randn(2, 64), q, s[:, :1].repeat(1, 3), z[:, :1].repeat(1, 3))
    with pytest.raises(ValueError, match="scale must be float"):
        w8a16_matmul(torch.randn(2, 64), torch.zeros(8, 64, dtype=torch.int8), torch.ones(7))
    with pytest.raises(ValueError, match="q must be int8"):
        w8a16_matmul(torch.randn(2, 64), torch.zeros(8, 64, dtype=torch.uint8), torch.ones(8))


def test_engine_cuda_linears_run_these_kernels(device):
    """engine/quant/gpu_linear.TritonLinear (what a CUDA engine builds for packed weights) against the
    engine's own dequantize: the kernels read the engine's formats as they are."""
    from pdcluster.engine.quant.gpu_linear import TritonLinear
    from pdcluster.engine.quant.packed import dequantize, quantize_int4, quantize_int8

    w = torch.randn(80, 128) * 0.1
    bias = torch.randn(80, device=device)
    for packed in (quantize_int4(w), quantize_int8(w)):
        lin = TritonLinear(packed.to(device), bias)
        for M in (2, 17):
            x = torch.randn(M, 128, device=device)
            ref = x.double() @ dequantize(packed).double().t().to(device) + bias.double()
            assert_rel(lin(x), ref.float(), tol=1e-5, what=packed.kind)
