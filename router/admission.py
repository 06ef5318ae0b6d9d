"""Admission by expected wait: how long a new prompt would queue before any worker starts its
prefill, from what the router already tracks. Pure Python.

A request is worth admitting only if its prefill can start before the client gives up (its gRPC
deadline) and within the operator's bound (--max-queue-wait); else RESOURCE_EXHAUSTED at once is
kinder than a TTFT of minutes.
"""
from __future__ import annotations

from typing import Iterable

from pdcluster.router.placement import WorkerLoad


def expected_wait_s(candidates: Iterable[WorkerLoad], prefill_tps) -> float | None:
    """Seconds until the least-backlogged candidate could start a new prefill: its backlog (the
    prompt tokens this router sent it and not yet prefilled, or what it reported waiting, whichever
    is larger) / its prefill rate in tokens/s (prefill_tps(load), learned online). None: no
    placeable candidate (placement answers that one)."""
    waits = [max(w.queued_tokens, w.waiting_tokens) / max(prefill_tps(w), 1e-9)
             for w in candidates if w.placeable]
    return min(waits) if waits else None


def admission_limit(max_queue_wait_s: float | None, deadline_s: float | None) -> tuple[float, str] | None:
    """(the tighter of the operator's bound and the request's remaining deadline, which one), or
    None when neither is set."""
    limits = [(v, what) for v, what in ((max_queue_wait_s, "--max-queue-wait"),
                                        (deadline_s, "the request's deadline")) if v is not None]
    return min(limits) if limits else None
