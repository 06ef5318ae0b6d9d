"""kernels/q4f32_mm.py: float32 weights that are GGUF Q4_1 values, found value by value (recover) and held as
their codes; pdcluster::q4f32_mm against f32_mm on the same float32 weight (bit for bit) and against F.linear;
batch and thread invariance; bad arguments; engine/llama.py's Linear and the engine on the embedded Q4_1 GGUF."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pdcluster.engine import cpu_ext
from pdcluster.engine.llama import _scratch, make_linear
from pdcluster.kernels import f32_mm
from pdcluster.kernels import q4f32_mm as Q

G = torch.Generator().manual_seed(11)
HOST = cpu_ext.variant() is not None        # AVX-512 VNNI, or AVX2 + FMA + F16C: a library with the op
needs_op = pytest.mark.skipif(not (HOST and Q.available()), reason="no AVX-512 or AVX2 host (or no compiler)")


def q4_1(N: int, K: int, seed: int = 0) -> torch.Tensor:
    """A float32 [N, K] weight as gguf's numpy dequantizer makes it from llama.cpp's Q4_1 quantization of random
    values: d = (max - min) / 15 and m = min per 32, stored float16; codes rounded; then (d * q) + m in float32."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, K // 32, 32)).astype(np.float32) * rng.uniform(0.01, 2, (N, K // 32, 1))
    lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
    d = (hi - lo) / 15
    q = np.minimum(15, np.floor((x - lo) / np.where(d > 0, d, 1) + 0.5)).astype(np.float32)
    w = (d.astype(np.float16).astype(np.float32) * q) + lo.astype(np.float16).astype(np.float32)
    return torch.from_numpy(w.reshape(N, K).astype(np.float32))


def _close(y, ref):
    assert y.shape == ref.shape and y.dtype == torch.float32
    if y.numel():
        assert (y - ref).abs().max() <= 8e-5 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("N,K", [(1, 32), (63, 64), (64, 576), (130, 1536)])
def test_a_q4_1_weight_is_recovered_and_packed_bit_for_bit(N, K):
    w = q4_1(N, K, seed=N)
    q, d, m = Q.recover(w)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and d.shape == m.shape == (N, K // 32)
    assert torch.equal(d.half().float(), d) and torch.equal(m.half().float(), m)     # float16 values, as stored
    assert torch.equal(Q.dequantize(q, d, m), w)
    p = Q.pack(w)
    Np = -(-N // 64) * 64
    assert p.shape == (N, K) and p.codes.shape == (Np // 64, K, 32) and p.dm.shape == (Np // 64, K // 32, 2, 64)
    assert p.nbytes == Np * K * 3 // 4                                        # 0.75 bytes a weight
    assert torch.equal(Q.unpack_ref(p), w)


def test_a_constant_group_and_a_zero_row_are_q4_1_groups():
    w = q4_1(4, 64)
    w[0, :32] = 0.5                                   # d = 0, every code 0
    w[1] = 0.0
    assert torch.equal(Q.unpack_ref(Q.pack(w)), w)


def test_weights_that_are_not_all_q4_1_values_are_refused():
    w = q4_1(8, 64)
    off = w.clone()
    off[5, 40] = torch.nextafter(off[5, 40], torch.tensor(float("inf")))    # one weight one ulp off
    assert Q.recover(off) is None and Q.pack(off) is None
    assert Q.recover(torch.randn(8, 64, generator=G)) is None                # a float checkpoint
    wide = w.clone()
    wide[2, :32] = torch.linspace(0, 1, 32)                                  # 32 distinct values: not 4 bits
    assert Q.recover(wide) is None
    bad_m = w.clone()
    bad_m[3, :32] += 1e-4                                                    # m no longer a float16 value
    assert Q.recover(bad_m) is None
    nan = w.clone()
    nan[0, 0] = float("nan")
    assert Q.recover(nan) is None
    for other in (w[:, :48], w.double(), w.bfloat16(), w[0], torch.empty(0, 32)):
        assert Q.recover(other) is None


@needs_op
@pytest.mark.parametrize("N,K", [(1, 32), (63, 64), (65, 576), (200, 1536)])
def test_expand_gives_f32_mm_s_blocks(N, K):
    w = q4_1(N, K, seed=K)
    assert torch.equal(Q.expand(Q.pack(w)), f32_mm.pack(w).w)


@needs_op
@pytest.mark.parametrize("M", [0, 1, 2, 3, 5, 6, 7, 13, 64, 130])
@pytest.mark.parametrize("N,K", [(1, 32), (63, 64), (65, 576), (200, 1536)])
def test_the_op_is_f32_mm_bit_for_bit_and_f_linear_within_rounding(M, N, K):
    w = q4_1(N, K, seed=M + N)
    x = torch.randn(M, K, generator=G)
    y = Q.q4f32_mm(x, Q.pack(w))
    assert torch.equal(y, f32_mm.f32_mm(x, f32_mm.pack(w)))
    _close(y, F.linear(x, w))
    _close(Q.q4f32_mm_ref(x, Q.pack(w)), F.linear(x, w))


@needs_op
def test_a_row_gets_the_same_bits_whatever_its_batch_mates_and_threads():
    w = q4_1(300, 576, seed=3)
    x = torch.randn(19, 576, generator=G)
    p = Q.pack(w)
    full = Q.q4f32_mm(x, p)
    for i in range(19):
        assert torch.equal(Q.q4f32_mm(x[i:i + 1], p)[0], full[i])
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):                # 5 blocks: ranges of half blocks split blocks, each thread expands its own
            torch.set_num_threads(t)
            assert torch.equal(Q.q4f32_mm(x, p), full)
            assert torch.equal(Q.expand(p), f32_mm.pack(w).w)
            for rows in (x[:1], x[3:5]):   # one and two rows (AVX2: dequantized in registers, no block buffer)
                assert torch.equal(Q.q4f32_mm(rows, p), full[:1] if len(rows) == 1 else full[3:5])
    finally:
        torch.set_num_threads(threads)


@needs_op
def test_bad_arguments_are_refused():
    p = Q.pack(q4_1(64, 64))
    with pytest.raises(RuntimeError, match="q4f32_mm"):
        Q.q4f32_mm(torch.randn(2, 32), p)                                   # K mismatch
    with pytest.raises(RuntimeError, match="q4f32_mm"):
        Q.q4f32_mm(torch.randn(2, 64).double(), p)                          # dtype
    with pytest.raises(RuntimeError, match="q4f32_mm"):
        torch.ops.pdcluster.q4f32_mm(torch.randn(2, 64), p.codes, p.dm, 65)      # n past the blocks
    with pytest.raises(RuntimeError, match="q4f32_mm"):
        torch.ops.pdcluster.q4f32_mm(torch.randn(2, 64), p.codes.transpose(1, 2).contiguous(), p.dm, 64)
    with pytest.raises(RuntimeError, match="q4f32_mm"):
        torch.ops.pdcluster.q4f32_mm(torch.randn(2, 64), p.codes, p.dm[:, :1].contiguous(), 64)
    with pytest.raises(RuntimeError, match="q4f32_mm"):
        torch.ops.pdcluster.q4f32_expand(p.codes.float(), p.dm)


@needs_op
def test_a_linear_holds_the_codes_of_a_q4_1_weight_and_the_float_blocks_otherwise():
    w, b = q4_1(96, 64), torch.randn(96, generator=G)
    x = torch.randn(5, 64, generator=G)
    lin = make_linear(w, b, "cpu", split=False, codes=True)
    assert isinstance(lin.packed, Q.Q4F32Weight) and lin.weight is None and lin.nbytes == 128 * 64 * 3 // 4
    plain = make_linear(w, b, "cpu", split=False)                          # codes off: float32 blocks
    assert isinstance(plain.packed, f32_mm.F32Weight)
    assert torch.equal(lin(x), plain(x))
    other = make_linear(torch.randn(96, 64, generator=G), b, "cpu", split=False, codes=True)
    assert isinstance(other.packed, f32_mm.F32Weight)
    long = torch.randn(Q.mkl_min_rows(), 64, generator=G)                  # MKL on the expanded weight
    assert torch.equal(lin(long), F.linear(long, w, b))
    buf = _scratch()[(2, 64, 64)]                                         # f32_mm's buffer for these blocks
    lin(long)
    assert _scratch()[(2, 64, 64)] is buf


@needs_op
def test_codes_run_the_op_on_prefill_chunks_that_float_blocks_give_to_mkl():
    w = q4_1(96, 64)
    lin, plain = (make_linear(w, None, "cpu", split=False, codes=c) for c in (True, False))
    chunk = torch.randn(f32_mm.MKL_MIN_ROWS + 5, 64, generator=G)       # past f32_mm's threshold, under the codes'

    def no_mkl(*_):
        raise AssertionError("MKL path taken")
    lin._unpack = plain._unpack = no_mkl
    y = lin(chunk)                                                        # the op, row for row its bits
    assert torch.equal(y, torch.cat([lin(chunk[i:i + 7]) for i in range(0, chunk.shape[0], 7)]))
    with pytest.raises(AssertionError, match="MKL path"):
        plain(chunk)                                                      # float32 blocks: MKL from 768 rows
    with pytest.raises(AssertionError, match="MKL path"):
        lin(torch.randn(Q.mkl_min_rows(), 64, generator=G))                 # codes: from 4,096 (AVX2: 1,024)


@needs_op
def test_the_engine_on_the_embedded_q4_1_gguf_holds_codes_and_gives_the_same_tokens():
    from pdcluster.engine.llm import LLM
    from pdcluster.engine.sampling_params import SamplingParams
    prompts = ["The capital of France is", "def fibonacci(n):"]
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs, sizes = [], []
    for codes in (True, False):
        llm = LLM(weight_codes=codes, speculative="off", greedy_head=False)
        lins = [lin for L in llm.engine.model.layers for lin in (L.qkv, L.o, L.gate_up, L.down)]
        kinds = {type(lin.packed) for lin in lins}
        assert kinds == ({Q.Q4F32Weight} if codes else {f32_mm.F32Weight})
        sizes.append(sum(lin.nbytes for lin in lins))
        outs.append([o.token_ids for o in llm.generate(prompts, sp)])
    assert outs[0] == outs[1]
    assert sizes[0] * 5 < sizes[1]                                          # 0.75 against 4 bytes a weight
