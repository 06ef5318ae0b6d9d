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

from typing import Callable, Iterable

from pdcluster.router.placement import WorkerLoad


def expected_wait_s(candidates: Iterable[WorkerLoad], prefill_tps: Callable[[WorkerLoad], float],
                    own_tokens: int = 0) -> float | None:
    """Seconds until the best candidate would start a new prefill (own_tokens=0) or finish one of
    own_tokens: (its backlog + own_tokens) / its prefill rate in tokens/s, the least over placeable
    candidates. Backlog: the prompt tokens this router sent it and not yet prefilled, or what it
    reported waiting, whichever is larger. None: no placeable candidate (placement answers that)."""
    waits = [(max(w.queued_tokens, w.waiting_tokens) + own_tokens) / max(prefill_tps(w), 1e-9)
             for w in candidates if w.placeable]
    return min(waits) if waits else None


def refusal(candidates: Iterable[WorkerLoad], prefill_tps: Callable[[WorkerLoad], float], n_prompt: int,
            max_queue_wait_s: float | None, deadline_s: float | None) -> str | None:
    """Why a prompt of n_prompt tokens should be refused now, or None to admit it:
      - its prefill could not start within max_queue_wait_s, or
      - its prefill could not finish (the first token) within the client's remaining deadline_s."""
    candidates = list(candidates)
    if max_queue_wait_s is not None:
        wait = expected_wait_s(candidates, prefill_tps)
        if wait is not None and wait > max_queue_wait_s:
            return (f"expected wait before the prefill starts is {wait:.1f}s, over --max-queue-wait "
                    f"({max_queue_wait_s:.1f}s): retry later or elsewhere")
    if deadline_s is not None:
        first = expected_wait_s(candidates, prefill_tps, n_prompt)
        if first is not None and first > deadline_s:
            return (f"expected time to the first token is {first:.1f}s, over the request's deadline "
                    f"({deadline_s:.1f}s left): retry later or elsewhere")
    return None
