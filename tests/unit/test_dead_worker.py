"""A worker whose actor is dead for good (Ray restarts spent, or killed without restart) leaves the
router and the pool: its poll's ActorDiedError reads as WorkerGone, the cluster confirms it with a
fresh call and forgets it. Before, it stayed registered and unhealthy for good, holding a pool slot
under max_replicas (PoolMetrics.held), so the pool could never get back to its size. Stand-in actor
handles raising Ray's own exception types under the real Router, DecodeClient, status loop and Cluster."""
import asyncio

import pytest
import ray.exceptions

from pdcluster.deploy.config import ClusterConfig
from pdcluster.deploy.launch import Cluster
from pdcluster.router.config import RouterConfig, Timeouts
from pdcluster.router.errors import WorkerGone, WorkerLost
from pdcluster.router.lifecycle import Router
from pdcluster.router.workers import DecodeClient
from tests.unit.test_registry_polls import Handle, Method

pytestmark = pytest.mark.timeout(60)


class Dying(Handle):
    """Answers `answers` polls, then fails every call with `error` (a Ray exception type)."""
    def __init__(self, wid, answers, error):
        super().__init__(wid, False, [])
        self.left, self.error, self.calls = answers, error, 0
        self.status = Method(self._dying)

    async def _dying(self, drain=False):
        self.calls += 1
        if self.left <= 0:
            raise self.error
        self.left -= 1
        return await self._status(drain)


def run(handles: dict, seconds: float):
    """A cluster (not started: no Ray) whose router polls these decode handles for `seconds`."""
    async def go():
        c = Cluster(ClusterConfig())
        c.router = Router(RouterConfig(status_interval_s=0.1), None, (2,), 4096)
        c.timeouts = Timeouts(health_s=1.0)
        for wid, h in handles.items():
            c.actors[wid] = h
            c.router.add_worker("decode", DecodeClient(wid, h, c.timeouts))
        c.router.workers.on_gone = c.forget_dead
        poll = asyncio.ensure_future(c._poll())
        await asyncio.sleep(seconds)
        poll.cancel()
        metrics = c.pool_metrics()["decode"]
        await c.router.workers.close()
        return c, metrics
    return asyncio.run(go())


def test_a_dead_worker_is_confirmed_removed_and_frees_its_pool_slot():
    dead = Dying("decode-0", 2, ray.exceptions.ActorDiedError())
    c, m = run({"decode-0": dead, "decode-1": Handle("decode-1", False, [])}, 1.0)
    assert "decode-0" not in c.actors and "decode-0" not in c.router.workers.loads
    assert m.replicas == 1 and m.held == 1                  # no slot held for it under max_replicas
    assert c.router.metrics.dead.labels("decode")._value.get() == 1
    assert dead.calls <= 4      # 2 answers, the poll that found it dead, the confirming call: then left alone


def test_a_restarting_or_hung_worker_stays_registered():
    """ActorUnavailableError (a restart under way) and a missed poll are WorkerLost, not WorkerGone:
    the worker stays (unhealthy) and rejoins when it answers."""
    restarting = Dying("decode-0", 1, ray.exceptions.ActorUnavailableError("restarting", b"\0" * 16))
    c, m = run({"decode-0": restarting, "decode-1": Handle("decode-1", True, [])}, 1.5)   # past health_s
    assert set(c.actors) == set(c.router.workers.loads) == {"decode-0", "decode-1"}
    assert m.replicas == 0 and m.held == 2
    assert c.router.metrics.dead.labels("decode")._value.get() == 0


def test_a_dead_verdict_the_fresh_call_contradicts_keeps_the_worker():
    """The poll's ActorDiedError is confirmed by a fresh call before anything is removed: one that
    answers (the actor is back) keeps the worker."""
    class Flaky(Dying):
        async def _dying(self, drain=False):
            self.calls += 1
            if self.calls == 2:          # only the second poll fails
                raise ray.exceptions.ActorDiedError()
            return await self._status(drain)
    flaky = Flaky("decode-0", 0, None)
    c, _ = run({"decode-0": flaky}, 1.0)
    assert "decode-0" in c.actors and c.router.workers.loads["decode-0"].healthy
    assert flaky.calls >= 4


def test_ray_errors_map_to_worker_gone_only_for_a_dead_actor():
    async def status_of(error):
        with pytest.raises(WorkerLost) as e:
            await DecodeClient("d", Dying("d", 0, error), Timeouts()).status()
        return type(e.value)
    assert asyncio.run(status_of(ray.exceptions.ActorDiedError())) is WorkerGone
    unavailable = ray.exceptions.ActorUnavailableError("restarting", b"\0" * 16)
    assert asyncio.run(status_of(unavailable)) is WorkerLost
