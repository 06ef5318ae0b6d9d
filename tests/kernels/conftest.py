"""Kernel tests: every Triton kernel against its torch reference, on CPU under TRITON_INTERPRET=1.

Run: TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/kernels
Inputs are fresh random per test; the seed is printed (shown on failure) and can be pinned with
KERNEL_TEST_SEED=<n>.  Launcher-allocated outputs are poisoned (NaN / -128) for every test.
"""
import os

import pytest
import torch

# @triton.jit picks interpreted kernels when TRITON_INTERPRET=1 at decoration time (the first
# `import kernels`), and Triton reads it again while interpreting, so it stays set for the session.
# Only on hosts without a GPU: there the engine runs the torch references whatever the variable
# says, so processes started later in a whole-tree run (Ray workers of tests/e2e) are unaffected.
# On a GPU host the tests below run the compiled kernels on CUDA instead.  If `kernels` was
# imported before this file without the variable, the `device` fixture skips with the reason.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kernels._triton as kt  # noqa: E402


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
