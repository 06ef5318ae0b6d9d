"""engine/quant/q4x8.py: pdcluster::q4x8_mm (int4 weights x int8 activations; AVX-512 VNNI, or AVX2 where that is
what the CPU has) against its torch reference and against the exact float product, its packing, and its linear."""
import pytest
import torch

from pdcluster.engine import cpu_ext
from pdcluster.engine.quant import q4x8
from pdcluster.engine.quant.packed import Int4Weight, dequantize, quantize_int4

G = torch.Generator().manual_seed(11)
HOST = cpu_ext.variant() is not None               # AVX-512 VNNI + F16C, or AVX2 + FMA + F16C
needs_op = pytest.mark.skipif(not (HOST and q4x8.available()), reason="neither AVX-512 VNNI nor AVX2 (or no compiler)")
KS = (32, 96, 576, 1536, 2112)               # whole groups of 32, odd and even group counts


def _weight(N, K, scale=0.05):
    return quantize_int4(torch.randn(N, K, generator=G) * scale)


def test_the_op_builds_where_the_cpu_has_the_instructions():
    """On an AVX-512 VNNI or AVX2 host (this one, CI's) a failed build would silently fall back to torch's kernel."""
    if not HOST:
        pytest.skip("the CPU lacks AVX-512 VNNI and AVX2 / FMA / F16C")
    assert q4x8.available()


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("N", [40, 48])
def test_packing_keeps_every_code_and_the_weights(K, N):
    w = _weight(N, K)
    q = q4x8.pack(w)
    assert q.shape == (N, K) and q.w.shape == (48, K // 2) and q.d.shape == q.mn.shape == (48, K // 32)   # padded
    assert q.d.dtype == q.mn.dtype == torch.float16
    assert torch.equal(q4x8.codes(q), w.codes())
    # the padding rows are zero codes, scales and mins; a block holds 4 weights of each of its 16 rows a vector
    if N < 48:                                        # rows N..47 of the last block
        assert not q.w.view(3, K // 32, 4, 16, 4)[2, :, :, N - 32:].any()
        assert not q.d.view(3, K // 32, 16)[2, :, N - 32:].any() and not q.mn.view(3, K // 32, 16)[2, :, N - 32:].any()
    blk = q.w.view(3, K // 32, 4, 16, 4)[0, 0]                          # block 0, group 0: [u, row, j]
    assert torch.equal(blk[1, 5] & 15, w.codes()[5, 8:12]) and torch.equal(blk[1, 5] >> 4, w.codes()[5, 12:16])
    d, mn = q4x8.scales(q)
    # the weights differ from packed.py's only by scale and min rounded to float16
    w16 = Int4Weight(w.q, d.float(), mn.float() + 8 * d.float())
    torch.testing.assert_close(q4x8.dequantize(q), dequantize(w16), rtol=0, atol=1e-6)
    torch.testing.assert_close(q4x8.dequantize(q), dequantize(w), rtol=0, atol=2e-3 * 0.05 * 4)


def test_packing_refuses_what_the_op_cannot_take():
    with pytest.raises(ValueError):
        q4x8.pack(_weight(8, 48))                     # K not whole groups of 32
    with pytest.raises(ValueError, match="float16"):
        q4x8.pack(_weight(8, 64, scale=1e6))          # scales past float16's range
    from pdcluster.engine.quant.cpu_linear import Int4Linear
    from pdcluster.engine.quant.layers import quant_linear
    assert isinstance(quant_linear(_weight(8, 64, scale=1e6), None, "cpu"), Int4Linear)   # torch's kernel then


@needs_op
@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("M", [1, 3, 9])
def test_op_is_its_reference_and_within_the_activation_rounding(K, M):
    q = q4x8.pack(_weight(72, K))                     # 72 rows: 4 blocks of 16 and a padded one
    x = torch.randn(M, K, generator=G) * torch.logspace(-2, 1, M).unsqueeze(1)      # rows of unlike scales
    y = q4x8.q4x8_mm(x, q)
    assert y.dtype == torch.float32 and y.shape == (M, 72) and y.is_contiguous()     # the padding cut off
    ref = q4x8.q4x8_mm_ref(x, q).double()
    # the same integer sums and scales: equal up to float32 summation order
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # against the exact product with the same weights: each x moves by at most half its block's step dx / 2
    W = q4x8.dequantize(q).double()
    exact = x.double() @ W.t()
    dx = x.view(M, K // 32, 32).abs().amax(-1).double() / 127                       # [M, G]
    bound = (dx.repeat_interleave(32, 1) / 2) @ W.abs().t() + 1e-5 * exact.abs().amax(1, keepdim=True)
    err = (y.double() - exact).abs()
    assert (err <= bound).all(), (err / bound).max()
    assert (err.amax(1) > 0.01 * bound.amax(1)).all()        # really rounded: the bound is not vacuous
    # a row's result is its own, whatever its batch-mates
    assert torch.equal(y, torch.cat([q4x8.q4x8_mm(x[i:i + 1], q) for i in range(M)]))


@needs_op
def test_bad_rows_and_bad_arguments():
    q = q4x8.pack(_weight(32, 576))
    x = torch.randn(4, 576, generator=G)
    x[1, 7], x[2, 300], x[3] = float("nan"), float("inf"), 0.0
    y = q4x8.q4x8_mm(x, q)
    assert y[1].isnan().all() and y[2].isnan().all()         # a non-finite row gives NaN, only there
    assert y[0].isfinite().all() and torch.equal(y[3], torch.zeros(32))       # zeros: 0 exactly
    with pytest.raises(RuntimeError, match="multiple of 32"):
        torch.ops.pdcluster.q4x8_mm(torch.randn(1, 80), torch.zeros(32, 40, dtype=torch.uint8), q.d[:, :3], q.mn[:, :3])
    with pytest.raises(RuntimeError, match="multiple of 16"):
        torch.ops.pdcluster.q4x8_mm(x, q.w[:24], q.d[:24], q.mn[:24])
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.pdcluster.q4x8_mm(x.double(), q.w, q.d, q.mn)
    with pytest.raises(RuntimeError, match="d and mn"):
        torch.ops.pdcluster.q4x8_mm(x, q.w, q.d[:8], q.mn[:8])
    # control: one corrupted code (row 5's first weight: byte 4 * 5 of the first block) changes its row alone
    w2 = q.w.clone()
    w2.view(-1)[4 * 5] ^= 0x0F
    y2 = torch.ops.pdcluster.q4x8_mm(x[:1], w2, q.d, q.mn)
    assert not torch.equal(y2[0, 5], y[0, 5])
    assert torch.equal(y2[0, :5], y[0, :5]) and torch.equal(y2[0, 6:], y[0, 6:])


@needs_op
def test_the_linear_kernel_rows_dense_rows_and_threads():
    from pdcluster.engine.quant.cpu_linear import DENSE_MIN_ROWS
    w = _weight(48, 576)
    bias = torch.randn(48, generator=G)
    lin = q4x8.Q4x8Linear(w, bias)
    x = torch.randn(DENSE_MIN_ROWS + 6, 576, generator=G)
    ref = x.double() @ lin.dequantize().double().t() + bias.double()
    small, big = lin(x[:5]), lin(x)
    torch.testing.assert_close(lin.dense(x).double() + bias.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(small.double(), ref[:5], rtol=0.02, atol=0.02 * ref.abs().max().item())
    if q4x8.dense_min_rows() is None:                         # AVX2: every row count on the op, row by row
        assert torch.equal(big[:5], small) and torch.equal(big, lin.kernel(x) + bias)
        torch.testing.assert_close(big.double(), ref, rtol=0.02, atol=0.02 * ref.abs().max().item())
    else:                                                     # AVX-512: dequantize + float32 GEMM from 64 rows
        torch.testing.assert_close(big.double(), ref, rtol=1e-5, atol=1e-5)
    assert q4x8.Q4x8Linear(w, None)(x[:5].bfloat16()).dtype == torch.bfloat16     # y in x's dtype
    assert lin.nbytes == 48 * 288 + 2 * 48 * 18 * 2
    # the result does not depend on the thread count (rows are split across threads, each summed alone)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = lin(x[:5])
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, small)


def test_a_failed_build_leaves_torchs_int4_kernel(tmp_path, monkeypatch, caplog):
    """No compiler (or any build error): available() says so, logs why, and int4 linears take Int4Linear."""
    from pdcluster.engine.quant.cpu_linear import Int4Linear
    from pdcluster.engine.quant.layers import quant_linear
    if not HOST:
        pytest.skip("the CPU lacks AVX-512 VNNI and AVX2 / FMA / F16C: nothing is built here")
    monkeypatch.setenv("PDCLUSTER_AOTI_CACHE", str(tmp_path / "aoti"))     # a cache without the library
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    cpu_ext.ops.cache_clear()
    try:
        assert not q4x8.available()
        assert "CPU kernels not built" in caplog.text
        assert isinstance(quant_linear(_weight(16, 64), None, "cpu"), Int4Linear)
    finally:
        cpu_ext.ops.cache_clear()
    monkeypatch.undo()
    assert q4x8.available()                                                 # the built library again


def test_wide_steps_go_dense_only_with_the_avx512_library(monkeypatch):
    """Prefill-sized row counts dequantize + MKL from DENSE_MIN_ROWS where the AVX-512 library loaded; the AVX2 op
    beats MKL's float32 GEMM at every row count measured, so there they stay on the op."""
    from pdcluster.engine.quant.cpu_linear import DENSE_MIN_ROWS
    monkeypatch.setattr(cpu_ext, "available", lambda: True)
    assert q4x8.dense_min_rows() == DENSE_MIN_ROWS
    monkeypatch.setattr(cpu_ext, "available", lambda: False)
    assert q4x8.dense_min_rows() is None


@needs_op
def test_the_compiled_layers_linear_is_the_eager_one_in_x_dtype():
    """cpu_compile._linear (what the AOTI package traces) runs the same op as Q4x8Linear.kernel, in x's dtype."""
    from pdcluster.engine.cpu_compile import _linear, linear_spec
    lin = q4x8.Q4x8Linear(_weight(40, 576), None)
    spec, ws = linear_spec(lin)
    assert spec.kind == "q4x8" and spec.n == 40
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 576, generator=G).to(dtype)
        y = _linear(spec, x, list(ws))
        assert y.dtype == dtype and torch.equal(y, lin(x))

