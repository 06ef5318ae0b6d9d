"""GGUF checkpoints (llama.cpp): metadata -> ModelConfig, tensors -> HF-named torch weights.

GGUF lists dims fastest-first (reversed vs torch); GGUFReader already exposes each tensor's
data in numpy row-major order, so dequantize() returns [out_features, in_features] directly.
llama.cpp's converter permutes the q/k rows of *llama* checkpoints for its interleaved RoPE
(pairs (2i, 2i+1) per head); HF rotates halves (i, i + D/2), so those rows are permuted back.
Qwen2 checkpoints are converted without that permutation.
Quantized tensors either stay packed (engine/quant/gguf_blocks.py; rows permuted the same way) or are
dequantized to float, as engine/quant/policy.py decides for the engine's `quantization`.
"""
from __future__ import annotations

import functools
import math
import os

from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFValueType
from gguf.quants import dequantize

from pdcluster.engine.config import ModelConfig
from pdcluster.engine.quant.gguf_blocks import native_kind, to_packed
from pdcluster.engine.quant.packed import Packed, quantize
from pdcluster.engine.quant.policy import weight_kind

ARCHITECTURES = ("llama", "qwen2")   # Mistral GGUFs use "llama"

_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


class _Reader(GGUFReader):
    """GGUFReader that parses the header from a plain ndarray view of its memmap: np.memmap's
    per-slice overhead dominates parsing the vocab's ~100k strings (~1.9 s -> ~0.7 s).
    Tensor data stays backed by the file mapping."""

    def _get(self, offset, dtype, count=1, override_order=None):
        buf = self.__dict__.get("_buf")
        if buf is None:
            buf = self._buf = self.data.view(np.ndarray)
        dt, count = np.dtype(dtype), int(count)
        arr = buf[offset:offset + dt.itemsize * count].view(dt)[:count]
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))


@functools.lru_cache(maxsize=1)
def _open(path: str, mtime_ns: int) -> GGUFReader:
    return _Reader(path)


def _reader(path: str) -> GGUFReader:
    """One parsed reader per file version, shared by load_config and load_weights."""
    return _open(path, os.stat(path).st_mtime_ns)


def _field(r: GGUFReader, key: str, default=None):
    """Scalar or string metadata value; float32 values come back as their shortest decimal."""
    f = r.fields.get(key)
    if f is None:
        return default
    v = f.parts[f.data[0]]
    if f.types[0] == GGUFValueType.STRING:
        return bytes(v).decode()
    return float(str(v[0])) if isinstance(v[0], np.floating) else v[0].item()


def load_config(path: str) -> ModelConfig:
    r = _reader(path)
    arch = _field(r, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})")
    tensors = {t.name: t for t in r.tensors}

    def get(key: str, default=None):
        return _field(r, f"{arch}.{key}", default)

    hidden, heads = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length") or hidden // heads
    theta = get("rope.freq_base", 10000.0)
    eos = (_field(r, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom"))
    return ModelConfig(
        name=os.path.basename(path).removesuffix(".gguf"),
        path=path,
        vocab_size=int(tensors["token_embd.weight"].shape[-1]),   # GGUF shape [E, V]: rows of the embedding
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_layers=get("block_count"),
        num_heads=heads,
        num_kv_heads=get("attention.head_count_kv") or heads,
        head_dim=head_dim,
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=theta,
        rope_scaling=_rope_scaling(r, arch, tensors, head_dim, theta),
        max_position_embeddings=get("context_length", 2048),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        bos_token_id=_field(r, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(e for e in eos if e is not None)),
        gguf_file=os.path.basename(path),
    )


def _rope_scaling(r: GGUFReader, arch: str, tensors: dict, head_dim: int, theta: float):
    """HF rope_scaling items from GGUF: llama3 is stored as a `rope_freqs` tensor, others as keys."""
    if "rope_freqs.weight" in tensors:
        return _llama3_from_rope_freqs(np.asarray(tensors["rope_freqs.weight"].data, np.float64), head_dim, theta)
    kind = _field(r, f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    items = {"rope_type": kind, "factor": _field(r, f"{arch}.rope.scaling.factor")}
    if kind == "yarn":
        items["original_max_position_embeddings"] = _field(r, f"{arch}.rope.scaling.original_context_length")
    return tuple(sorted(items.items()))


def _llama3_from_rope_freqs(divisors: np.ndarray, head_dim: int, theta: float):
    """Invert llama.cpp's llama3 `rope_freqs` ([D/2] divisors of the base frequencies).

    In the smooth band, factor / divisor - 1 = (factor - 1) * (old_ctx * u - low) / (high - low) with
    u = freq / 2pi: a line in u. Only old_ctx/low and old_ctx/high are identifiable, so old_ctx is
    fixed at Llama 3's 8192 and low/high fitted; the resulting frequencies are the same.
    """
    factor = float(divisors.max())
    u = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim) / (2 * math.pi)
    band = (divisors > 1 + 1e-6) & (divisors < factor * (1 - 1e-6))
    if band.sum() < 2:
        raise ValueError("cannot infer llama3 rope scaling from rope_freqs: fewer than 2 smooth frequencies")
    a, b = np.polyfit(u[band], (factor / divisors[band] - 1) / (factor - 1), 1)
    old_ctx = 8192
    low = -b * old_ctx / a
    return (("factor", round(factor, 4)), ("high_freq_factor", round(float(low + old_ctx / a), 4)),
            ("low_freq_factor", round(float(low), 4)), ("original_max_position_embeddings", old_ctx),
            ("rope_type", "llama3"))


def _hf_name(gguf_name: str) -> str | None:
    """blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight; None when not a model weight."""
    base, _, kind = gguf_name.rpartition(".")
    if base.startswith("blk."):
        _, layer, part = base.split(".", 2)
        hf = _LAYER.get(part)
        return hf and f"model.layers.{layer}.{hf}.{kind}"
    hf = _GLOBAL.get(base)
    return hf and f"{hf}.{kind}"


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows per head from llama.cpp's [D/2, 2] (interleaved pairs) back to HF's [2, D/2] (halves).
    numpy, not torch: the copy is ~100x faster on small CPU tensors."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(t) -> np.ndarray:
    """float32 numpy array in torch order ([out, in] or [n]).

    gguf's dequantize() loops in Python over groups of 16 rows; quant blocks never straddle rows, so
    the bytes are first regrouped into rows of up to 4096 blocks (fewer, larger groups: ~1.7x faster).
    """
    shape = tuple(reversed(t.shape.tolist()))
    if t.data.dtype != np.uint8:                # F32/F16: the reader already typed the elements
        return dequantize(t.data, t.tensor_type).reshape(shape)
    type_size = GGML_QUANT_SIZES[t.tensor_type][1]
    blocks_per_row = math.gcd(t.data.size // type_size, 4096)
    return dequantize(t.data.reshape(-1, blocks_per_row * type_size), t.tensor_type).reshape(shape)


def _unpermute_rows(n_rows: int, n_heads: int) -> torch.Tensor:
    """Row index that applies _unpermute to a weight held packed (rows move whole)."""
    return torch.arange(n_rows).view(n_heads, n_rows // n_heads // 2, 2).transpose(1, 2).reshape(-1)


def load_weights(cfg: ModelConfig, names: list[str], dtype: torch.dtype,
                 quantization: str | None = "none") -> dict[str, torch.Tensor | Packed]:
    """Float tensors in `dtype`, or packed weights where engine/quant/policy.py says so for
    `quantization` (None: the file's own quantization stays packed)."""
    r = _reader(cfg.path)
    permuted = _field(r, "general.architecture") == "llama"
    heads = {".q_proj.": cfg.num_heads, ".k_proj.": cfg.num_kv_heads} if permuted else {}
    wanted, out = set(names), {}
    from tqdm import tqdm  # progress on a terminal only (disable=None), silent in logs and tests
    for t in tqdm(r.tensors, desc=f"loading {Path(cfg.path).name}", unit="tensor", disable=None, leave=False):
        name = _hf_name(t.name)
        if name not in wanted:
            continue
        n_heads = next((h for k, h in heads.items() if k in name), None)
        file_kind = native_kind(t.tensor_type)
        kind = weight_kind(name, quantization, file_kind)
        if kind is not None:
            shape = tuple(reversed(t.shape.tolist()))
            w = (to_packed(t.data, t.tensor_type, shape, kind) if file_kind
                 else quantize(torch.from_numpy(np.array(_dequantize(t), np.float32)), kind))
            out[name] = w if n_heads is None else w.rows(_unpermute_rows(shape[0], n_heads))
            continue
        w = _dequantize(t)
        if n_heads is not None:
            w = _unpermute(w, n_heads)
        out[name] = torch.from_numpy(w if w.flags.writeable else w.copy()).to(dtype)  # F32: read-only file view
    return out
