"""kernels/decode_attention.cpp (pdcluster::paged_decode_attention, built by engine/cpu_ext.py;
decode_attention_avx2.cpp on AVX2 hosts) against its torch reference, paged_decode_attention_ref: GQA groups, head
sizes, ragged lengths over shuffled blocks, what it must not read, bad arguments, and that the eager decode step
takes it exactly where it fits."""
import pytest
import torch

from pdcluster.engine import cpu_ext
from pdcluster.engine.attention import decode_attention
from pdcluster.kernels.decode_attention import cpu_kernel_fits, paged_decode_attention_ref

pytestmark = pytest.mark.skipif(not cpu_ext.has("paged_decode_attention"), reason="neither AVX-512 VNNI nor AVX2 (or no compiler)")
G = torch.Generator().manual_seed(5)


def op(q, kc, vc, tables, lens, scale):
    return torch.ops.pdcluster.paged_decode_attention(q, kc, vc, tables, lens, scale)


def _case(B, H, KVH, D, lens, NB=None, BS=16, W=None):
    W = W or max(1, -(-max(lens) // BS))
    NB = NB or B * W + 8
    kc = torch.randn(NB, BS, KVH, D, generator=G)
    vc = torch.randn(NB, BS, KVH, D, generator=G)
    tables = torch.randperm(NB, generator=G)[:B * W].view(B, W)       # shuffled, disjoint blocks
    q = torch.randn(B, H, D, generator=G)
    return q, kc, vc, tables, torch.tensor(lens, dtype=torch.int64)


@pytest.mark.parametrize("H,KVH,D", [(9, 3, 64), (8, 8, 64), (16, 4, 128), (4, 1, 32), (6, 2, 96), (2, 1, 256),
                                     (10, 2, 64)])      # 5 heads per KV head: one query head at a time
def test_it_equals_the_reference(H, KVH, D):
    lens = [1, 15, 16, 17, 100, 160, 33]               # block edges, a partial last block, one position
    q, kc, vc, tables, L = _case(len(lens), H, KVH, D, lens, W=10)
    scale = D ** -0.5
    got = op(q, kc, vc, tables, L, scale)
    want = paged_decode_attention_ref(q, kc, vc, tables, L, scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    assert not torch.equal(got[0], got[1])             # (rows differ: the comparison above means something)


def test_softmax_is_stable_for_large_scores_and_an_empty_row_is_zeros():
    q, kc, vc, tables, L = _case(3, 9, 3, 64, [40, 0, 7])
    q = q * 300                                        # scores in the thousands: exp must not overflow
    got = op(q, kc, vc, tables, L, 0.125)
    want = paged_decode_attention_ref(q, kc, vc, tables, L, 0.125)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    assert torch.equal(got[1], torch.zeros_like(got[1]))


def test_it_reads_no_position_past_a_rows_length_nor_table_entries_past_its_blocks():
    q, kc, vc, tables, L = _case(2, 9, 3, 64, [20, 5], W=4)
    want = op(q, kc, vc, tables, L, 0.125)
    kc2, vc2 = kc.clone(), vc.clone()
    for b, n in enumerate(L.tolist()):                 # poison the rest of each row's last block
        blk = tables[b, (n - 1) // 16]
        kc2[blk, n % 16 or 16:] = float("nan")
        vc2[blk, n % 16 or 16:] = float("inf")
    t2 = tables.clone()
    t2[0, 2:] = -7                                     # entries past the blocks a row uses: never read
    t2[1, 1:] = 10 ** 9
    assert torch.equal(op(q, kc2, vc2, t2, L, 0.125), want)


def test_a_row_does_not_depend_on_its_batch_mates_or_the_thread_count():
    q, kc, vc, tables, L = _case(5, 9, 3, 64, [30, 200, 1, 64, 129], W=13)
    together = op(q, kc, vc, tables, L, 0.125)
    alone = torch.cat([op(q[i:i + 1], kc, vc, tables[i:i + 1], L[i:i + 1], 0.125) for i in range(5)])
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = op(q, kc, vc, tables, L, 0.125)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(together, alone) and torch.equal(together, serial)


@pytest.mark.parametrize("bad,match", [
    (lambda a: {**a, "lens": torch.tensor([33])}, "attends to 33 positions"),          # past the table (2 x 16)
    (lambda a: {**a, "lens": torch.tensor([-1])}, "attends to -1"),
    (lambda a: {**a, "tables": torch.tensor([[0, 40]])}, "outside the cache"),
    (lambda a: {**a, "tables": torch.tensor([[-1, 0]])}, "outside the cache"),
    (lambda a: {**a, "q": a["q"].double()}, "float32"),
    (lambda a: {**a, "kc": a["kc"].bfloat16(), "vc": a["vc"].bfloat16()}, "float32"),
    (lambda a: {**a, "tables": a["tables"].int()}, "int64"),
    (lambda a: {**a, "q": a["q"][:, :8]}, "heads"),                                  # 8 query heads over 3 KV heads
    (lambda a: {**a, "q": torch.zeros(1, 3, 48), "kc": torch.zeros(40, 16, 3, 48), "vc": torch.zeros(40, 16, 3, 48)},
     "head_dim"),
    (lambda a: {**a, "kc": a["kc"].transpose(0, 1)}, "contiguous"),
])
def test_bad_arguments_raise_without_reading_out_of_bounds(bad, match):
    q, kc, vc, tables, L = _case(1, 9, 3, 64, [20], NB=40, W=2)
    a = bad({"q": q, "kc": kc, "vc": vc, "tables": tables, "lens": L})
    with pytest.raises(RuntimeError, match=match):
        op(a["q"], a["kc"], a["vc"], a["tables"], a["lens"], 0.125)


def test_the_eager_decode_step_takes_it_where_it_fits(monkeypatch):
    """float32 rows over a float32 CPU cache run the op (the compiled layer asks the same question); bfloat16 and
    unsupported head sizes keep the gather + SDPA path. Both give the reference's result."""
    q, kc, vc, tables, L = _case(2, 9, 3, 64, [20, 9], W=2)
    mask = (torch.arange(32)[None] < L[:, None]).view(2, 1, 1, 32)
    assert cpu_kernel_fits(torch.float32, kc)
    assert not cpu_kernel_fits(torch.bfloat16, kc) and not cpu_kernel_fits(torch.float32, kc.bfloat16())
    assert not cpu_kernel_fits(torch.float32, torch.zeros(4, 16, 3, 48))
    assert not cpu_kernel_fits(torch.float32, kc.transpose(0, 1))             # a view the op would refuse
    calls = []
    real = torch.ops.pdcluster.paged_decode_attention
    monkeypatch.setattr("pdcluster.engine.attention.paged_decode_attention_cpu",
                        lambda *a: calls.append(1) or real(*a))
    want = paged_decode_attention_ref(q, kc, vc, tables, L, 0.125)
    torch.testing.assert_close(decode_attention(q, kc, vc, tables, mask, 0.125, L), want, rtol=1e-5, atol=2e-6)
    assert calls == [1]
    torch.testing.assert_close(decode_attention(q, kc, vc, tables, mask, 0.125), want, rtol=1e-5, atol=2e-6)
    assert calls == [1]                                # no seq_lens: the gather path
    qb, kb, vb = q.bfloat16(), kc.bfloat16(), vc.bfloat16()
    out = decode_attention(qb, kb, vb, tables, mask, 0.125, L)
    assert calls == [1] and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, rtol=0.05, atol=0.05)
