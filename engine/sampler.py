"""Token sampling: greedy, temperature, top-k, top-p, per-request seeded generators.

Every finite positive temperature is safe: a row is shifted by its maximum before it is divided by
the temperature, so the largest logit becomes exactly 0 and nothing overflows (1e-45 included). A
NaN logit never wins: NaN is ranked below every number, and a row with no number left raises
NonFiniteLogits instead of quietly returning token 0.

Order for one row (vLLM's): logit bias and the min_tokens mask on the raw logits, then penalties, then
temperature, then min-p, top-k and top-p. Logprobs (vLLM's logprobs_mode): raw (the engine's default, as
vLLM's) are the log-softmax of the model's logits as they came (a grammar's mask applied: tokens it forbids
are -inf), before bias, penalties and temperature; processed are of the row after bias, penalties and
temperature (greedy rows: after bias and penalties), before any truncation: the distribution the token is
drawn from, untruncated.

Random rows use the exponential-race trick: argmax(p / E) with E ~ Exp(1) draws from p and needs
one draw per vocabulary entry from the request's own generator, so a seeded request's tokens do
not depend on what else is in the batch. A seeded request's generator is reseeded for each token
(token_seed(seed, output index)): its stream is the same when a prefill worker samples the first
token and a decode worker the rest, or a migration resumes it elsewhere (a generator made afresh
there at the seed would repeat the first token's draws).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pdcluster.engine.logits_processors import apply_logit_bias, apply_min_p, apply_penalties, mask_ids
from pdcluster.engine.sampling_params import SamplingParams, TokenLogprobs


@dataclass(frozen=True)
class History:
    """What a penalized or min_tokens row needs of its request."""
    prompt_ids: list[int]
    output_ids: list[int]
    stop_ids: tuple[int, ...] = ()      # ids min_tokens holds back (logits_processors.stop_ids)


class NonFiniteLogits(FloatingPointError):
    """The model produced a logits row with no usable (non-NaN, non -inf) entry."""


def clean_logits(logits: torch.Tensor) -> torch.Tensor:
    """[N, V] float32 with NaN -> -inf; raises NonFiniteLogits for a row left without a candidate.
    The usual all-finite case costs one reduction: a NaN or infinite entry makes the sum NaN or infinite,
    so a finite sum proves them absent (a sum that overflows from finite entries takes the full check)."""
    if not math.isfinite(logits.sum().item()) and not bool(torch.isfinite(logits).all()):
        logits = logits.nan_to_num(nan=float("-inf"), posinf=torch.finfo(logits.dtype).max, neginf=float("-inf"))
        dead = torch.isneginf(logits).all(-1)
        if bool(dead.any()):
            raise NonFiniteLogits(f"rows {dead.nonzero().flatten().tolist()} of the logits have no finite entry")
    return logits


def token_seed(seed: int, index: int) -> int:
    """The RNG seed of a seeded request's output token `index` (0: the first): a splitmix64 mix of both,
    so the draws of every token are a function of (seed, index) alone, whichever engine samples it."""
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return (z ^ (z >> 31)) % 2**63


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
        drop[0] = False                     # (a top_p under float32's least, e.g. 1e-320, compares as 0)
        sorted_l = sorted_l.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, idx, sorted_l)
    return logits


def apply_temperature(row: torch.Tensor, temperature: float) -> torch.Tensor:
    """row [..., V] float32 logits / temperature (> 0). The maximum goes to 0 first, then the division
    runs in float64 (a temperature such as 1e-320 is 0 in float32): (x - max) / T lies in [-inf, 0] for
    every T > 0 and the maximum stays exactly 0."""
    return ((row.double() - row.amax(-1, keepdim=True)) / temperature).float()


def sampling_probs(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """row [V] float32 logits after penalties and temperature -> the probabilities a token is drawn
    from (min-p, top-k, top-p applied). Speculative verification (engine/spec/verify.py) uses this
    same function, so drafted and undrafted tokens come from the same distribution."""
    return filter_logits(apply_min_p(row, p.min_p), p.top_k, p.top_p).softmax(-1)


def draw(probs: torch.Tensor, g: torch.Generator | None) -> int:
    """One id from probs [V] (need not sum to 1): the exponential race argmax(p / E), E ~ Exp(1)."""
    e = torch.empty_like(probs).exponential_(generator=g)
    return int((probs / e).argmax())


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int]:
    """logits: float32 [N, V], plain params (no penalty, min-p or logprobs). Returns N token ids."""
    return sample_rows(logits, params, generators)[0]


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                histories: list[History | None] | None = None, raw_logprobs: bool = False
                ) -> tuple[list[int], list[TokenLogprobs | None]]:
    """logits: float32 [N, V] (a grammar's mask already applied). histories: per row, needed where
    that row's params have penalties or min_tokens. raw_logprobs: logprobs of the logits as given, else of
    the processed row (module doc). Returns N token ids and N logprobs (None where not asked)."""
    logits = clean_logits(logits)
    out = logits.max(-1).indices.tolist()      # argmax's first-maximum rule, ~2.7x faster at V = 49152 on CPU
    lps: list[TokenLogprobs | None] = [None] * len(params)
    for i, (p, g) in enumerate(zip(params, generators)):
        if p.greedy and p.plain:
            continue
        row = logits[i]
        raw = row.log_softmax(-1) if raw_logprobs and p.logprobs is not None else None
        if p.shapes_logits:
            row = apply_logit_bias(row, p.logit_bias)
            if p.min_tokens and len(histories[i].output_ids) < p.min_tokens:
                held = mask_ids(row, histories[i].stop_ids)
                if bool((held > float("-inf")).any()):  # a grammar that allows only its end keeps it
                    row = held
        if p.has_penalties:
            h = histories[i]
            row = apply_penalties(row, p, h.prompt_ids, h.output_ids)
        if not p.greedy:
            row = apply_temperature(row, p.temperature)
        logp = raw if raw is not None else row.log_softmax(-1) if p.logprobs is not None else None
        if p.greedy:
            out[i] = int(row.argmax())
        else:
            out[i] = draw(sampling_probs(row, p), g)
        if logp is not None:
            top = torch.topk(logp, p.logprobs) if p.logprobs else None
            lps[i] = TokenLogprobs(out[i], float(logp[out[i]]),
                                   tuple(zip(top.indices.tolist(), top.values.tolist())) if top else ())
    return out, lps
