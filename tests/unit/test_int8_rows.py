"""engine/quant/int8_rows.py: a packed int4 linear's wide steps through an int8 copy of its weights; and
cpu_linear.OneDNNRows, the same arithmetic on oneDNN's prepacked int8 weight."""
import pytest
import torch

from pdcluster.engine.quant.cpu_linear import (Dyn8Linear, Int4Linear, Int8Linear, OneDNNRows, fbgemm_usable,
                                               int4pack_layout, int8_rows, onednn_int8_usable)
from pdcluster.engine.quant.int8_rows import ONEDNN_MIN_ROWS, Int8Rows, widen
from pdcluster.engine.quant.packed import Int8Weight, quantize_int4, quantize_int8

G = torch.Generator().manual_seed(7)
pytestmark = pytest.mark.skipif(int4pack_layout() is None, reason="torch's int4pack layout is not a known one")


def _lin(N=40, K=128, bias=True):                  # 40: padded to the int4 kernel's 16 rows
    w = quantize_int4(torch.randn(N, K, generator=G) * 0.05)
    return Int4Linear(w, torch.randn(N, generator=G) if bias else None)


def test_narrow_steps_are_the_packed_kernel_and_wide_ones_the_int8_copy():
    inner = _lin()
    lin = Int8Rows(inner, min_rows=4)
    x = torch.randn(3, 128, generator=G)
    assert torch.equal(lin(x), inner(x))                                  # below min_rows: untouched
    x = torch.randn(9, 128, generator=G) * torch.logspace(-2, 1, 9).unsqueeze(1)   # rows of unlike scales
    y = lin(x)
    assert y.dtype == torch.float32 and y.shape == (9, 40)
    # a row's result is its own: the same with any batch-mates (here: copies of itself)
    assert torch.equal(y, torch.cat([lin(x[i:i + 1].expand(4, -1))[:1] for i in range(9)]))
    # within the two roundings of the packed weights' exact values W: x per row (step sx = amax / 127) and
    # W per output row (step sw = max |W| / 127)
    W = inner.dequantize().double()                                       # [N, K]
    w8 = lin.q.double() * lin.scale.double().unsqueeze(1)
    ref = x.double() @ W.t() + inner.bias.double()
    sx = x.abs().amax(1, keepdim=True).double() / 127
    bound = sx / 2 * w8.abs().sum(1) + x.double().abs().sum(1, keepdim=True) * lin.scale.double() / 2
    bound = bound + 1e-5 * ref.abs().amax(1, keepdim=True)
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), (err / bound).max()
    assert (err.amax(1) > 0.01 * bound.amax(1)).all()                   # really rounded: not vacuous
    # the int8 copy is the packed weights' own values, rounded once more
    assert (w8 - W).abs().le(lin.scale.double().unsqueeze(1) / 2 + 1e-9).all()
    # control: a copy off by codes in one row breaks the bound there
    lin.q[5] = lin.q[5] // 2
    assert not ((lin(x).double() - ref).abs() <= bound).all()


def test_a_prefill_chunk_and_a_row_that_is_not_finite():
    lin = Int8Rows(_lin(bias=False), min_rows=2)
    x = torch.randn(70, 128, generator=G)                                # > 64 rows: the old dense path
    x[3, 5] = float("nan")
    y = lin(x)
    assert y[3].isnan().all() and y[torch.arange(70) != 3].isfinite().all()   # a bad row stays its own


@pytest.mark.skipif(not onednn_int8_usable(), reason="no VNNI / AMX: oneDNN's u8 x s8 sums could saturate")
def test_rows_from_onednn_min_rows_on_take_the_prepacked_copy():
    """Prefill chunks and big batches (>= ONEDNN_MIN_ROWS rows) run the copy on oneDNN's prepacked form: int8_rows'
    integer sums, rescaled in another order (last bits); fewer rows run int8_rows itself."""
    inner = _lin()
    lin = Int8Rows(inner, min_rows=4)
    x = torch.randn(ONEDNN_MIN_ROWS + 6, 128, generator=G) * torch.logspace(-2, 1, ONEDNN_MIN_ROWS + 6).unsqueeze(1)
    y = lin(x)
    assert torch.equal(y, lin.onednn(x) + inner.bias)
    torch.testing.assert_close(y, int8_rows(x, lin.q, lin.scale) + inner.bias, rtol=1e-6, atol=1e-6)
    few = x[: ONEDNN_MIN_ROWS - 1]
    assert torch.equal(lin(few), int8_rows(few, lin.q, lin.scale) + inner.bias)
    lin.onednn = OneDNNRows(lin.q.neg(), lin.scale)                       # control: the prepacked copy is what ran
    assert not torch.allclose(lin(x), y, rtol=1e-3) and torch.equal(lin(few), int8_rows(few, lin.q, lin.scale) + inner.bias)


def test_widen_copies_int4_linears_only_and_counts_the_bytes():
    inner = _lin(N=48, K=64, bias=False)
    lin = widen(inner, 8)
    assert isinstance(lin, Int8Rows) and lin.min_rows == 8 and lin.N == 48
    assert (lin.onednn is not None) == onednn_int8_usable()                 # its prepacked copy too, where exact
    assert lin.tiles is None                                                # 48 columns: not whole AMX blocks
    assert lin.nbytes == inner.nbytes + 48 * 64 * (1 + (lin.onednn is not None)) + 48 * 4
    int8 = Int8Linear(quantize_int8(torch.randn(16, 64, generator=G)), None)
    assert widen(int8, 8) is int8
    if fbgemm_usable():
        dyn = Dyn8Linear(Int8Weight(int8.q, int8.scale.float()), None)
        assert widen(dyn, 8) is dyn
    with pytest.raises(ValueError):
        Int8Rows(inner, 0)


def test_no_copy_where_q4x8_beats_it_and_the_engine_says_so(monkeypatch, caplog):
    """q4x8 on the AVX2 library beats the int8 copy at every row count (no exact oneDNN form there): widen leaves
    it alone, and an engine asked for cpu_int8_rows that widens nothing logs why. On AVX-512 it is copied."""
    import logging

    from pdcluster.engine import LLM, cpu_ext
    from pdcluster.engine.quant import q4x8
    from pdcluster.engine.quant.int8_rows import copy_pays
    if not q4x8.available():
        pytest.skip("no pdcluster::q4x8_mm on this host")
    lin = q4x8.Q4x8Linear(quantize_int4(torch.randn(48, 64, generator=G) * 0.05), None)
    monkeypatch.setattr(cpu_ext, "available", lambda: True)
    assert copy_pays(lin) and isinstance(widen(lin, 8), Int8Rows)
    monkeypatch.setattr(cpu_ext, "available", lambda: False)
    assert not copy_pays(lin) and widen(lin, 8) is lin
    with caplog.at_level(logging.WARNING, logger="pdcluster.engine.llama"):
        llm = LLM(quantization=None, cpu_int8_rows=12, kv_cache_memory=8 * 2**20, speculative="off")
    assert not any(isinstance(L.qkv, Int8Rows) for L in llm.engine.model.layers)
    assert any("cpu_int8_rows=12 not applied" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(not onednn_int8_usable(), reason="no VNNI / AMX: oneDNN's u8 x s8 sums could saturate")
def test_onednn_rows_is_int8_rows_arithmetic():
    """cpu_linear.OneDNNRows (the int8 head's and int8 linears' 2-63 rows where exact): the same integer sums as
    int8_rows, rescaled in another order (float32, last bits); a row's result is its own."""
    w = quantize_int8(torch.randn(72, 128, generator=G) * 0.05)
    x = torch.randn(9, 128, generator=G) * torch.logspace(-2, 1, 9).unsqueeze(1)
    got = OneDNNRows(w.q, w.scale)(x)
    want = int8_rows(x, w.q, w.scale.float())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert torch.equal(got, torch.cat([OneDNNRows(w.q, w.scale)(x[i:i + 1]) for i in range(9)]))
    bad = w.q.clone()
    bad[3] = -bad[3]                                                     # control: another weight shows
    assert not torch.allclose(OneDNNRows(bad, w.scale)(x), want, rtol=1e-3)


def test_only_the_lm_head_gets_a_copy_for_rows():
    """The head's rows run on AMX tiles where the CPU has them (engine/quant/int8_amx.py), else on oneDNN's
    prepacked copy where exact: one more copy, and only the head's."""
    from pdcluster.engine.quant import int8_amx
    from pdcluster.engine.quant.layers import quant_linear
    w = quantize_int8(torch.randn(64, 128, generator=G))
    head, lin = quant_linear(w, None, "cpu", head=True), quant_linear(w, None, "cpu")
    if not fbgemm_usable():
        pytest.skip("no fbgemm: int8 weights run _weight_int8pack_mm")
    assert (head.tiles is not None) == int8_amx.usable() and lin.tiles is None and lin.onednn is None
    assert (head.onednn is not None) == (onednn_int8_usable() and head.tiles is None)
    copy = head.tiles is not None or head.onednn is not None
    assert head.nbytes == lin.nbytes + (64 * 128 if copy else 0)
    x = torch.randn(5, 128, generator=G)
    torch.testing.assert_close(head(x), lin(x), rtol=1e-6, atol=0)      # the same arithmetic either way
