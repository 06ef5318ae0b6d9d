"""pdcluster: a disaggregated prefill/decode LLM serving cluster.

The distribution installs every top-level folder of the repository under this one namespace
(`pdcluster.engine`, `pdcluster.kernels`, `pdcluster.router`, ...; pyproject.toml's package-dir),
so it claims no generic top-level import name. The offline API:

    from pdcluster import LLM, SamplingParams, StructuredOutput
"""
import os as _os
import sys as _sys
from pathlib import Path as _Path


def _scrub_checkout_paths() -> None:
    """Take a source checkout's root (and its top-level folders) off sys.path.

    They get there by accident: `python -m ...` or `python -c` run from the root, `python
    bench/x.py` (its folder), Ray workers (the driver's cwd). From there `kernels/` or
    `bench/kernels.py` would shadow Hugging Face's `kernels`, which transformers imports; our own
    code never needs them, being imported as pdcluster.*. An installed wheel is left alone.
    """
    root = _Path(__file__).resolve().parent.parent
    if not ((root / "pyproject.toml").is_file() and (root / "kernels" / "_triton.py").is_file()):
        return
    bad = {root} | {p for p in root.iterdir() if (p / "__init__.py").is_file()}
    _sys.path[:] = [p for p in _sys.path if _Path(p or _os.curdir).resolve() not in bad]
    shadow = _sys.modules.get("kernels")
    if shadow is not None and _Path(getattr(shadow, "__file__", None) or "/").resolve().parent in bad:
        del _sys.modules["kernels"]     # imported from here before this ran: import again properly


_scrub_checkout_paths()

from pdcluster.engine.sampling_params import SamplingParams  # noqa: E402
from pdcluster.engine.structured import StructuredOutput  # noqa: E402

__version__ = "0.1.0"


def __getattr__(name):  # keep `import pdcluster` light: torch loads only when LLM is used
    if name in ("LLM", "RequestOutput", "CompletionOutput"):
        from pdcluster.engine import llm
        return getattr(llm, name)
    raise AttributeError(f"module 'pdcluster' has no attribute {name!r}")


__all__ = ["LLM", "SamplingParams", "StructuredOutput", "RequestOutput", "CompletionOutput", "__version__"]
