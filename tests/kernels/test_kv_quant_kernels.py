"""Quantized paged KV (int8 / fp8 codes, a float32 scale per (block, kv head)): store_kv's scale
update and requantization, and the decode/prefill attention kernels dequantizing on the fly, each
against its torch reference; the references against the float cache they approximate."""
import math

import pytest
import torch
from .kernel_testlib import assert_rel, make_paged

from pdcluster.kernels import (paged_decode_attention, paged_decode_attention_ref, paged_prefill_attention,
                               paged_prefill_attention_ref, store_kv, store_kv_ref)
from pdcluster.kv_transfer import codec as kvcodec

KVH, D, BS = 2, 32, 16
CODE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


def _empty(num_blocks, codec, device):
    """Quantized caches full of stale codes and scales (a previous owner's), and their scales."""
    kc = torch.randint(-100, 100, (num_blocks, BS, KVH, D), device=device).to(CODE[codec])
    vc = torch.randint(-100, 100, (num_blocks, BS, KVH, D), device=device).to(CODE[codec])
    return kc, vc, torch.rand(num_blocks, KVH, device=device) * 9, torch.rand(num_blocks, KVH, device=device) * 9


def _fill(store, codec, device, pieces, blocks=(3, 0, 5)):
    """One sequence of sum(pieces) tokens in `blocks`, written piece by piece (a prefill chunk,
    then decode steps); later tokens grow (so scales rise and earlier rows are requantized).
    Returns the caches, scales, the float K/V written and the slots."""
    kc, vc, ks, vs = _empty(6, codec, device)
    n = sum(pieces)
    grow = torch.linspace(0.5, 3.0, n, device=device)[:, None, None]
    k, v = torch.randn(n, KVH, D, device=device) * grow, torch.randn(n, KVH, D, device=device) * grow
    slots = torch.tensor([blocks[t // BS] * BS + t % BS for t in range(n)], device=device)
    t0 = 0
    for p in pieces:
        store(k[t0:t0 + p], v[t0:t0 + p], kc, vc, slots[t0:t0 + p], k_scale=ks, v_scale=vs)
        t0 += p
    return kc, vc, ks, vs, k, v, slots


@pytest.mark.parametrize("codec", ["int8", "fp8"])
def test_quantized_store_matches_reference(device, codec):
    """Kernel and reference from the same stale state: identical codes and scales."""
    pieces = [21, 1, 1, 9, 1, 3]                     # prefill chunk, decodes, a second chunk
    n = sum(pieces)
    grow = torch.linspace(0.5, 3.0, n, device=device)[:, None, None]
    k, v = torch.randn(n, KVH, D, device=device) * grow, torch.randn(n, KVH, D, device=device) * grow
    blocks = (3, 0, 5)
    slots = torch.tensor([blocks[t // BS] * BS + t % BS for t in range(n)], device=device)
    stale = _empty(6, codec, device)
    outs = []
    for store in (store_kv, store_kv_ref):
        c = [t.clone() for t in stale]
        t0 = 0
        for p in pieces:
            store(k[t0:t0 + p], v[t0:t0 + p], c[0], c[1], slots[t0:t0 + p], k_scale=c[2], v_scale=c[3])
            t0 += p
        outs.append(c)
    for a, b in zip(*outs):
        assert torch.equal(a.float(), b.float())
    assert not torch.equal(outs[1][2], stale[2])     # the scales did change


@pytest.mark.parametrize("codec", ["int8", "fp8"])
def test_quantized_store_reference_approximates_the_rows(codec):
    pieces = [21, 1, 1, 9, 1, 3]
    kc, vc, ks, vs, k, v, slots = _fill(store_kv_ref, codec, "cpu", pieces)
    n = k.shape[0]
    ends = torch.tensor(pieces).cumsum(0)
    piece_blocks = [set((slots[e - p:e] // BS).tolist()) for p, e in zip(pieces, ends.tolist())]
    piece_of = torch.repeat_interleave(torch.arange(len(pieces)), torch.tensor(pieces))
    rounds = torch.tensor([1 + sum(int(slots[t]) // BS in bl for bl in piece_blocks[int(piece_of[t]) + 1:])
                           for t in range(n)], dtype=torch.float32)      # [T]: roundings each row went through
    for cache, scales, x in ((kc, ks, k), (vc, vs, v)):
        blk, row = slots // BS, slots % BS
        deq = cache[blk, row].float() * scales[blk][:, :, None]
        # scale = amax over the block's rows / QMAX: covers every row, and is reached by one
        for b in slots.div(BS, rounding_mode="floor").unique():
            rows = x[blk == b]
            assert torch.allclose(scales[b], rows.abs().amax(dim=(0, 2)) / kvcodec.QMAX[codec])
        err = (deq - x).abs().amax(-1)                                    # [T, H]
        if codec == "int8":
            bound = scales[blk] * 2.0
        else:
            # each rounding to e4m3 (3 mantissa bits) is off by <= 1/16 of the value (normals) or half the
            # subnormal step, 2^-10 of the scale; a row is rounded once when stored and once more each time a
            # later piece raises its block's scale (requantization), so the errors add up per rounding
            bound = rounds[:, None] * (x.abs().amax(-1) / 16 * 1.07 + scales[blk] * 2.0 ** -10)
        assert bool((err <= bound + 1e-6).all()), f"{codec}: max err {float(err.max())}"
    assert n == 36


def test_full_block_store_is_the_wire_codec():
    """A block written whole holds what kv_transfer/codec.py encodes for it (codes within one step)."""
    kc, vc, ks, vs = _empty(2, "int8", "cpu")
    k, v = torch.randn(BS, KVH, D), torch.randn(BS, KVH, D)
    store_kv_ref(k, v, kc, vc, torch.arange(BS, 2 * BS), k_scale=ks, v_scale=vs)
    q, s = kvcodec.encode("int8", k[None])
    assert torch.allclose(ks[1], s[0]) and (kc[1].int() - q[0].int()).abs().max() <= 1


def test_quantized_store_rejects_bad_scales():
    kc, vc, ks, vs = _empty(2, "int8", "cpu")
    k = torch.randn(3, KVH, D)
    with pytest.raises(ValueError, match="k_scale/v_scale must be contiguous float32"):
        store_kv_ref(k, k, kc, vc, torch.arange(3), k_scale=ks[:1], v_scale=vs)
    with pytest.raises(ValueError, match="no padding slots"):
        store_kv_ref(k, k, kc, vc, torch.tensor([0, -1, 2]), k_scale=ks, v_scale=vs)


def _quantized_paged(lens, codec, device):
    """Paged float caches and their per-(block, head) quantization (codec.encode, the wire format)."""
    kf, vf, bt = make_paged(lens, BS, KVH, D, device=device)
    # unowned rows are NaN in the float caches: zero them for the encoder (codes stay finite anyway)
    (kq, ks), (vq, vs) = (kvcodec.encode(codec, c.nan_to_num(0.0).cpu()) for c in (kf, vf))
    deq = [kvcodec.decode(kq, ks, torch.float32).to(device), kvcodec.decode(vq, vs, torch.float32).to(device)]
    return [t.to(device) for t in (kq, vq, ks, vs)], deq, (kf, vf), bt


@pytest.mark.parametrize("codec", ["int8", "fp8"])
@pytest.mark.parametrize("group", [1, 3])
def test_quantized_decode_attention(device, codec, group):
    lens = [37, 1, 0, 64]
    (kq, vq, ks, vs), (kd, vd), (kf, vf), bt = _quantized_paged(lens, codec, device)
    q = torch.randn(len(lens), KVH * group, D, device=device)
    seq = torch.tensor(lens, dtype=torch.int32, device=device)
    scale = 1 / math.sqrt(D)
    ref = paged_decode_attention_ref(q, kq, vq, bt, seq, scale, k_scale=ks, v_scale=vs)
    # the reference is the float attention over the dequantized cache ...
    assert_rel(ref, paged_decode_attention_ref(q, kd, vd, bt, seq, scale), what="ref vs dequantized")
    for splits in (1, 3):
        out = paged_decode_attention(q, kq, vq, bt, seq, scale, splits, k_scale=ks, v_scale=vs, block_n=16)
        assert_rel(out, ref, what=f"{codec} group={group} splits={splits}")
    # ... and close to, but not the same as, the float cache's (the check can tell them apart)
    exact = paged_decode_attention_ref(q, kf, vf, bt, seq, scale)
    err = float((ref - exact).abs().max())
    assert 0 < err < (0.05 if codec == "int8" else 0.2)


@pytest.mark.parametrize("codec", ["int8", "fp8"])
def test_quantized_prefill_attention(device, codec):
    lens = [40, 19]                                   # KV incl. the new tokens; cached prefixes 30 and 0
    new = [10, 19]
    (kq, vq, ks, vs), (kd, vd), _, bt = _quantized_paged(lens, codec, device)
    q = torch.randn(sum(new), KVH * 2, D, device=device)
    cu = torch.tensor([0, new[0], sum(new)], dtype=torch.int32, device=device)
    seq = torch.tensor(lens, dtype=torch.int32, device=device)
    ref = paged_prefill_attention_ref(q, kq, vq, bt, cu, seq, 0.2, k_scale=ks, v_scale=vs)
    assert_rel(ref, paged_prefill_attention_ref(q, kd, vd, bt, cu, seq, 0.2), what="ref vs dequantized")
    out = paged_prefill_attention(q, kq, vq, bt, cu, seq, 0.2, k_scale=ks, v_scale=vs, block_m=16, block_n=16)
    assert_rel(out, ref, what=codec)


@pytest.mark.parametrize("codec", ["int8", "fp8"])
def test_pair_store_is_two_reference_stores(codec):
    """The CPU engine's one-pass K+V store (caches as views of one tensor) == store_kv_ref twice."""
    from pdcluster.kernels.store_kv import store_kv_pair_ref
    pieces = [21, 1, 1, 9, 1, 3]
    n = sum(pieces)
    grow = torch.linspace(0.5, 3.0, n)[:, None, None]
    k, v = torch.randn(n, KVH, D) * grow, torch.randn(n, KVH, D) * grow
    slots = torch.tensor([(3, 0, 5)[t // BS] * BS + t % BS for t in range(n)])
    kc, vc, ks, vs = _empty(6, codec, "cpu")
    pair_c, pair_s = torch.stack((kc, vc)), torch.stack((ks, vs))
    t0 = 0
    for p in pieces:
        sl = slots[t0:t0 + p].clone()
        store_kv_ref(k[t0:t0 + p], v[t0:t0 + p], kc, vc, sl, k_scale=ks, v_scale=vs)
        store_kv_pair_ref(torch.stack((k[t0:t0 + p], v[t0:t0 + p])), pair_c, pair_s, sl)
        t0 += p
    assert torch.equal(pair_c[0].float(), kc.float()) and torch.equal(pair_c[1].float(), vc.float())
    assert torch.equal(pair_s, torch.stack((ks, vs)))
