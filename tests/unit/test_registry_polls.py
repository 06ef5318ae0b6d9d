"""router/registry.py refresh: each worker's status poll is taken in when it answers, and a slow one
holds nobody else's. Before, refresh waited for the slowest poll (a hung or restarting worker: the 5 s
health timeout) before taking in any: every healthy worker was polled every ~5.5 s instead of 0.5 s,
its loads went stale and the prefix index counted it silent, discounting its cache hits. Stand-in
worker handles (asyncio, no Ray) under the real Router, DecodeClient and status loop."""
import asyncio
import time
from types import SimpleNamespace

import pytest

from pdcluster.deploy.launch import Cluster
from pdcluster.messages import CacheSnapshot, WorkerStatus
from pdcluster.router.config import RouterConfig, Timeouts
from pdcluster.router.lifecycle import Router
from pdcluster.router.workers import DecodeClient

pytestmark = pytest.mark.timeout(60)
FIG = dict(free_blocks=500, num_blocks=1000, waiting_tokens=0, prefix_hits=0, prefix_queries=0, steps=0, tokens=0,
           busy_s=0.0, prefill_tokens=0, prefill_s=0.0, decode_steps=0, decode_seqs=0, decode_s=0.0)


class Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *a):
        return asyncio.ensure_future(self.fn(*a))


class Handle:
    """A worker actor's handle: status answers at once, or never (hung)."""
    def __init__(self, wid, hung, answered):
        self.wid, self.hung, self.answered = wid, hung, answered
        self.status, self.cached_hashes = Method(self._status), Method(self._snap)

    async def _status(self, drain=False):
        if self.hung:
            await asyncio.sleep(3600)
        self.answered.append(time.monotonic())
        return WorkerStatus.of(self.wid, "decode", "inc", 1, FIG, (0, ()))

    async def _snap(self):
        return (0, [])


def test_a_hung_worker_does_not_slow_the_others_polls_and_is_marked_unhealthy():
    answered = []

    async def go():
        r = Router(RouterConfig(status_interval_s=0.2), None, (2,), 4096)
        r.add_worker("decode", DecodeClient("decode-0", Handle("decode-0", False, answered), Timeouts(health_s=1.0)))
        r.add_worker("decode", DecodeClient("decode-1", Handle("decode-1", True, []), Timeouts(health_s=1.0)))
        poll = asyncio.ensure_future(Cluster._poll(SimpleNamespace(router=r)))
        conf = []
        for _ in range(12):
            await asyncio.sleep(0.25)
            conf.append(r.index.confidence("decode-0"))
        poll.cancel()
        await r.workers.close()
        return r, conf
    r, conf = asyncio.run(go())
    gaps = [b - a for a, b in zip(answered, answered[1:])]
    # a round every ~0.2 s (15 in 3 s): neither once per health timeout nor spaced out by the hung poll's wait
    assert len(answered) >= 12 and max(gaps) < 0.35
    assert min(conf) == 1.0                                    # never silent in the index
    assert r.workers.loads["decode-0"].healthy and not r.workers.loads["decode-1"].healthy


def test_a_worker_is_not_polled_while_its_resync_is_out():
    """A poll drains block events the worker never sends again; one taken in while the worker's resync
    (a snapshot at an earlier event number) is out would be wiped by it. So the status loop skips the
    worker until its resync has landed."""
    from pdcluster.messages import CacheSnapshot, EngineFigures
    calls = []

    class Gapped:
        worker_id, t = "d0", Timeouts()

        async def status(self, drain_events=True):
            calls.append(("status", time.monotonic()))
            return WorkerStatus("d0", "decode", "inc", 1, EngineFigures(num_blocks=8), block_seq=5)

        async def cached_hashes(self):
            calls.append(("resync", time.monotonic()))
            await asyncio.sleep(0.3)
            calls.append(("resynced", time.monotonic()))
            return CacheSnapshot(5, [11])

    async def go():
        r = Router(RouterConfig(), None, (2,), 4096)
        r.workers.add("decode", Gapped())
        for _ in range(8):
            await r.workers.refresh(wait_s=0.05)
            await asyncio.sleep(0.05)
        await r.workers.close()
        return r
    r = asyncio.run(go())
    start = next(t for k, t in calls if k == "resync")
    end = next(t for k, t in calls if k == "resynced")
    assert not [t for k, t in calls if k == "status" and start < t < end]     # no poll beside it
    assert r.index.match([11]) == {"d0": 1} and r.index.is_exact("d0")


def test_cluster_worker_status_names_a_hung_worker_instead_of_hanging():
    """Cluster.worker_status (the benchmarks' and fault tests' snapshot) gave no bound: one hung actor hung it."""
    async def go():
        c = SimpleNamespace(actors={"decode-0": Handle("decode-0", False, []),
                                    "decode-1": Handle("decode-1", True, [])})
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=r"no status within 0.3s from decode-1$"):
            await Cluster.worker_status(c, timeout_s=0.3)
        late = time.monotonic() - t0
        c.actors.pop("decode-1")
        return late, await Cluster.worker_status(c, timeout_s=0.3)

    late, ok = asyncio.run(go())
    assert late < 2.0 and list(ok) == ["decode-0"] and ok["decode-0"].worker_id == "decode-0"


class Gap:
    """A decode worker whose every poll answers after `delay_s` and reports event 5 with none sent (a gap:
    its index entry needs a resync); `hang_on_resync`: it stops answering anything once the resync is asked."""
    worker_id = "d0"

    def __init__(self, delay_s=0.0, hang_on_resync=False):
        self.delay_s, self.hang_on_resync, self.hung = delay_s, hang_on_resync, False
        self.status, self.cached_hashes = Method(self._status), Method(self._snap)
        self.polls = self.resyncs = 0

    async def _status(self, drain=False):
        self.polls += 1
        await asyncio.sleep(3600 if self.hung else self.delay_s)
        return WorkerStatus.of("d0", "decode", "inc", 1, FIG, (5, ()))

    async def _snap(self):
        self.resyncs += 1
        if self.hang_on_resync:
            self.hung = True
            await asyncio.sleep(3600)
        return CacheSnapshot(5, [11])


def test_a_worker_whose_poll_answers_just_past_the_loop_s_wait_still_gets_its_resync():
    """Each refresh respawned a poll that had ended since the last one before its resync check, which then
    always saw a poll out: a worker polled in 1-2x the status interval was never resynced, stayed approximate
    and its cache hits faded to nothing. Its resync now comes first."""
    w = Gap(delay_s=0.15)

    async def go():
        r = Router(RouterConfig(status_interval_s=0.1), None, (2,), 4096)
        r.add_worker("decode", DecodeClient("d0", w, Timeouts(health_s=1.0)))
        poll = asyncio.ensure_future(Cluster._poll(SimpleNamespace(router=r)))     # the real status loop
        await asyncio.sleep(2.0)
        poll.cancel()
        await r.workers.close()
        return r
    r = asyncio.run(go())
    assert w.resyncs >= 1 and w.polls >= 3 and r.index.needs_resync() == [] and r.index.match([11]) == {"d0": 1}


def test_a_worker_that_hangs_while_its_resync_is_out_is_unhealthy_within_the_health_timeout():
    """It is not polled while its resync is out, and the resync's bound is control_s (10 s): a hung worker kept
    its placements for control_s + health_s. The resync stands for the poll's health check now."""
    w = Gap(hang_on_resync=True)

    async def go():
        r = Router(RouterConfig(status_interval_s=0.1), None, (2,), 4096)
        r.add_worker("decode", DecodeClient("d0", w, Timeouts(health_s=0.5, control_s=30.0)))
        poll = asyncio.ensure_future(Cluster._poll(SimpleNamespace(router=r)))
        while not w.hung:
            await asyncio.sleep(0.01)
        t0 = time.monotonic()
        while r.workers.loads["d0"].healthy and time.monotonic() - t0 < 10:
            await asyncio.sleep(0.02)
        took = time.monotonic() - t0
        poll.cancel()
        await r.workers.close()
        return took
    assert asyncio.run(go()) < 2.0


def test_a_resync_that_keeps_failing_does_not_stop_the_worker_s_polls():
    """Resync and poll take turns while the index needs a resync: a snapshot that always fails must not keep
    the worker from being polled (its health, its loads)."""
    w = Gap()

    async def broken():
        w.resyncs += 1
        raise RuntimeError("snapshot failed")
    w.cached_hashes = SimpleNamespace(remote=lambda: asyncio.ensure_future(broken()))

    async def go():
        r = Router(RouterConfig(status_interval_s=0.05), None, (2,), 4096)
        r.add_worker("decode", DecodeClient("d0", w, Timeouts(health_s=1.0)))
        poll = asyncio.ensure_future(Cluster._poll(SimpleNamespace(router=r)))
        await asyncio.sleep(1.0)
        poll.cancel()
        await r.workers.close()
        return r
    r = asyncio.run(go())
    assert w.resyncs >= 3 and w.polls >= 3 and r.workers.loads["d0"].healthy and r.index.needs_resync() == ["d0"]
