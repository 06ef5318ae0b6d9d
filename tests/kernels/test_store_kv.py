"""store_kv (Triton) against its torch reference: scattered slots, padding (-1), strided inputs."""
import pytest
import torch

from pdcluster.kernels import store_kv, store_kv_ref

D = 32


def _case(num_kv_heads, block_size, device, num_tokens=23, num_blocks=6):
    # a fused [T, (q + 2 * kv) heads, D] projection output: k and v are strided views into it
    fused = torch.randn(num_tokens, 4 + 2 * num_kv_heads, D, device=device)
    k, v = fused[:, 4:4 + num_kv_heads], fused[:, 4 + num_kv_heads:]
    n_slots = num_blocks * block_size                              # first and last slot always used
    slots = torch.cat([torch.randperm(n_slots - 2)[: num_tokens - 2] + 1, torch.tensor([0, n_slots - 1])])
    slots = slots[torch.randperm(num_tokens)]
    pad = (torch.arange(num_tokens) % 5 == 0) & (slots != 0) & (slots != n_slots - 1)
    slots = slots.masked_fill(pad, -1).to(device)                  # padding tokens
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, D), float("nan"), device=device)
    return k, v, k_cache, torch.full_like(k_cache, float("nan")), slots


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_kv_heads", [1, 3, 8])
def test_store_kv_matches_reference(device, num_kv_heads, block_size):
    k, v, kc, vc, slots = _case(num_kv_heads, block_size, device)
    if num_kv_heads == 3:
        slots = slots.int()                                        # int32 slots are accepted too
    kc_ref, vc_ref = kc.clone(), vc.clone()
    store_kv_ref(k, v, kc_ref, vc_ref, slots)
    store_kv(k, v, kc, vc, slots)
    # exact, and every slot not written (NaN in the poisoned cache) stays NaN in both
    assert torch.equal(kc.nan_to_num(7.0), kc_ref.nan_to_num(7.0))
    assert torch.equal(vc.nan_to_num(7.0), vc_ref.nan_to_num(7.0))
    assert int(torch.isfinite(kc).all(-1).all(-1).sum()) == int((slots >= 0).sum())


def test_store_kv_reference_is_the_definition():
    k, v, kc, vc, slots = _case(3, 16, "cpu")
    store_kv_ref(k, v, kc, vc, slots)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(kc[s // 16, s % 16], k[t]) and torch.equal(vc[s // 16, s % 16], v[t])


def test_store_kv_rejects_bad_inputs():
    k, v, kc, vc, slots = _case(2, 16, "cpu")
    with pytest.raises(ValueError, match="slot_mapping must be contiguous int64/int32"):
        store_kv(k, v, kc, vc, slots.float())
    with pytest.raises(ValueError, match="do not match cache rows"):
        store_kv(k[:, :1], v[:, :1], kc, vc, slots)
