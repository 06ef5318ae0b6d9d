"""Kernel tests: every Triton kernel against its torch reference, on CPU under TRITON_INTERPRET=1.

Run: .venv/bin/pytest -q tests/kernels
Inputs are fresh random per test; the seed is printed (shown on failure) and can be pinned with
KERNEL_TEST_SEED=<n>.  Launcher-allocated outputs are poisoned (NaN / -128) for every test.
"""
import os

import pytest
import torch

# TRITON_INTERPRET=1 is set by tests/conftest.py on hosts without a GPU, before any kernel file is
# imported; on a GPU host these tests run the compiled kernels on CUDA instead.
import pdcluster.kernels._triton as kt


@pytest.fixture(autouse=True)
def seed(monkeypatch):
    monkeypatch.setattr(kt, "POISON", True)
    s = int(os.environ.get("KERNEL_TEST_SEED", "0")) or int.from_bytes(os.urandom(4), "little")
    print(f"KERNEL_TEST_SEED={s}")
    torch.manual_seed(s)
    return s


@pytest.fixture
def device():
    """Where Triton kernels run here: CPU under the interpreter, else CUDA; skip otherwise."""
    if kt.INTERPRET:
        return "cpu"
    if torch.cuda.is_available() and kt.HAS_TRITON:
        return "cuda"
    pytest.skip("Triton kernels need TRITON_INTERPRET=1 (set before `kernels` is first imported) or a GPU")
