"""Regenerate (or check) the committed protobuf/gRPC stubs.

    python -m pdcluster.deploy.protogen           # rewrite the *_pb2*.py files beside each .proto
    python -m pdcluster.deploy.protogen --check   # exit 1 if a committed stub differs from a fresh build

Every .proto under PROTO_DIRS is compiled as ``pdcluster/<dir>/<name>.proto`` (a staging folder
links ``pdcluster`` to the repo root), so the generated gRPC module imports its message module by
its installed path (``pdcluster.router.proto...``).
"""
from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIRS = ("router/proto",)
SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


def proto_files() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for d in PROTO_DIRS for p in (ROOT / d).glob("*.proto"))


def generate(out_dir: Path) -> None:
    """Compile every proto; the stubs land in out_dir/<dir>/ (the same layout as the repo)."""
    import shutil

    from grpc_tools import protoc  # dev dependency (grpcio-tools)

    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        src.mkdir()
        out.mkdir()
        (src / "pdcluster").symlink_to(ROOT, target_is_directory=True)
        args = ["protoc", f"-I{src}", f"--python_out={out}", f"--pyi_out={out}",
                f"--grpc_python_out={out}", *(f"pdcluster/{p}" for p in proto_files())]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        for f in (out / "pdcluster").rglob("*.py*"):
            dest = out_dir / f.relative_to(out / "pdcluster")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dest)


def stale_stubs() -> list[str]:
    """Relative paths of committed stubs that differ from (or are missing vs) a fresh build."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        bad = []
        for proto in proto_files():
            stem = proto[: -len(".proto")]
            for suf in SUFFIXES:
                fresh, committed = Path(tmp) / (stem + suf), ROOT / (stem + suf)
                if not committed.exists() or not filecmp.cmp(fresh, committed, shallow=False):
                    bad.append(stem + suf)
        return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when stale")
    a = ap.parse_args(argv)
    if a.check:
        bad = stale_stubs()
        print("stale: " + ", ".join(bad) if bad else "stubs up to date")
        return 1 if bad else 0
    generate(ROOT)
    print("generated stubs for", ", ".join(proto_files()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
