"""Every third-party package the project's code imports (outside tests/) is one pyproject.toml declares: a runtime
import as a dependency, an optional feature's in its extra. httpx was only in the `dev` extra while every `pdcluster`
command loads bench/serve.py, which imports it: a plain `pip install .` failed at `pdcluster serve --help`."""
import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# imports an extra may hold: the module that imports it is that feature's own
EXTRA_ONLY = {"mooncake": ("rdma", "kv_transfer/mooncake/"), "grpc_tools": ("dev", "deploy/protogen.py")}


def _name(req: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0]).lower()


def _imports() -> dict[str, set[str]]:
    """Top-level module name -> the files (relative) that import it, for third-party modules only."""
    own = {p.name for p in ROOT.iterdir() if p.is_dir()} | {"pdcluster"}
    found: dict[str, set[str]] = {}
    for f in ROOT.rglob("*.py"):
        rel = f.relative_to(ROOT)
        if rel.parts[0] in ("tests", "build") or rel.parts[0].startswith("."):
            continue
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for m in mods:
                top = m.split(".")[0]
                if top not in sys.stdlib_module_names and top not in own:
                    found.setdefault(top, set()).add(rel.as_posix())
    return found


def test_every_imported_package_is_declared_where_its_importer_needs_it():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {_name(r) for r in project["dependencies"]}
    extras = {k: {_name(r) for r in v} for k, v in project["optional-dependencies"].items()}
    dists = packages_distributions()
    found = _imports()
    assert {"torch", "ray", "grpc", "httpx"} <= set(found)         # the walk sees the project's imports
    wrong = []
    for top, files in sorted(found.items()):
        names = {_name(d) for d in dists.get(top, [top])}
        if names & deps:
            continue
        extra, prefix = EXTRA_ONLY.get(top, (None, None))
        if extra and names & extras[extra] and all(f.startswith(prefix) for f in files):
            continue
        wrong.append(f"{top} ({', '.join(sorted(names))}) imported by {', '.join(sorted(files)[:3])}")
    assert not wrong, "not a declared dependency: " + "; ".join(wrong)
