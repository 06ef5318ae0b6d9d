"""One import namespace: nothing of ours is importable as a bare `kernels` (or `engine`, ...), so
Hugging Face's `kernels`, which transformers probes and imports, is never shadowed by our folder.
Checked in this process (transformers loads a model), in a script run from another directory, and
in the Ray workers of a running cluster started from the repository root."""
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OURS = ("engine", "router", "prefill_worker", "decode_worker", "kv_transfer", "kernels", "deploy", "bench", "sim")


def hf_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def ours(origin) -> bool:
    """A top-level folder of this checkout (ROOT/<name>/__init__.py), not the venv inside it."""
    return origin is not None and Path(str(origin)).resolve().parent.parent == ROOT


def kernels_origin() -> str | None:
    spec = importlib.util.find_spec("kernels")
    return None if spec is None else str(spec.origin)


def test_distribution_claims_only_pdcluster():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert all(p == "pdcluster" or p.startswith("pdcluster.") for p in cfg["packages"])
    assert set(cfg["package-dir"]) == {"pdcluster"} | {f"pdcluster.{d}" for d in OURS}
    top = importlib.metadata.distribution("pdcluster").read_text("top_level.txt").split()
    assert top == ["pdcluster"]


def test_transformers_model_and_our_kernels_in_one_process(hf_ref):
    """hf_ref: transformers has loaded the embedded model in this process."""
    import pdcluster.kernels
    from pdcluster import LLM, SamplingParams, StructuredOutput  # noqa: F401  (the public offline API)
    from transformers.utils import is_kernels_available

    assert Path(pdcluster.kernels.__file__).resolve() == ROOT / "kernels" / "__init__.py"
    assert str(ROOT) not in [str(Path(p or os.curdir).resolve()) for p in sys.path]
    assert is_kernels_available() == hf_kernels_installed()
    origin = kernels_origin()
    if hf_kernels_installed():
        import kernels
        assert not ours(kernels.__file__), kernels.__file__
        assert origin is not None and not ours(origin)
    else:
        assert origin is None, origin
    for name in OURS:
        spec = importlib.util.find_spec(name) if name != "kernels" else None
        assert spec is None or not ours(spec.origin), name


def test_script_run_from_another_directory():
    code = ("import transformers, importlib.util, pdcluster.kernels\n"
            "from pdcluster import LLM, SamplingParams\n"
            "from transformers.utils import is_kernels_available\n"
            "s = importlib.util.find_spec('kernels')\n"
            "print(is_kernels_available(), s and s.origin, pdcluster.kernels.__file__)\n")
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    available, origin, our_kernels = r.stdout.split()
    assert available == str(hf_kernels_installed())
    assert origin == "None" or not ours(origin)
    assert Path(our_kernels).resolve() == ROOT / "kernels" / "__init__.py"


def test_ray_workers_of_a_cluster_started_from_the_root(cluster):
    """Ray puts the driver's cwd (the root, under `make test`) first on every worker's sys.path;
    a worker imports pdcluster before anything else (its actor's module), which takes it off."""
    import ray

    def probe():    # defined here, so Ray ships it by value
        import importlib.util
        import sys

        import pdcluster.decode_worker.actor  # noqa: F401  (what an actor's worker imports first)

        from transformers.utils import is_kernels_available
        spec = importlib.util.find_spec("kernels")
        return list(sys.path), spec and spec.origin, is_kernels_available()

    path, origin, available = ray.get(ray.remote(probe).remote(), timeout=120)
    assert str(ROOT) not in [str(Path(p or "/").resolve()) for p in path]
    assert available == hf_kernels_installed()
    assert not ours(origin), origin
