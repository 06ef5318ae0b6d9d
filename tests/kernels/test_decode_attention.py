"""paged_decode_attention (Triton, split-KV, GQA) against its torch reference and a naive loop."""
import math

import pytest
import torch
from .kernel_testlib import assert_rel, gather_seq, make_paged, naive_attention

from pdcluster.kernels import paged_decode_attention, paged_decode_attention_ref

KVH, D = 2, 32
# ragged, none a multiple of 16 or 32 except 64; 1 = a one-token sequence; 0 = an empty slot
LENS = [37, 1, 0, 64, 83]


def _inputs(lens, group, block_size, device, head_dim=D):
    k_cache, v_cache, bt = make_paged(lens, block_size, KVH, head_dim, device=device)
    q = torch.randn(len(lens), KVH * group, head_dim, device=device)
    return q, k_cache, v_cache, bt, torch.tensor(lens, dtype=torch.int32, device=device)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("num_splits", [1, 3])              # 3 divides none of the lengths
def test_decode_kernel_matches_reference(device, group, block_size, num_splits):
    q, kc, vc, bt, lens = _inputs(LENS, group, block_size, device)
    scale = 1 / math.sqrt(D)
    ref = paged_decode_attention_ref(q, kc, vc, bt, lens, scale)
    out = paged_decode_attention(q, kc, vc, bt, lens, scale, num_splits=num_splits, block_n=16)
    assert_rel(out, ref, what=f"group={group} bs={block_size} splits={num_splits}")
    assert torch.equal(out[2], torch.zeros_like(out[2])), "empty slot must be exact zeros"


def test_decode_more_splits_than_tiles_and_default_splits(device):
    # 7 splits over at most 3 tiles of 32: most splits are empty and must not disturb the merge.
    q, kc, vc, bt, lens = _inputs([70, 5, 0], 3, 16, device)
    ref = paged_decode_attention_ref(q, kc, vc, bt, lens, 0.3)
    assert_rel(paged_decode_attention(q, kc, vc, bt, lens, 0.3, num_splits=7, block_n=32), ref, what="7 splits")
    assert_rel(paged_decode_attention(q, kc, vc, bt, lens, 0.3), ref, what="default splits/tile")


def test_decode_odd_head_dim_and_strided_q(device):
    # head_dim 24 (padded to 32 in the kernel); q a strided view into a wider fused tensor.
    lens = [19, 40]
    k_cache, v_cache, bt = make_paged(lens, 16, KVH, 24, device=device)
    wide = torch.randn(2, KVH * 3 + 5, 24, device=device)
    q = wide[:, 2:2 + KVH * 3]
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, bt, seq_lens, 0.2)
    assert_rel(paged_decode_attention(q, k_cache, v_cache, bt, seq_lens, 0.2, num_splits=2, block_n=16), ref)


def test_decode_reference_matches_naive():
    lens = [37, 1, 0, 50]
    q, kc, vc, bt, seq_lens = _inputs(lens, 3, 16, "cpu")
    ref = paged_decode_attention_ref(q, kc, vc, bt, seq_lens, 0.25)
    for s, n in enumerate(lens):
        if n == 0:
            assert torch.equal(ref[s], torch.zeros_like(ref[s]))
            continue
        k, v = gather_seq(kc, bt, s, n), gather_seq(vc, bt, s, n)
        want = naive_attention(q[s:s + 1], k, v, [n - 1], 0.25)[0]
        assert_rel(ref[s], want.float(), tol=1e-5, what=f"seq {s}")


def test_decode_launcher_rejects_bad_inputs():
    q, kc, vc, bt, lens = _inputs([5, 9], 2, 16, "cpu")
    with pytest.raises(ValueError, match="block_tables must be int32/int64"):
        paged_decode_attention(q, kc, vc, bt.float(), lens, 1.0)
    with pytest.raises(ValueError, match="num_kv_heads"):
        paged_decode_attention(q[:, :3], kc, vc, bt, lens, 1.0)
    with pytest.raises(ValueError, match="unit-stride"):
        paged_decode_attention(q.transpose(1, 2).contiguous().transpose(1, 2), kc, vc, bt, lens, 1.0)
    with pytest.raises(ValueError, match="seq_lens"):
        paged_decode_attention(q, kc, vc, bt, lens[:1], 1.0)
    with pytest.raises(ValueError, match="dtype"):
        paged_decode_attention(q.double(), kc, vc, bt, lens, 1.0)


def test_decode_int64_index_tensors(device):
    q, kc, vc, bt, lens = _inputs([29, 0, 3], 3, 16, device)
    ref = paged_decode_attention_ref(q, kc, vc, bt, lens, 0.2)
    assert_rel(paged_decode_attention(q, kc, vc, bt.long(), lens.long(), 0.2, num_splits=2, block_n=16), ref)
