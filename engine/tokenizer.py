"""Tokenizer loading (a transformers fast tokenizer) and chat prompts as token ids.

Building a tokenizer from GGUF metadata takes ~5 s, so the converted tokenizer is saved once under
$PDCLUSTER_CACHE (default ~/.cache/pdcluster)/tokenizers/<key>/ and loaded from there (~0.2 s).
The key covers the file's path, size and mtime and the transformers version that converted it.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Mapping

from pdcluster.engine.config import ModelConfig


def _cache_dir(gguf_path: str) -> str:
    import transformers

    st = os.stat(gguf_path)
    key = f"{os.path.realpath(gguf_path)}:{st.st_size}:{st.st_mtime_ns}:{transformers.__version__}"
    root = os.environ.get("PDCLUSTER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pdcluster")
    return os.path.join(root, "tokenizers", hashlib.sha256(key.encode()).hexdigest()[:16])


def load_tokenizer(cfg: ModelConfig):
    """The checkpoint's tokenizer: from the HF folder, or converted from the GGUF file (cached)."""
    from transformers import AutoTokenizer

    if cfg.gguf_file is None:
        return AutoTokenizer.from_pretrained(cfg.path)
    cache = _cache_dir(cfg.path)
    if not os.path.isfile(os.path.join(cache, "tokenizer.json")):
        tok = AutoTokenizer.from_pretrained(os.path.dirname(cfg.path), gguf_file=cfg.gguf_file)
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(cache))
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, cache)               # atomic publish; a concurrent writer may have won
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(cache)   # cold and warm paths yield the same object


def apply_chat_template(tok, messages: list[dict]) -> list[int]:
    """Token ids of `messages` rendered with the model's chat template plus the assistant prompt."""
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, Mapping):                # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]
