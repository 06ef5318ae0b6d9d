"""Which weights computed a KV block: the key a cache kept across restarts (the disk KV tier) is
written under, so that a worker restarted on other weights (a fine-tune of the same architecture, a
re-quantized file, another dtype) never reads back KV it did not compute. Pure Python.

A checkpoint's identity is each weight file's name and size and SAMPLES chunks of CHUNK bytes spread
over it, first and last included: a few MiB read however large the file, and two checkpoints that
differ anywhere in their tensors (as any two trainings do) differ in every sample with near certainty.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

SAMPLES = 16
CHUNK = 64 * 1024                      # bytes per sample
WEIGHT_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth")


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The checkpoint's weight files: `path` itself if a file, else the folder's weight files (sorted)."""
    p = Path(path)
    if p.is_file():
        return [p]
    return sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


def weights_id(path: str | os.PathLike) -> str:
    """32 hex digits naming the weights at `path` (a file or an HF folder) by their bytes, not their
    location or mtime: the same file copied elsewhere keeps its id."""
    h = hashlib.blake2b(digest_size=16)
    for f in weight_files(path):
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            for i in range(SAMPLES):
                fh.seek(i * max(size - CHUNK, 0) // (SAMPLES - 1))
                h.update(fh.read(CHUNK))
    return h.hexdigest()


# the model config's fields that K and V depend on beyond the weight files (K is stored after RoPE): an HF folder's
# config.json edited (rope_scaling, say) on the same weights makes other KV
KV_FIELDS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "rms_norm_eps", "rope_theta",
             "rope_scaling", "attention_bias")


def kv_identity(cfg) -> str:
    """What a KV block's values depend on beyond its tokens (an EngineConfig): the weights, the config fields that
    compute K and V with them (KV_FIELDS, 8 hex digits of their hash) and how (dtype, weight quantization)."""
    arch = repr([(f, getattr(cfg.model, f, None)) for f in KV_FIELDS])
    return (f"{weights_id(cfg.model.path)}/{cfg.dtype}/{cfg.quantization}/"
            f"{hashlib.blake2b(arch.encode(), digest_size=4).hexdigest()}")
