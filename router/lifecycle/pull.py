"""A placement's peer pull, from the cost model's estimate to the puller's stream call (kv_transfer/pull.py).

The cost model prices the pull (router/placement/pull_pricing.py) and leaves it in the placement's
estimate: holder, first block, block count. Here it becomes a typed PullPlan with the prompt's chain
hashes of those blocks (salted: the tenant's own) and the holder's client, whose handle the puller
uses to order the blocks. No plan when the holder is gone from the registry by now.
"""
from __future__ import annotations

from pdcluster.messages import PullPlan
from pdcluster.router.placement import Placement


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
