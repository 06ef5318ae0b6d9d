"""engine/quant/quantize_rows.cpp (pdcluster::quantize_rows) against its torch reference, cpu_linear._round_rows:
the same codes and scales bit for bit, for rows of any scale and length, shifted or not; non-finite rows; and
cpu_linear.quantize_rows taking the torch ops where the op is not built."""
import pytest
import torch

from pdcluster.engine import cpu_ext
from pdcluster.engine.quant import cpu_linear
from pdcluster.engine.quant.cpu_linear import _round_rows, int8_rows, quantize_rows

HOST = not [f for f in cpu_ext.FLAGS if f not in cpu_ext.cpu_flags()]
needs_op = pytest.mark.skipif(not (HOST and cpu_ext.available()), reason="no AVX-512 VNNI host (or no compiler)")
G = torch.Generator().manual_seed(13)


def _x(M, K):
    x = torch.randn(M, K, generator=G) * torch.logspace(-36, 4, M).unsqueeze(1)   # rows below the 1e-30 clamp too
    x[0] = 0.0
    x[-1, : K // 2] = x[-1, K // 2:].max()                                      # ties at the row's max
    return x


@needs_op
@pytest.mark.parametrize("M,K", [(1, 576), (9, 3072), (130, 1536), (5, 100), (3, 7)])
@pytest.mark.parametrize("shift", [False, True])
def test_the_op_is_the_reference_bit_for_bit(M, K, shift):
    x = _x(M, K)
    q, sx = torch.ops.pdcluster.quantize_rows(x, shift)
    r, want_sx = _round_rows(x)
    assert torch.equal(sx, want_sx)
    assert torch.equal(q, r.add(128).to(torch.uint8) if shift else r.to(torch.int8))
    assert q.dtype == (torch.uint8 if shift else torch.int8)


@needs_op
def test_half_way_values_round_to_even_as_torch_round():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5] * 4])     # scale 1: x / sx = x
    q, sx = torch.ops.pdcluster.quantize_rows(x, False)
    assert sx.item() == 1.0 and q[0, :8].tolist() == [127, 0, 2, 2, 0, -2, -2, 4]


@needs_op
def test_a_nan_row_keeps_a_nan_scale_and_the_rows_are_independent_of_threads():
    x = _x(40, 576)
    x[7, 3] = float("nan")
    q, sx = torch.ops.pdcluster.quantize_rows(x, False)
    assert sx[7].isnan().all() and sx[torch.arange(40) != 7].isfinite().all()
    w = torch.randint(-127, 128, (64, 576), dtype=torch.int8, generator=G)
    y = int8_rows(x, w, torch.ones(64))
    assert y[7].isnan().all() and y[:7].isfinite().all()                       # the row's result stays non-finite
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        q1, s1 = torch.ops.pdcluster.quantize_rows(x, False)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(q1, q) and torch.equal(s1[~s1.isnan()], sx[~sx.isnan()])


@needs_op
def test_bad_arguments_raise():
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.pdcluster.quantize_rows(torch.zeros(2, 64, dtype=torch.float64), False)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.pdcluster.quantize_rows(torch.zeros(64), False)


def test_without_the_op_the_torch_ops_give_the_same(monkeypatch):
    x = _x(12, 576)
    got = [quantize_rows(x), quantize_rows(x, shift=True)]
    monkeypatch.setattr(cpu_linear.cpu_ext, "available", lambda: False)
    want = [quantize_rows(x), quantize_rows(x, shift=True)]
    for (q, s), (wq, ws) in zip(got, want):
        assert torch.equal(q, wq) and torch.equal(s, ws)
