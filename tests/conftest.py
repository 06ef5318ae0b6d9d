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

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """An in-process engine built with num_threads sets torch's thread count for the whole process
    (engine/llm_engine.py, as a worker must): put it back after each test, so one test's workers
    do not run every later test in the session on their thread count."""
    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def _checkpoint_stamp(path: str) -> tuple:
    """(name, size, mtime) of the checkpoint file, or of every file of its folder."""
    files = [path] if os.path.isfile(path) else sorted(os.path.join(path, f) for f in os.listdir(path))
    return tuple((f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files if os.path.isfile(f))


@pytest.fixture(scope="session", autouse=True)
def _weights_read_once():
    """The engines one test process builds (dozens: every worker pair, every LLM) read a checkpoint's
    weights once per (model config, file stamp, dtype, quantization): later loads get a new dict of
    the same tensors, which nothing writes to (LlamaModel converts, fuses or wraps them). A test that
    rewrites a checkpoint changes its stamp and loads it afresh. Worker processes (Ray, `serve`) load
    their own."""
    from pdcluster.engine import loader
    real, kept = loader.load_weights, {}

    def load_weights(cfg, dtype, quantization="none"):
        key = (cfg, _checkpoint_stamp(cfg.path), dtype, quantization)
        if key not in kept:
            kept[key] = real(cfg, dtype, quantization)
        return dict(kept[key])
    loader.load_weights = load_weights
    yield
    loader.load_weights = real
