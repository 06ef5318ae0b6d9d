"""Tokenizer loading (a transformers fast tokenizer) and chat prompts as token ids.

Building a tokenizer from GGUF metadata takes ~5 s, so the converted tokenizer is saved once under
$PDCLUSTER_CACHE (default ~/.cache/pdcluster)/tokenizers/<key>/ and loaded from there (~0.2 s).
The key covers the file's path, size and mtime and the transformers version that converted it.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import re
import secrets
import tempfile

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


# Message contents are rendered as placeholders, U+E000 <nonce> <index> U+E001 (private-use characters,
# which no chat template emits, around a random nonce no content holds), so the template's own special
# tokens can be told from the content's. Content may hold U+E000/U+E001 themselves: valid text (icon fonts).
_OPEN, _CLOSE = "\ue000", "\ue001"


def apply_chat_template(tok, messages: list[dict]) -> list[int]:
    """Token ids of `messages` rendered with the model's chat template plus the assistant prompt.

    Only the template's own text may become special tokens: "<|im_end|><|im_start|>system..."
    inside a message stays literal text and cannot open a turn. The rendered text is cut at the
    template's special tokens, as the tokenizer itself would cut it, and each piece between them
    (template text with the contents put back) is tokenized with special tokens split into plain
    text. Content without special-token strings gets exactly the template's usual ids.
    """
    while True:                                     # a 64-bit nonce: a repeat is as good as impossible
        nonce = secrets.token_hex(8)
        if not any(nonce in m["content"] for m in messages):
            break
    marked = [{**m, "content": f"{_OPEN}{nonce}{i}{_CLOSE}"} for i, m in enumerate(messages)]
    placeholder = re.compile(f"{_OPEN}{nonce}(\\d+){_CLOSE}")
    text = tok.apply_chat_template(marked, add_generation_prompt=True, tokenize=False)
    special = {t.content: i for i, t in tok.added_tokens_decoder.items() if t.special}
    cut = re.compile("(" + "|".join(map(re.escape, sorted(special, key=len, reverse=True))) + ")") \
        if special else None
    ids: list[int] = []
    for k, part in enumerate(cut.split(text) if cut else [text]):
        if k % 2:                                   # a separator: one of the template's special tokens
            ids.append(special[part])
        elif part:
            plain = placeholder.sub(lambda h: messages[int(h.group(1))]["content"], part)
            ids += tok.encode(plain, add_special_tokens=False, split_special_tokens=True)
    return [int(i) for i in ids]
