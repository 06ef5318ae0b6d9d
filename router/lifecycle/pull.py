"""A placement's peer pull, from the cost model's estimate to the puller's stream call (kv_transfer/pull.py).

The cost model prices the pull (router/placement/pull_pricing.py) and leaves it in the placement's
estimate: holder, first block, block count. Here it becomes a typed PullPlan with the prompt's chain
hashes of those blocks (salted: the tenant's own) and the holder's client, whose handle the puller
uses to order the blocks. No plan when the holder is gone from the registry by now.
While the pull runs (until the puller's first token: its prefill, pulled blocks and all, is done) the
holder is charged the serving the cost model priced (`serving_charge`): its queue grows by that many
seconds of its prefill (queued_tokens) and its serving_s backlog, which later pulls from it wait for
(router/placement/pull_pricing.py).
"""
from __future__ import annotations

from pdcluster.messages import PullPlan
from pdcluster.router.placement import Placement


def serving_charge(choice: Placement) -> tuple[str, int, float] | None:
    """(holder, queued tokens, serving seconds) a local placement's pull charges its holder, or None."""
    e = choice.estimate or {}
    holder = e.get("pull_from")
    if choice.kind != "local" or not holder or int(e.get("pull_blocks", 0)) <= 0:
        return None
    return holder, round(float(e.get("pull_serve_tokens", 0.0))), float(e.get("pull_serve_s", 0.0))


def charge(w, tokens: int, serving_s: float, sign: int) -> None:
    """Count queued tokens and serving seconds on WorkerLoad w (+1) or off it (-1); None: skipped."""
    if w is None:
        return
    if tokens:
        w.queued_tokens += sign * tokens
    if serving_s:
        w.serving_s = max(0.0, w.serving_s + sign * serving_s)


def pull_plan(choice: Placement, hashes: list[int], workers) -> tuple[PullPlan, object] | None:
    """(the plan, the holder's WorkerClient) for a local placement that pulls, else None."""
    e = choice.estimate or {}
    holder, first, n = e.get("pull_from"), int(e.get("pull_first_block", 0)), int(e.get("pull_blocks", 0))
    if choice.kind != "local" or not holder or n <= 0 or first + n > len(hashes):
        return None
    client = workers.decode.get(holder) or workers.prefill.get(holder)
    if client is None:
        return None
    load = workers.loads.get(holder)
    return PullPlan(holder, load.kv_address if load is not None else "", first, list(hashes[first:first + n])), client
