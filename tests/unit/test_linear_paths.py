"""engine/llama.py Linear: every row-count path gives F.linear's result, in each dtype a worker runs."""
import pytest
import torch
import torch.nn.functional as F

from pdcluster.engine.llama import Linear, use_mkldnn


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("rows", [1, 4, 17, 80])     # split bmm, oneDNN prepacked, plain F.linear
def test_linear_paths_match_f_linear(dtype, tol, rows):
    """bfloat16 on a CPU without oneDNN's bf16 instructions (this AVX2 host) crashed in mkldnn_linear;
    use_mkldnn keeps such hosts on F.linear, so every dtype the CLI offers runs here."""
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 64, generator=g).to(dtype)
    b = torch.randn(96, generator=g).to(dtype)
    x = torch.randn(rows, 64, generator=g).to(dtype)
    lin = Linear(w, b, prepack=use_mkldnn("cpu", dtype))
    ref = F.linear(x.float(), w.float(), b.float())
    assert (lin(x).float() - ref).abs().max() <= tol * ref.abs().max()
