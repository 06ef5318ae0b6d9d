"""engine/llama.py Linear: every row-count path gives F.linear's result, in each dtype a worker runs."""
import pytest
import torch
import torch.nn.functional as F

from pdcluster.engine.llama import Linear, use_split


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("rows", [1, 4, 17, 80])     # split bmm (bfloat16, <= 4 rows), plain F.linear
def test_linear_paths_match_f_linear(dtype, tol, rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 64, generator=g).to(dtype)
    b = torch.randn(96, generator=g).to(dtype)
    x = torch.randn(rows, 64, generator=g).to(dtype)
    lin = Linear(w, b, split=use_split("cpu", dtype))
    assert (lin._split is not None) == (dtype == torch.bfloat16)         # a view of the weight, no copy
    assert lin.nbytes == w.numel() * w.element_size()
    ref = F.linear(x.float(), w.float(), b.float())
    assert (lin(x).float() - ref).abs().max() <= tol * ref.abs().max()
