"""engine/quant/int8_mm_avx2.cpp: pdcluster::int8_mm (int8 x int8 -> int32 on AVX2) against torch._int_mm, exactly;
int8_rows (cpu_linear.py) on it; and Dyn8Linear's rows where neither it nor oneDNN is usable."""
import pytest
import torch

from pdcluster.engine import cpu_ext
from pdcluster.engine.quant.cpu_linear import Dyn8Linear
from pdcluster.engine.quant.packed import quantize_int8

G = torch.Generator().manual_seed(5)
needs_op = pytest.mark.skipif(not cpu_ext.has("int8_mm"), reason="not an AVX2-only host (or no compiler)")


def test_the_op_builds_where_the_avx2_library_is_the_hosts():
    """Where the host builds the AVX2 library (no AVX-512 VNNI), a failed int8_mm would silently leave _int_mm."""
    if cpu_ext.variant() is None or cpu_ext.variant()[0] != cpu_ext.AVX2_SOURCES:
        pytest.skip("this host builds the AVX-512 library, or none")
    assert cpu_ext.has("int8_mm") and not cpu_ext.available()


@needs_op
@pytest.mark.parametrize("K", [32, 64, 576, 1536, 40, 7])          # whole vectors of 32 and scalar tails
@pytest.mark.parametrize("M", [1, 3, 4, 5, 9])
def test_the_op_is_int_mm_exactly(K, M):
    a = torch.randint(-127, 128, (M, K), generator=G, dtype=torch.int8)
    w = torch.randint(-128, 128, (50, K), generator=G, dtype=torch.int8)
    w[0] = -128                                         # the extremes: |w| = 128 read as u8, every pair at its largest
    w[1] = 127
    a[0] = -127
    y = torch.ops.pdcluster.int8_mm(a, w)
    assert y.dtype == torch.int32 and y.shape == (M, 50)
    ref = a.long() @ w.long().t()
    assert torch.equal(y.long(), ref)
    assert y[0, 0].item() == 127 * 128 * K              # no int16 pair saturated


@needs_op
def test_int8_rows_on_the_op_is_int8_rows_on_int_mm(monkeypatch):
    from pdcluster.engine.quant import cpu_linear
    q = torch.randint(-127, 128, (48, 576), generator=G, dtype=torch.int8)
    scale = torch.rand(48, generator=G) * 0.01
    x = torch.randn(6, 576, generator=G)
    x[2, 3] = float("nan")
    y = cpu_linear.int8_rows(x, q, scale)
    has = cpu_ext.has
    monkeypatch.setattr(cpu_ext, "has", lambda op: op != "int8_mm" and has(op))
    ref = cpu_linear.int8_rows(x, q, scale)             # torch._int_mm
    assert torch.equal(y.nan_to_num(7.0), ref.nan_to_num(7.0))       # the same bits; NaN where x had one
    assert y[2].isnan().all() and y[[0, 1, 3, 4, 5]].isfinite().all()


@needs_op
def test_bad_arguments():
    with pytest.raises(RuntimeError, match="int8"):
        torch.ops.pdcluster.int8_mm(torch.zeros(2, 32), torch.zeros(3, 32, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="K as a's"):
        torch.ops.pdcluster.int8_mm(torch.zeros(2, 32, dtype=torch.int8), torch.zeros(3, 64, dtype=torch.int8))


def test_int8_rows_without_vnni_or_amx_are_each_rows_batch_1_result(monkeypatch):
    """Where oneDNN's sums are not exact (no VNNI / AMX) and pdcluster's AVX2 int8_mm did not build, torch._int_mm
    would be ~8x slower than fbgemm row by row: several rows go through fbgemm one at a time, each row's result
    exactly what it gets alone."""
    from pdcluster.engine.quant import cpu_linear
    monkeypatch.setattr(cpu_linear, "onednn_int8_usable", lambda: False)
    has = cpu_linear.cpu_ext.has
    monkeypatch.setattr(cpu_linear.cpu_ext, "has", lambda op: op != "int8_mm" and has(op))   # nor the AVX2 int8_mm
    lin = Dyn8Linear(quantize_int8(torch.randn(40, 64, generator=G) * 0.1), torch.randn(40, generator=G))
    assert lin.onednn is None and lin.tiles is None
    x = torch.randn(5, 64, generator=G)
    y = lin(x)
    assert y.shape == (5, 40) and torch.equal(y, torch.cat([lin(x[i:i + 1]) for i in range(5)]))
    ref = x.double() @ lin.dequantize().double().t() + lin.bias.double()
    torch.testing.assert_close(y.double(), ref, rtol=0.05, atol=0.05 * ref.abs().max().item())
