"""router/lifecycle/place.py's wait for room: a deferred placement (Placement.defer, the cost model's
KV-full fallback) is asked again after each status poll and taken once place_wait_s has passed.
Pure Python: the router's own registry, loads and cost model; no worker is called."""
import asyncio
import time

import pytest

from pdcluster.router.config import RouterConfig
from pdcluster.router.cost_config import CostConfig
from pdcluster.router.lifecycle import Router
from pdcluster.router.lifecycle.place import _choose

pytestmark = pytest.mark.timeout(30)
POLL = 0.01


class Client:
    """What the registry keeps of a worker here: its id (nothing is called in these tests)."""
    def __init__(self, wid):
        self.worker_id = wid


def router(wait_s: float | None, fallback: str = "wait", max_attempts: int = 3) -> Router:
    r = Router(RouterConfig(policy="cost-model", status_interval_s=POLL, place_wait_s=wait_s, block_size=16,
                            max_attempts=max_attempts), None,
               (2,), 4096, cost_config=CostConfig(block_size=16, kv_full_fallback=fallback))
    r.add_worker("prefill", Client("prefill-0"))
    r.add_worker("decode", Client("decode-0"))
    for w in r.workers.loads.values():          # as their status polls report them
        w.num_blocks, w.free_blocks = 1000, 1000
    r.workers.loads["prefill-0"].prefill_tps = 50_000.0   # prefills 25x faster than the decode worker
    r.workers.loads["decode-0"].prefill_tps = 2_000.0
    r.workers.loads["decode-0"].free_blocks = 10    # KV full for a 2048-token prompt (129 blocks)
    return r


def test_a_kv_full_placement_waits_for_room_then_goes_remote():
    r = router(wait_s=None)                         # the default: wait until there is room

    async def go():
        t0 = time.monotonic()
        task = asyncio.ensure_future(_choose(r, 2048, set(), None, t0))
        await asyncio.sleep(5 * POLL)
        assert not task.done()                      # waiting in the router, not placed locally
        r.workers.loads["decode-0"].free_blocks = 1000    # a status poll reports room
        return await task, time.monotonic() - t0
    choice, took = asyncio.run(go())
    assert (choice.kind, choice.prefill, choice.defer) == ("remote", "prefill-0", False)
    assert 5 * POLL <= took < 5.0


def test_a_deferred_placement_is_taken_after_place_wait_s():
    r = router(wait_s=0.1)

    choice, took = asyncio.run(_once(r))
    assert (choice.kind, choice.decode, choice.defer) == ("local", "decode-0", True)   # queues at d, not refused
    assert 0.1 <= took < 5.0
    # control: the old rule ("local") takes the fallback at once
    choice, took = asyncio.run(_once(router(10.0, "local")))
    assert (choice.kind, choice.defer) == ("local", False) and took < 5 * POLL


async def _once(r):
    t0 = time.monotonic()
    return await _choose(r, 2048, set(), None, t0), time.monotonic() - t0
