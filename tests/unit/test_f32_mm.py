"""kernels/f32_mm.py: pdcluster::f32_mm (float32 linears on weights packed at load) against F.linear, its
packing, its batch and thread invariance, bad arguments, and engine/llama.py's Linear on it."""
import pytest
import torch
import torch.nn.functional as F

from pdcluster.engine import cpu_ext
from pdcluster.engine.llama import Linear, make_linear
from pdcluster.kernels import f32_mm as K

G = torch.Generator().manual_seed(5)
HOST = cpu_ext.variant() is not None        # AVX-512 VNNI, or AVX2 + FMA + F16C: a library with the op
needs_op = pytest.mark.skipif(not (HOST and K.available()), reason="no AVX-512 or AVX2 host (or no compiler)")


def _close(y, ref):
    assert y.shape == ref.shape and y.dtype == torch.float32
    if y.numel():
        assert (y - ref).abs().max() <= 8e-5 * max(1.0, ref.abs().max().item())


def test_the_op_builds_where_the_cpu_has_the_instructions():
    if not HOST:
        pytest.skip("the CPU lacks AVX-512 and AVX2")
    assert K.available()


@pytest.mark.parametrize("N,Kd", [(1, 1), (63, 17), (64, 576), (65, 576), (200, 1536)])
def test_packing_keeps_the_weight_and_pads_with_zeros(N, Kd):
    w = torch.randn(N, Kd, generator=G)
    q = K.pack(w)
    Np = -(-N // 64) * 64
    assert q.w.shape == (Np // 64, Kd, 64) and q.shape == (N, Kd) and q.nbytes == Np * Kd * 4
    assert torch.equal(K.unpack(q), w)
    assert q.w[N // 64, :, N % 64:].abs().sum() == 0 if N % 64 else True    # the padded columns are zeros


@needs_op
@pytest.mark.parametrize("M", [0, 1, 5, 6, 7, 13, 64, 130])
@pytest.mark.parametrize("N,Kd", [(1, 1), (63, 17), (65, 576), (200, 1536)])
def test_the_op_gives_f_linear_for_every_row_count_and_shape(M, N, Kd):
    w = torch.randn(N, Kd, generator=G)
    x = torch.randn(M, Kd, generator=G)
    q = K.pack(w)
    _close(K.f32_mm(x, q), F.linear(x, w))
    _close(K.f32_mm_ref(x, q), F.linear(x, w))


@needs_op
def test_a_row_gets_the_same_bits_whatever_its_batch_mates_and_threads():
    w = torch.randn(300, 576, generator=G)
    x = torch.randn(19, 576, generator=G)
    q = K.pack(w)
    full = K.f32_mm(x, q)
    for i in range(19):
        assert torch.equal(K.f32_mm(x[i:i + 1], q)[0], full[i])
        assert torch.equal(K.f32_mm(x[max(0, i - 3):i + 4], q)[min(i, 3)], full[i])
    threads = torch.get_num_threads()
    try:
        for t in (2, 3):                   # 5 blocks: ranges of half blocks (32 columns) split blocks 2 / 1 and 3
            torch.set_num_threads(t)
            assert torch.equal(K.f32_mm(x, q), full)
            assert torch.equal(K.f32_mm(x[:1], q)[0], full[0])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(K.f32_mm(x[:, :].t().contiguous().t(), q), full)    # a strided x: the same


@needs_op
def test_a_non_finite_row_stays_in_its_row():
    w = torch.randn(70, 64, generator=G)
    x = torch.randn(8, 64, generator=G)
    x[3, 10] = float("nan")
    y = K.f32_mm(x, K.pack(w))
    assert torch.isnan(y[3]).all() and torch.isfinite(torch.cat([y[:3], y[4:]])).all()


@needs_op
def test_bad_arguments_are_refused():
    q = K.pack(torch.randn(64, 32, generator=G))
    with pytest.raises(RuntimeError, match="f32_mm"):
        K.f32_mm(torch.randn(2, 31), q)                                   # K mismatch
    with pytest.raises(RuntimeError, match="f32_mm"):
        K.f32_mm(torch.randn(2, 32).double(), q)                          # dtype
    with pytest.raises(RuntimeError, match="f32_mm"):
        torch.ops.pdcluster.f32_mm(torch.randn(2, 32), q.w, 65)          # n past the blocks
    with pytest.raises(RuntimeError, match="f32_mm"):
        torch.ops.pdcluster.f32_mm(torch.randn(2, 32), q.w.transpose(1, 2), 64)   # not the packed layout
    for bad in (torch.randn(4, 4).half(), torch.randn(4), torch.randn(4, 0)):
        with pytest.raises(ValueError, match="float32"):
            K.pack(bad)


@needs_op
@pytest.mark.parametrize("rows", [1, 4, 17, 80])
def test_a_cpu_float32_linear_holds_only_the_packed_blocks(rows):
    w = torch.randn(96, 64, generator=G)
    b = torch.randn(96, generator=G)
    x = torch.randn(rows, 64, generator=G)
    lin = make_linear(w, b, "cpu", split=False)
    assert isinstance(lin, Linear) and lin.packed is not None and lin.weight is None
    assert lin.nbytes == 128 * 64 * 4                                     # 96 rows padded to 128, no [N, K] copy
    _close(lin(x), F.linear(x, w, b))
    head = make_linear(w, None, "cpu", split=False, head=True)           # the tied head is the embedding: kept
    assert head.packed is None and head.weight is w
    assert make_linear(w.bfloat16(), None, "cpu", split=True).packed is None


@needs_op
def test_long_steps_run_mkl_on_an_unpacked_copy_that_is_reused():
    w = torch.randn(130, 64, generator=G)
    lin = make_linear(w, None, "cpu", split=False)
    x = torch.randn(K.MKL_MIN_ROWS, 64, generator=G)
    assert torch.equal(lin(x), F.linear(x, w))                            # MKL on the same values
    _close(lin(x[:7]), F.linear(x[:7], w))                                # the op below the threshold
    from pdcluster.engine.llama import _scratch
    buf = _scratch()[lin.packed.w.shape]
    lin(x)
    assert _scratch()[lin.packed.w.shape] is buf and buf.shape == (192, 64)   # one buffer per shape, padded rows
