"""Loaded before any test module, so what it sets holds for the whole session."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The code is imported as pdcluster.* (the editable install); the repository root must not be on
# sys.path, where its `kernels/` folder would shadow Hugging Face's `kernels`. pytest runs with
# --import-mode=importlib (pyproject.toml) and leaves sys.path alone; `python -m pytest` from the
# root still prepends the root, which importing pdcluster takes off, before anything loads a model.
import pdcluster  # noqa: E402,F401

# Triton kernels are interpreted on a host without a GPU. @triton.jit reads TRITON_INTERPRET when
# a kernel file is first imported, which any test module (tests/e2e through the engine) may do, so
# it is set here, before collection. On CPU the engine runs the torch references whatever it says.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
