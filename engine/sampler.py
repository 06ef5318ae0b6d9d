"""Token sampling: greedy, temperature, top-k, top-p, per-request seeded generators.

Random rows use the exponential-race trick: argmax(p / E) with E ~ Exp(1) draws from p and needs
one draw per vocabulary entry from the request's own generator, so a seeded request's tokens do
not depend on what else is in the batch.
"""
from __future__ import annotations

import torch

from pdcluster.engine.sampling_params import SamplingParams


def make_generator(params: SamplingParams, device: str = "cpu") -> torch.Generator | None:
    """A request's private RNG (None for greedy). Unseeded requests get a random seed."""
    if params.greedy:
        return None
    g = torch.Generator(device=device)
    if params.seed is not None:
        g.manual_seed(params.seed % (2**63))
    else:
        g.seed()
    return g


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """One row [V] of float32 logits with entries outside top-k / the top-p nucleus set to -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_l, idx = torch.sort(logits, descending=True)
        probs = sorted_l.softmax(-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_l = sorted_l.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, idx, sorted_l)
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int]:
    """logits: float32 [N, V]. Returns N token ids."""
    out = logits.argmax(-1).tolist()
    for i, (p, g) in enumerate(zip(params, generators)):
        if p.greedy:
            continue
        row = filter_logits(logits[i] / p.temperature, p.top_k, p.top_p)
        probs = row.softmax(-1)
        e = torch.empty_like(probs).exponential_(generator=g)
        out[i] = int((probs / e).argmax())
    return out
