"""rms_norm (Triton), plain and with the fused residual add, against its torch reference."""
import pytest
import torch
from .kernel_testlib import assert_rel

from pdcluster.kernels import rms_norm, rms_norm_ref


@pytest.mark.parametrize("hidden", [576, 64])                # SmolLM2 width (not a power of 2)
def test_rms_norm_matches_reference(device, hidden):
    x = torch.randn(7, hidden + 8, device=device)[:, 4:4 + hidden]   # strided rows
    w = torch.randn(hidden, device=device)
    assert_rel(rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5))


@pytest.mark.parametrize("hidden", [576, 64])
def test_fused_add_rms_norm_matches_reference(device, hidden):
    x, r = torch.randn(7, hidden, device=device), torch.randn(7, hidden, device=device)
    w = torch.randn(hidden, device=device)
    out, new_res = rms_norm(x, w, 1e-6, residual=r)
    ref_out, ref_res = rms_norm_ref(x, w, 1e-6, residual=r)
    assert_rel(new_res, ref_res)
    assert_rel(out, ref_out)


def test_rms_norm_reference_is_the_formula():
    x, r, w = torch.randn(3, 40), torch.randn(3, 40), torch.randn(40)
    s = x.double() + r.double()
    want = s / torch.sqrt((s * s).mean(-1, keepdim=True) + 1e-5) * w.double()
    out, res = rms_norm_ref(x, w, 1e-5, residual=r)
    assert torch.allclose(res.double(), s, atol=1e-6) and torch.allclose(out.double(), want, atol=1e-5)


def test_rms_norm_rejects_bad_inputs():
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(torch.randn(2, 8), torch.randn(9), 1e-5)
    with pytest.raises(ValueError, match="residual must match"):
        rms_norm(torch.randn(2, 8), torch.randn(8), 1e-5, residual=torch.randn(3, 8))
