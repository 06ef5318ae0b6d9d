"""rotary_embedding (Triton, in place, NeoX/HF rotate_half) against its torch reference and HF's formula."""
import pytest
import torch
from .kernel_testlib import assert_rel

from pdcluster.kernels import rotary_embedding, rotary_embedding_ref


def _cos_sin_cache(max_pos, rot_dim, base=10000.0):
    inv_freq = 1.0 / base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)       # [max_pos, rot_dim]


def _qk(n, heads, kv_heads, head_dim, flat, device):
    # q and k are strided views into one fused projection output, as the model produces them
    fused = torch.randn(n, (heads + 2 * kv_heads) * head_dim, device=device)
    q, k = fused[:, : heads * head_dim], fused[:, heads * head_dim:(heads + kv_heads) * head_dim]
    if not flat:
        q, k = q.view(n, heads, head_dim), k.view(n, kv_heads, head_dim)
    return fused, q, k


@pytest.mark.parametrize("flat", [True, False])
@pytest.mark.parametrize("heads,kv_heads,head_dim,rot_dim", [(9, 3, 64, 64), (8, 1, 32, 32), (4, 2, 32, 16)])
def test_rotary_matches_reference(device, flat, heads, kv_heads, head_dim, rot_dim):
    cache = _cos_sin_cache(100, rot_dim).to(device)
    positions = torch.randint(0, 100, (11,), device=device)
    fused, q, k = _qk(11, heads, kv_heads, head_dim, flat, device)
    fused_ref = fused.clone()
    q_ref = fused_ref[:, : heads * head_dim].view(q.shape)
    k_ref = fused_ref[:, heads * head_dim:(heads + kv_heads) * head_dim].view(k.shape)
    rotary_embedding_ref(positions, q_ref, k_ref, cache, head_dim)
    rotary_embedding(positions, q, k, cache, head_dim)
    assert_rel(fused, fused_ref)                               # also: the v part is untouched
    assert torch.equal(fused[:, (heads + kv_heads) * head_dim:], fused_ref[:, (heads + kv_heads) * head_dim:])


def test_rotary_reference_matches_hf_rotate_half():
    head_dim, n = 64, 5
    cache = _cos_sin_cache(50, head_dim)
    positions = torch.tensor([0, 3, 49, 7, 7])
    _, q, k = _qk(n, 9, 3, head_dim, False, "cpu")
    q0, k0 = q.clone(), k.clone()
    rotary_embedding_ref(positions, q, k, cache, head_dim)
    # HF Llama: emb = cat(freqs, freqs); x * cos + rotate_half(x) * sin
    cos = torch.cat([cache[positions, :32]] * 2, -1)[:, None]
    sin = torch.cat([cache[positions, 32:]] * 2, -1)[:, None]

    def rotate_half(x):
        return torch.cat((-x[..., 32:], x[..., :32]), dim=-1)

    assert torch.allclose(q, q0 * cos + rotate_half(q0) * sin, atol=1e-6)
    assert torch.allclose(k, k0 * cos + rotate_half(k0) * sin, atol=1e-6)


def test_rotary_rejects_bad_inputs():
    cache = _cos_sin_cache(10, 32)
    _, q, k = _qk(3, 2, 1, 32, True, "cpu")
    with pytest.raises(ValueError, match="not a multiple of head_dim"):
        rotary_embedding(torch.arange(3), q[:, :40], k, cache, 32)
    with pytest.raises(ValueError, match="positions"):
        rotary_embedding(torch.arange(4), q, k, cache, 32)
