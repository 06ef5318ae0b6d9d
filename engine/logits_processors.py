"""What changes a logits row before a token is drawn from it, after OpenAI's and vLLM's semantics.

On the raw logits, first (vLLM v1's order: both can change the argmax, so greedy rows take them too):
  logit_bias  logit[id] += bias, bias in [-100, 100] (OpenAI's: -100 in effect bans an id, +100 forces it);
  min_tokens  EOS (unless ignore_eos) and stop_token_ids at -inf while fewer than min_tokens tokens are out.
Penalties (one row [V] float32, `counts` [V] the times each id appeared in the output so far):
  repetition  every id seen in the prompt or the output: positive logits / r, negative ones * r
              (r > 1 discourages, 1 = off; CTRL's rule, as vLLM and transformers apply it);
  frequency   logit -= f * count   (OpenAI; f in [-2, 2], 0 = off);
  presence    logit -= p * (count > 0).
min_p: drop every id whose probability is below min_p x the top id's (0 = off), after temperature.
"""
from __future__ import annotations

import torch

from pdcluster.engine.sampling_params import SamplingParams


def apply_logit_bias(row: torch.Tensor, bias: tuple[tuple[int, float], ...]) -> torch.Tensor:
    """row [V] float32 -> a copy with each (id, b) of bias added (ids < V: validated at the edge)."""
    if not bias:
        return row
    ids = torch.tensor([t for t, _ in bias], dtype=torch.int64, device=row.device)
    return row.index_add(0, ids, torch.tensor([float(b) for _, b in bias], dtype=row.dtype, device=row.device))


def stop_ids(p: SamplingParams, eos_token_ids) -> tuple[int, ...]:
    """The ids min_tokens holds back: the model's EOS ids (with ignore_eos too: vLLM masks them whatever
    ignore_eos says, which only decides whether EOS ends the request) and stop_token_ids."""
    return tuple(dict.fromkeys(tuple(eos_token_ids) + p.stop_token_ids))


def mask_ids(row: torch.Tensor, ids: tuple[int, ...]) -> torch.Tensor:
    """row [V] float32 -> a copy with ids at -inf."""
    if not ids:
        return row
    return row.index_fill(0, torch.tensor(ids, dtype=torch.int64, device=row.device), float("-inf"))


def output_counts(output_ids: list[int], vocab_size: int, device) -> torch.Tensor:
    """[V] float32 occurrences of each id in output_ids."""
    counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
    if output_ids:
        ids = torch.tensor(output_ids, dtype=torch.int64, device=device)
        counts.index_add_(0, ids, torch.ones(len(output_ids), dtype=torch.float32, device=device))
    return counts


def apply_penalties(row: torch.Tensor, p: SamplingParams, prompt_ids: list[int],
                    output_ids: list[int]) -> torch.Tensor:
    """row [V] float32 -> a penalized copy (row itself when p has no penalty)."""
    if not p.has_penalties:
        return row
    row = row.clone()
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.int64, device=row.device)
        v = row[seen].double()      # float64: a penalty below float32's range (1e-300) is not 0 here
        # a tiny penalty takes a positive logit past float32: kept finite (masked ids stay -inf), else
        # inf - inf made the row NaN and the draw returned token 0
        row[seen] = torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty).clamp(
            max=torch.finfo(row.dtype).max).to(row.dtype)
    if (p.frequency_penalty or p.presence_penalty) and output_ids:
        counts = output_counts(output_ids, row.shape[-1], row.device)
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    return row


def apply_min_p(row: torch.Tensor, min_p: float) -> torch.Tensor:
    """row [V] float32 logits (temperature applied) with ids below min_p x the top probability at -inf."""
    if min_p <= 0:
        return row
    probs = row.softmax(-1)
    return row.masked_fill(probs < min_p * probs.max(), float("-inf"))
