"""Admission by expected wait: how long a new prompt would queue before any worker starts its
prefill, from what the router already tracks. Pure Python.

A request is worth admitting only if its prefill can start within the operator's bound
(--max-queue-wait) and its first token can come before the client gives up (its gRPC deadline);
else RESOURCE_EXHAUSTED at once is kinder than a TTFT of minutes.

Backlogs are counted from the moment of placement (router/lifecycle/place.py charges a worker before its
first await), so a burst's later requests see the earlier ones; rates are the workers' measured
prefill rates (router/telemetry.py; a worker's warm-up gives the first sample).
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

from pdcluster.router.placement import WorkerLoad


def expected_wait_s(candidates: Iterable[WorkerLoad], prefill_tps: Callable[[WorkerLoad], float],
                    own_tokens: int = 0, cached: Mapping[str, float] | None = None) -> float | None:
    """Seconds until the best candidate would start a new prefill (own_tokens=0) or finish one of
    own_tokens: (its backlog + own_tokens - its cached tokens of them) / its prefill rate in tokens/s,
    the least over placeable candidates. Backlog: the prompt tokens this router sent it and not yet
    prefilled, or what it reported waiting, whichever is larger. cached: worker id -> tokens of the
    prompt it holds. None: no placeable candidate (placement answers that)."""
    cached = cached or {}
    waits = [(max(w.queued_tokens, w.waiting_tokens) + max(0.0, own_tokens - cached.get(w.worker_id, 0.0)))
             / max(prefill_tps(w), 1e-9) for w in candidates if w.placeable]
    return min(waits) if waits else None


def refusal(candidates: Iterable[WorkerLoad], prefill_tps: Callable[[WorkerLoad], float], n_prompt: int,
            max_queue_wait_s: float | None, deadline_s: float | None,
            cached: Mapping[str, float] | None = None) -> str | None:
    """Why a prompt of n_prompt tokens should be refused now, or None to admit it:
      - its prefill could not start within max_queue_wait_s, or
      - its prefill could not finish (the first token) within the client's remaining deadline_s (its
        tokens each worker holds cached, `cached`, not computed again)."""
    candidates = list(candidates)
    if max_queue_wait_s is not None:
        wait = expected_wait_s(candidates, prefill_tps)
        if wait is not None and wait > max_queue_wait_s:
            return (f"expected wait before the prefill starts is {wait:.1f}s, over --max-queue-wait "
                    f"({max_queue_wait_s:.1f}s): retry later or elsewhere")
    if deadline_s is not None:
        first = expected_wait_s(candidates, prefill_tps, n_prompt, cached)
        if first is not None and first > deadline_s:
            return (f"expected time to the first token is {first:.1f}s, over the request's deadline "
                    f"({deadline_s:.2g}s left): retry later or elsewhere")
    return None


def placement_ttft_s(choice, loads: dict[str, WorkerLoad], prefill_tps: Callable[[WorkerLoad], float],
                     n_tokens: int) -> float | None:
    """Expected seconds to the first token on `choice` (a Placement): the policy's own estimate where it
    gives one (the cost model's ttft_s: queue, uncached compute, tier loads, exposed transfer, join),
    else expected_wait_s of the worker that prefills with all n_tokens as its own (no credit for cache
    hits: an upper bound). None: that worker is unknown or not placeable."""
    est = choice.estimate or {}
    if "ttft_s" in est:
        return float(est["ttft_s"])
    w = loads.get(choice.prefill or choice.decode)
    return None if w is None else expected_wait_s([w], prefill_tps, n_tokens)


def slo_refusal(choice, loads: dict[str, WorkerLoad], prefill_tps: Callable[[WorkerLoad], float], n_tokens: int,
                admit_ttft_s: float | None) -> str | None:
    """Why a new request placed as `choice` should be refused now (RouterConfig.admit_ttft_s: its
    expected time to the first token, placement_ttft_s, is over the TTFT SLO), or None to admit it.
    Refusing at once what would miss the SLO anyway keeps the queue it would have built from making
    the requests behind it miss too (bench/RESULTS.md, "SLO admission")."""
    if admit_ttft_s is None:
        return None
    ttft = placement_ttft_s(choice, loads, prefill_tps, n_tokens)
    if ttft is None or ttft <= admit_ttft_s:
        return None
    return (f"expected time to the first token is {ttft:.2f}s, over --admit-ttft ({admit_ttft_s:g}s): "
            "retry later or elsewhere")
