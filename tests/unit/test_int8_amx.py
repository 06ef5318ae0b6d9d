"""engine/quant/int8_amx.py: pdcluster::int8_amx_mm (int8 x int8 -> int32 on AMX tiles) equals torch._int_mm bit
for bit at every row count, its packing, its arguments, and the int8 copies (Int8Rows) and the LM head taking it
without changing a result."""
import pytest
import torch

from pdcluster.engine import cpu_ext
from pdcluster.engine.quant import int8_amx
from pdcluster.engine.quant.cpu_linear import int8_rows

HOST = all(f in cpu_ext.cpu_flags() for f in cpu_ext.FLAGS + int8_amx._FLAGS)
needs_amx = pytest.mark.skipif(not (HOST and int8_amx.usable()), reason="no AMX-INT8 host (or no compiler)")
G = torch.Generator().manual_seed(3)


def _i8(*shape):
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=G)


def test_it_runs_where_the_cpu_has_amx():
    """On an AMX host (this one, CI's) a failed build or a refused permission would silently fall back."""
    if not HOST:
        pytest.skip("the CPU lacks AMX-INT8")
    assert int8_amx.usable()


def test_packing_puts_each_weight_in_its_tile_slot():
    q = _i8(64, 192)
    t = int8_amx.pack(q)
    assert t.shape == (4, 3, 16, 64)
    nt, kc, kk, n, j = 2, 1, 5, 7, 3
    assert t[nt, kc, kk, 4 * n + j] == q[16 * nt + n, 64 * kc + 4 * kk + j]
    assert torch.equal(int8_amx.unpack(t), q)
    with pytest.raises(ValueError, match="N % 32"):
        int8_amx.pack(_i8(48, 64))
    with pytest.raises(ValueError, match="K % 64"):
        int8_amx.pack(_i8(64, 96))


@needs_amx
@pytest.mark.parametrize("M", [1, 2, 15, 16, 17, 31, 32, 33, 64, 100])
@pytest.mark.parametrize("N,K", [(32, 64), (960, 576), (576, 1536)])
def test_it_equals_int_mm_bit_for_bit(M, N, K):
    x, q = _i8(M, K), _i8(N, K)
    x[0, :] = -128                                    # the extremes: sums stay exact in int32
    q[:, 0] = -128
    got = int8_amx.int8_amx_mm(x, int8_amx.pack(q))
    assert got.dtype == torch.int32 and got.shape == (M, N)
    assert torch.equal(got, int8_amx.int8_amx_mm_ref(x, q))


@needs_amx
def test_rows_do_not_depend_on_batch_mates_or_threads_and_empty_is_empty():
    x, q = _i8(40, 128), _i8(64, 128)
    t = int8_amx.pack(q)
    full = int8_amx.int8_amx_mm(x, t)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = int8_amx.int8_amx_mm(x, t)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(full[33:34], int8_amx.int8_amx_mm(x[33:34], t)) and torch.equal(full, serial)
    assert int8_amx.int8_amx_mm(x[:0], t).shape == (0, 64)


@needs_amx
@pytest.mark.parametrize("bad,match", [
    (lambda x, t: (x.float(), t), "int8"),
    (lambda x, t: (x[:, :64], t), "K = 64"),
    (lambda x, t: (x, t[:1]), "multiple of 32"),                       # 16 columns
    (lambda x, t: (x, t.transpose(2, 3)), "tiles must be"),
])
def test_bad_arguments_raise(bad, match):
    x, t = _i8(4, 128), int8_amx.pack(_i8(64, 128))
    with pytest.raises(RuntimeError, match=match):
        int8_amx.int8_amx_mm(*bad(x, t))


@needs_amx
def test_int8_rows_on_tiles_is_int8_rows():
    x, q, scale = torch.randn(24, 576, generator=G), _i8(960, 576), torch.rand(960, generator=G) / 100
    assert torch.equal(int8_rows(x, None, scale, int8_amx.pack(q)), int8_rows(x, q, scale))


@needs_amx
def test_the_int8_copies_and_the_head_take_it():
    """Int8Rows below oneDNN's row count and the LM head's 2..63 rows run the tiles; their results are int8_rows'."""
    from pdcluster.engine.quant.cpu_linear import Dyn8Linear
    from pdcluster.engine.quant.int8_rows import ONEDNN_MIN_ROWS, Int8Rows
    from pdcluster.engine.quant.packed import quantize_int4, quantize_int8
    from pdcluster.engine.quant.q4x8 import Q4x8Linear
    inner = Q4x8Linear(quantize_int4(torch.randn(96, 128, generator=G) * 0.05), None)
    lin = Int8Rows(inner, 4)
    assert lin.tiles is not None and lin.q is None                         # the tiles replace the plain codes
    assert lin.nbytes == inner.nbytes + 96 * 128 * (1 + (lin.onednn is not None)) + 96 * 4
    x = torch.randn(ONEDNN_MIN_ROWS - 1, 128, generator=G)
    assert torch.equal(lin(x), int8_rows(x, int8_amx.unpack(lin.tiles), lin.scale))
    head = Dyn8Linear(quantize_int8(torch.randn(64, 128, generator=G)), None, onednn_rows=True)
    assert head.tiles is not None and head.onednn is None                  # the tiles instead of oneDNN's copy
    wide = torch.randn(ONEDNN_MIN_ROWS + 6, 128, generator=G)
    for rows in (x[:2], x[:32], wide):                                     # prefill's rows too
        assert torch.equal(head(rows), int8_rows(rows, head.q, head.scale))
