"""Model profiles: the shapes a roofline needs (from each model's config.json). Pure Python."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Model:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    params: float               # all weights, embeddings included
    vocab: int = 0
    tied: bool = False          # the LM head is the input embedding (one matrix)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K+V of every layer for one token."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes

    def weight_bytes(self, dtype_bytes: int) -> float:
        return self.params * dtype_bytes

    @property
    def head_params(self) -> float:
        """The LM head's weights (vocab x hidden): a matmul per sampled token only."""
        return float(self.vocab * self.hidden)

    @property
    def layer_params(self) -> float:
        """Weights every token multiplies through (the decoder layers): all, less the embedding
        (a lookup) and the head."""
        return self.params - self.head_params * (1 if self.tied else 2)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim


MODELS: dict[str, Model] = {m.name.lower(): m for m in (
    Model("Llama-3-8B", 32, 4096, 32, 8, 128, 8.03e9, vocab=128256),
    Model("Llama-3-70B", 80, 8192, 64, 8, 128, 70.6e9, vocab=128256),
    Model("Qwen2.5-32B", 64, 5120, 40, 8, 128, 32.8e9, vocab=152064),
    Model("SmolLM2-135M", 30, 576, 9, 3, 64, 134.5e6, vocab=49152, tied=True),
)}


def model(name: str) -> Model:
    """The profile called `name`, case-insensitive; ValueError naming the choices."""
    m = MODELS.get(name.lower())
    if m is None:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(x.name for x in MODELS.values())}")
    return m
