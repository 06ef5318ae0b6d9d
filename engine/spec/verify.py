"""Which drafted tokens a verification step accepts. Rows are torch tensors; no model, no cache.

A request with drafts d1..dk is run over its last token plus the drafts: logits row j (0..k) is the
model's distribution for the token after d1..dj. The accepted tokens are d1..da plus one more token
drawn at row a, so a step yields 1..k+1 tokens and never changes what the output is distributed as:

  greedy   a = the longest prefix with dj == argmax(row j-1); the extra token is argmax(row a).
           Token for token what undrafted greedy decoding gives.
  sampled  rejection sampling (Leviathan et al. 2023; Chen et al. 2023) with a point-mass draft
           q = 1[dj]: accept dj with probability min(1, p(dj) / q(dj)) = p(dj); on rejection draw from
           the residual (p - q)+ normalized, which is p with dj removed and renormalized; after k
           acceptances draw the bonus token from row k. Each emitted token is distributed as p.
           p is the row after temperature, min-p, top-k and top-p (engine/sampler.sampling_probs).
"""
from __future__ import annotations

import torch

from pdcluster.engine.sampler import apply_temperature, clean_logits, draw, sampling_probs
from pdcluster.engine.sampling_params import SamplingParams


def accept_greedy(drafts: list[int], targets: list[int]) -> list[int]:
    """targets: argmax of rows 0..k (len(drafts) + 1). The accepted drafts plus the next token."""
    a = 0
    while a < len(drafts) and drafts[a] == targets[a]:
        a += 1
    return drafts[:a] + [targets[a]]


def accept_sampled(probs: torch.Tensor, drafts: list[int], g: torch.Generator | None) -> list[int]:
    """probs [k+1, V] (rows need not be normalized). One uniform per draft, then one draw (engine/
    sampler.draw) from the residual of the rejected row, or from row k when every draft stands."""
    probs = probs / probs.sum(-1, keepdim=True)
    u = torch.rand(len(drafts), generator=g, dtype=torch.float64).tolist() if drafts else []
    for j, d in enumerate(drafts):
        if u[j] < float(probs[j, d]):
            continue
        residual = probs[j].clone()
        residual[d] = 0.0
        if not bool(residual.sum() > 0):        # p(d) == 1 up to rounding: nothing else to draw
            continue
        return drafts[:j] + [draw(residual, g)]
    return drafts + [draw(probs[len(drafts)], g)]


def verify(logits: torch.Tensor, params: list[SamplingParams], drafts: list[list[int]],
           generators: list[torch.Generator | None]) -> list[list[int]]:
    """logits float32 [sum(len(d) + 1), V]: each request's rows, in order. Requests here have no
    penalties, grammar or logprobs (SpecDecoder.eligible). Returns each request's new tokens."""
    logits = clean_logits(logits)
    out, off = [], 0
    for p, d, g in zip(params, drafts, generators):
        rows = logits[off:off + len(d) + 1]
        off += len(d) + 1
        if p.greedy:
            out.append(accept_greedy(d, rows.argmax(-1).tolist()))
        else:
            rows = apply_temperature(rows, p.temperature)
            probs = torch.stack([sampling_probs(r, p) for r in rows])
            out.append(accept_sampled(probs, d, g))
    return out
