"""Backend selection, and that `import pdcluster.kernels` needs neither a GPU nor TRITON_INTERPRET."""
import os
import subprocess
import sys
import tempfile

import pytest

import pdcluster.kernels as kernels
from pdcluster.kernels import get_ops



def test_torch_backend_is_the_references():
    ops = get_ops("torch", "cuda")
    assert ops.backend == "torch"
    assert ops.decode_attention is kernels.paged_decode_attention_ref
    assert ops.prefill_attention is kernels.paged_prefill_attention_ref
    assert ops.store_kv is kernels.store_kv_ref and ops.rms_norm is kernels.rms_norm_ref
    assert ops.rotary_embedding is kernels.rotary_embedding_ref


def test_auto_picks_torch_on_cpu_and_triton_is_explicit():
    assert get_ops("auto", "cpu").backend == "torch"
    with pytest.raises(ValueError, match="attention backend must be one of"):
        get_ops("flash", "cpu")


def test_triton_backend_under_the_interpreter(device):
    """On a CPU device the Triton backend is the kernels run by the interpreter; on CUDA, compiled."""
    ops = get_ops("triton", device)
    assert ops.backend == "triton" and ops.decode_attention is kernels.paged_decode_attention


def test_import_without_interpreter_falls_back_cleanly():
    """A CPU-only box without TRITON_INTERPRET: import works, references run, Triton is refused."""
    code = (
        "import torch; import pdcluster.kernels as kernels\n"
        "assert kernels.get_ops('auto', 'cpu').backend == 'torch'\n"
        "x = torch.randn(2, 8)\n"
        "kernels.rms_norm_ref(x, torch.ones(8), 1e-5)\n"
        "for call in (lambda: kernels.get_ops('triton', 'cpu'), lambda: kernels.rms_norm(x, torch.ones(8), 1e-5)):\n"
        "    try:\n"
        "        call()\n"
        "    except ValueError as e:\n"
        "        assert 'TRITON_INTERPRET=1' in str(e), e\n"
        "    else:\n"
        "        raise AssertionError('triton on cpu was not refused')\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    r = subprocess.run([sys.executable, "-c", code], cwd=tempfile.gettempdir(), env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_import_without_triton_at_all():
    """Triton missing or broken: the references still import and run; get_ops('auto') is torch."""
    code = (
        "import sys; sys.modules['triton'] = None  # any `import triton` now raises ImportError\n"
        "import torch; import pdcluster.kernels as kernels\n"
        "from pdcluster.kernels._triton import HAS_TRITON; assert not HAS_TRITON\n"
        "assert kernels.get_ops('auto', 'cuda').backend == 'torch'\n"
        "kc = torch.randn(4, 16, 1, 8); q = torch.randn(1, 2, 8)\n"
        "bt = torch.tensor([[2, 0]], dtype=torch.int32); lens = torch.tensor([20], dtype=torch.int32)\n"
        "kernels.paged_decode_attention_ref(q, kc, kc, bt, lens, 0.3)\n"
        "try:\n"
        "    kernels.paged_decode_attention(q, kc, kc, bt, lens, 0.3)\n"
        "except ValueError as e:\n"
        "    assert 'triton is not importable' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('the triton kernel ran without triton')\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tempfile.gettempdir(), env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
