"""Hugging Face folders: config.json (+ generation_config.json) -> ModelConfig, safetensors -> weights.

Weights come from model.safetensors, or from the shards listed in model.safetensors.index.json;
`--quantization int4|int8` quantizes them as they load (engine/quant/policy.py).
"""
from __future__ import annotations

import glob
import json
import os

import torch
from safetensors import SafetensorError, safe_open

from pdcluster.engine.config import ModelConfig
from pdcluster.engine.quant.packed import Packed, quantize
from pdcluster.engine.quant.policy import weight_kind

ARCHITECTURES = ("llama", "mistral", "qwen2")   # config.json model_type; SmolLM2 is "llama"


def _json(folder: str, name: str) -> dict:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _ids(v) -> list[int]:
    """A token id field that may be absent, an int, or a list."""
    return [] if v is None else [v] if isinstance(v, int) else list(v)


def _weight_files(folder: str) -> dict[str, str]:
    """Tensor name -> safetensors file path."""
    index = _json(folder, "model.safetensors.index.json")
    if index:
        return {n: os.path.join(folder, f) for n, f in index["weight_map"].items()}
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors files")
    out = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                out.update(dict.fromkeys(f.keys(), path))
        except SafetensorError as e:        # (not an OSError or ValueError: serve's checks let it through)
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    return out


def _rope(c: dict) -> tuple[float, tuple | None]:
    """(rope_theta, rope_scaling items); reads both `rope_scaling` and transformers 5's `rope_parameters`."""
    params = dict(c.get("rope_scaling") or c.get("rope_parameters") or {})
    theta = float(c.get("rope_theta") or params.pop("rope_theta", 10000.0))
    params.pop("rope_theta", None)
    if "type" in params:                       # legacy key for rope_type
        params.setdefault("rope_type", params.pop("type"))
    if params.get("rope_type", "default") == "default":
        return theta, None
    return theta, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in params.items()))


def load_config(folder: str) -> ModelConfig:
    c = _json(folder, "config.json")
    if not c:
        raise FileNotFoundError(f"{folder}: no config.json")
    arch = c.get("model_type")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{folder}: unsupported architecture {arch!r} {c.get('architectures', [])} "
                         f"(supported model_type: {', '.join(ARCHITECTURES)})")
    if c.get("mlp_bias"):
        raise ValueError(f"{folder}: mlp_bias is not supported")
    tensors = _weight_files(folder)
    if "model.layers.0.self_attn.o_proj.bias" in tensors:
        raise ValueError(f"{folder}: o_proj bias is not supported")
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    theta, scaling = _rope(c)
    max_pos = c.get("max_position_embeddings", 2048)
    window = c.get("sliding_window") if c.get("use_sliding_window", True) else None
    if window and window < max_pos:            # Mistral v0.1: full attention is exact only inside the window
        max_pos = window
    gen = _json(folder, "generation_config.json")
    return ModelConfig(
        name=os.path.basename(folder),
        path=folder,
        vocab_size=c["vocab_size"],
        hidden_size=hidden,
        intermediate_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or hidden // heads,
        rms_norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=max_pos,
        tie_word_embeddings="lm_head.weight" not in tensors,
        attention_bias="model.layers.0.self_attn.q_proj.bias" in tensors,
        bos_token_id=c.get("bos_token_id", gen.get("bos_token_id")),
        eos_token_ids=tuple(dict.fromkeys(_ids(c.get("eos_token_id")) + _ids(gen.get("eos_token_id")))),
    )


def load_weights(cfg: ModelConfig, names: list[str], dtype: torch.dtype,
                 quantization: str | None = "none") -> dict[str, torch.Tensor | Packed]:
    """Float tensors in `dtype`; with quantization "int4"/"int8", the linears and the head packed
    at load (engine/quant/policy.py)."""
    files = _weight_files(cfg.path)
    by_file: dict[str, list[str]] = {}
    for n in names:
        if n in files:
            by_file.setdefault(files[n], []).append(n)
    out = {}
    for path, file_names in by_file.items():
        with safe_open(path, framework="pt") as f:
            for n in file_names:
                kind = weight_kind(n, quantization)
                t = f.get_tensor(n)
                out[n] = quantize(t, kind) if kind else t.to(dtype)
    return out
