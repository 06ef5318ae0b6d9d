"""paged_prefill_attention (Triton, ragged, causal over prefix + chunk) against its torch reference."""
import pytest
import torch
from .kernel_testlib import assert_rel, gather_seq, make_paged, naive_attention

from pdcluster.kernels import paged_decode_attention, paged_prefill_attention, paged_prefill_attention_ref

KVH, D = 2, 32
# (cached prefix, new tokens): fresh prompt, prefix + chunk crossing blocks, one new token after a
# prefix, an empty slot, a length-1 sequence; no total is a multiple of 16.
BATCH = [(0, 21), (17, 20), (33, 1), (0, 0), (0, 1)]


def _inputs(batch, group, block_size, device):
    lens_k = [c + n for c, n in batch]
    k_cache, v_cache, bt = make_paged(lens_k, block_size, KVH, D, device=device)
    cu = torch.tensor([0] + list(torch.tensor([n for _, n in batch]).cumsum(0)), dtype=torch.int32, device=device)
    q = torch.randn(int(cu[-1]), KVH * group, D, device=device)
    return q, k_cache, v_cache, bt, cu, torch.tensor(lens_k, dtype=torch.int32, device=device)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", [1, 3, 8])
def test_prefill_kernel_matches_reference(device, group, block_size):
    q, kc, vc, bt, cu, lens_k = _inputs(BATCH, group, block_size, device)
    ref = paged_prefill_attention_ref(q, kc, vc, bt, cu, lens_k, 0.2)
    out = paged_prefill_attention(q, kc, vc, bt, cu, lens_k, 0.2, block_m=16, block_n=16)
    assert_rel(out, ref, what=f"group={group} bs={block_size}")


def test_prefill_tiles_larger_than_blocks(device):
    # 32-wide KV tiles over 16-token blocks, 32-row query tiles, max_seqlen_q given (no sync).
    q, kc, vc, bt, cu, lens_k = _inputs([(5, 40), (50, 3)], 3, 16, device)
    ref = paged_prefill_attention_ref(q, kc, vc, bt, cu, lens_k, 0.2)
    out = paged_prefill_attention(q, kc, vc, bt, cu, lens_k, 0.2, max_seqlen_q=40, block_m=32, block_n=32)
    assert_rel(out, ref)


def test_prefill_of_one_token_equals_decode(device):
    batch = [(30, 1), (0, 1), (47, 1)]
    q, kc, vc, bt, cu, lens_k = _inputs(batch, 3, 16, device)
    dec = paged_decode_attention(q, kc, vc, bt, lens_k, 0.2, num_splits=2, block_n=16)
    assert_rel(paged_prefill_attention(q, kc, vc, bt, cu, lens_k, 0.2, block_m=16, block_n=16), dec)


def test_prefill_reference_matches_naive():
    q, kc, vc, bt, cu, lens_k = _inputs(BATCH, 3, 16, "cpu")
    ref = paged_prefill_attention_ref(q, kc, vc, bt, cu, lens_k, 0.2)
    for s, (ctx, n) in enumerate(BATCH):
        a = int(cu[s])
        k, v = gather_seq(kc, bt, s, ctx + n), gather_seq(vc, bt, s, ctx + n)
        want = naive_attention(q[a:a + n], k, v, list(range(ctx, ctx + n)), 0.2)
        assert_rel(ref[a:a + n], want.float(), tol=1e-5, what=f"seq {s}")


def test_prefill_launcher_rejects_bad_inputs():
    q, kc, vc, bt, cu, lens_k = _inputs([(3, 4), (0, 2)], 1, 16, "cpu")
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        paged_prefill_attention(q, kc, vc, bt, cu[:-1], lens_k, 1.0)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        paged_prefill_attention(q, kc, vc, bt, cu.float(), lens_k, 1.0)
    with pytest.raises(ValueError, match="k_cache/v_cache"):
        paged_prefill_attention(q, kc, vc[:, :8], bt, cu, lens_k, 1.0)
    with pytest.raises(ValueError, match="seq_lens_k"):
        paged_prefill_attention_ref(q, kc, vc, bt, cu, torch.tensor([2, 2], dtype=torch.int32), 1.0)


def test_prefill_int64_index_tensors(device):
    q, kc, vc, bt, cu, lens_k = _inputs([(9, 12), (0, 0), (20, 1)], 3, 16, device)
    ref = paged_prefill_attention_ref(q, kc, vc, bt, cu, lens_k, 0.2)
    out = paged_prefill_attention(q, kc, vc, bt.long(), cu.long(), lens_k.long(), 0.2, block_m=16, block_n=16)
    assert_rel(out, ref)
