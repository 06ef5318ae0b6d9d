"""kernels/prefill_attention.cpp (pdcluster::paged_chunk_attention, built by engine/cpu_ext.py;
prefill_attention_avx2.cpp on AVX2 hosts) against its torch reference, paged_prefill_attention_ref: GQA groups, head
sizes, chunks over cached prefixes of every length around the tile edges, what it must not read, row independence,
bad arguments, and that the eager prefill takes it for a chunk over a cached prefix where it fits."""
import pytest
import torch

from pdcluster.engine import attention, cpu_ext
from pdcluster.engine.attention import PrefillSeq, prefill_attention
from pdcluster.kernels.prefill_attention import paged_prefill_attention_ref

pytestmark = pytest.mark.skipif(not cpu_ext.has("paged_chunk_attention"), reason="neither AVX-512 VNNI nor AVX2 (or no compiler)")
G = torch.Generator().manual_seed(7)
BS = 16


def op(q, kc, vc, table, ctx_len, scale):
    return torch.ops.pdcluster.paged_chunk_attention(q, kc, vc, table, ctx_len, scale)


def ref(q, kc, vc, table, ctx_len, scale):
    cu = torch.tensor([0, q.shape[0]], dtype=torch.int64)
    return paged_prefill_attention_ref(q, kc, vc, table[None], cu, torch.tensor([ctx_len]), scale)


def _case(Q, ctx_len, H=9, KVH=3, D=64, extra_blocks=8):
    W = -(-ctx_len // BS)
    NB = W + extra_blocks
    kc = torch.randn(NB, BS, KVH, D, generator=G)
    vc = torch.randn(NB, BS, KVH, D, generator=G)
    table = torch.randperm(NB, generator=G)[:W]                        # shuffled blocks
    return torch.randn(Q, H, D, generator=G), kc, vc, table


@pytest.mark.parametrize("H,KVH,D", [(9, 3, 64), (8, 8, 64), (16, 4, 128), (4, 1, 32), (6, 2, 96), (2, 1, 256),
                                     (10, 2, 64), (32, 2, 64), (7, 7, 48)])     # 16 heads a KV head; head_dim 48
def test_it_equals_the_reference(H, KVH, D):
    q, kc, vc, table = _case(13, 75, H, KVH, D)                         # 62 cached + 13 new: tiles of 4 rows, 1 short
    scale = D ** -0.5
    got = op(q, kc, vc, table, 75, scale)
    torch.testing.assert_close(got, ref(q, kc, vc, table, 75, scale), rtol=1e-5, atol=2e-6)
    assert not torch.equal(got[0], got[1])


@pytest.mark.parametrize("Q,ctx_len", [(1, 1), (1, 17), (4, 4), (5, 16), (16, 16), (3, 33), (24, 408), (7, 100),
                                       (40, 41), (130, 300)])
def test_every_chunk_and_prefix_length_around_the_edges(Q, ctx_len):
    """ctx_len == Q: no cached prefix (plain causal); tiles of 16 positions and of 4 rows cut anywhere."""
    q, kc, vc, table = _case(Q, ctx_len)
    torch.testing.assert_close(op(q, kc, vc, table, ctx_len, 0.125), ref(q, kc, vc, table, ctx_len, 0.125),
                               rtol=1e-5, atol=2e-6)


def test_softmax_is_stable_for_large_scores():
    q, kc, vc, table = _case(6, 50)
    q = q * 300                                                         # scores in the thousands
    got = op(q, kc, vc, table, 50, 0.125)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref(q, kc, vc, table, 50, 0.125), rtol=1e-4, atol=2e-5)


def test_it_reads_no_position_past_ctx_len_nor_table_entries_past_its_blocks():
    q, kc, vc, table = _case(5, 37)
    want = op(q, kc, vc, table, 37, 0.125)
    kc2, vc2 = kc.clone(), vc.clone()
    last = table[36 // BS]
    kc2[last, 37 % BS:] = float("nan")                                  # the rest of the last block
    vc2[last, 37 % BS:] = float("inf")
    longer = torch.cat([table, torch.tensor([10**9])])                  # an entry past the last block
    assert torch.equal(op(q, kc2, vc2, longer, 37, 0.125), want)


def test_a_row_does_not_depend_on_the_other_rows_or_the_thread_count():
    q, kc, vc, table = _case(11, 90)
    full = op(q, kc, vc, table, 90, 0.125)
    assert torch.equal(op(q[-1:], kc, vc, table, 90, 0.125)[0], full[-1])       # the last row alone
    assert torch.equal(op(q[:6], kc, vc, table, 85, 0.125), full[:6])            # the first rows' own chunk
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert torch.equal(op(q, kc, vc, table, 90, 0.125), full)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("bad,match", [
    (lambda a: dict(a, q=a["q"].double()), "q must be float32"),
    (lambda a: dict(a, kc=a["kc"][:, :, :2]), "caches must be contiguous"),
    (lambda a: dict(a, table=a["table"].int()), "block_table must be int64"),
    (lambda a: dict(a, ctx=a["ctx"] + 16 * 8), "the table holds"),
    (lambda a: dict(a, ctx=a["q"].shape[0] - 1), "rows over"),
    (lambda a: dict(a, table=torch.full_like(a["table"], 10**6)), "outside the cache"),
    (lambda a: dict(a, q=a["q"][:, :8]), "heads mismatch"),
    (lambda a: dict(a, q=a["q"][..., :20], kc=a["kc"][..., :20].contiguous(), vc=a["vc"][..., :20].contiguous()),
     "head_dim must be"),
])
def test_bad_arguments_raise_without_reading_out_of_bounds(bad, match):
    q, kc, vc, table = _case(4, 40, extra_blocks=0)
    a = bad({"q": q, "kc": kc, "vc": vc, "table": table, "ctx": 40})
    with pytest.raises(RuntimeError, match=match):
        op(a["q"], a["kc"], a["vc"], a["table"], a["ctx"], 0.125)


def test_the_eager_prefill_takes_it_where_it_fits(monkeypatch):
    """float32 over a float32 CPU cache: the op, for a chunk over a cached prefix and for a whole prompt alike;
    elsewhere (here: cpu_kernel_fits says no, as for bfloat16 or PDCLUSTER_CPU_OPS=0) the gather + SDPA. All give
    the reference's result."""
    q, kc, vc, table = _case(24, 408)
    k, v = torch.randn(24, 3, 64, generator=G), torch.randn(24, 3, 64, generator=G)
    slots = torch.stack([table[t // BS] * BS + t % BS for t in range(384, 408)])
    attention.store_kv(k, v, kc, vc, slots)                             # the chunk's own K/V, as the step stores it
    calls = []
    real = torch.ops.pdcluster.paged_chunk_attention
    monkeypatch.setattr(attention, "paged_chunk_attention_cpu", lambda *a: calls.append(1) or real(*a))
    want = ref(q, kc, vc, table, 408, 0.125)
    hit = PrefillSeq(0, 24, 408, table)
    torch.testing.assert_close(prefill_attention(q, k, v, kc, vc, hit, 0.125), want, rtol=1e-5, atol=2e-6)
    assert calls == [1]
    cold_table = torch.tensor([b for b in range(kc.shape[0]) if b not in set(table.tolist())][:2])   # other blocks
    slots = torch.stack([cold_table[t // BS] * BS + t % BS for t in range(24)])
    attention.store_kv(k, v, kc, vc, slots)
    cold = PrefillSeq(0, 24, 24, cold_table)
    torch.testing.assert_close(prefill_attention(q, k, v, kc, vc, cold, 0.125), ref(q, kc, vc, cold_table, 24, 0.125),
                               rtol=1e-5, atol=2e-6)
    assert calls == [1, 1]
    monkeypatch.setattr(attention, "cpu_kernel_fits", lambda *a: False)
    kc2, vc2 = kc.clone(), vc.clone()
    attention.store_kv(*[torch.randn(24, 3, 64, generator=G) for _ in range(2)], kc2, vc2, slots)
    want_cold = ref(q, kc2, vc2, cold_table, 24, 0.125)
    torch.testing.assert_close(prefill_attention(q, k, v, kc, vc, hit, 0.125), want, rtol=1e-5, atol=2e-6)
    assert calls == [1, 1]
    # SDPA on a whole prompt reads the chunk's own k, v, not the cache: the cache holding others shows which ran
    torch.testing.assert_close(prefill_attention(q, k, v, kc2, vc2, cold, 0.125),
                               ref(q, kc, vc, cold_table, 24, 0.125), rtol=1e-5, atol=2e-6)
    assert not torch.allclose(want_cold, ref(q, kc, vc, cold_table, 24, 0.125))
    assert calls == [1, 1]


def test_more_query_heads_per_kv_head_than_the_kernel_takes_keep_the_torch_path(monkeypatch):
    """64 query heads over 1 KV head (multi-query attention): past the op's 48 lanes, so SDPA, not an error."""
    q, kc, vc, table = _case(5, 40, H=64, KVH=1, D=32)
    k, v = torch.randn(5, 1, 32, generator=G), torch.randn(5, 1, 32, generator=G)
    attention.store_kv(k, v, kc, vc, torch.stack([table[t // BS] * BS + t % BS for t in range(35, 40)]))
    with pytest.raises(RuntimeError, match="at most 48"):
        op(q, kc, vc, table, 40, 0.125)
    calls = []
    monkeypatch.setattr(attention, "paged_chunk_attention_cpu", lambda *a: calls.append(1))
    got = prefill_attention(q, k, v, kc, vc, PrefillSeq(0, 5, 40, table), 0.125)
    assert calls == []
    torch.testing.assert_close(got, ref(q, kc, vc, table, 40, 0.125), rtol=1e-5, atol=2e-6)
