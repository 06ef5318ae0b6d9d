"""WorkerRegistry.loads_of: the role's live WorkerLoads in registration order, a new list per call,
following add / remove (its list is kept between membership changes); a removed worker stays out of the index."""
import asyncio

import pytest
from prometheus_client import CollectorRegistry

from pdcluster.messages import CacheSnapshot, EngineFigures, WorkerStatus
from pdcluster.router.config import RouterConfig, Timeouts
from pdcluster.router.metrics import RouterMetrics
from pdcluster.router.prefix_index import PrefixIndex
from pdcluster.router.registry import WorkerRegistry
from pdcluster.router.telemetry import Telemetry

pytestmark = pytest.mark.timeout(60)


class _Client:
    def __init__(self, worker_id: str):
        self.worker_id = worker_id


def test_loads_of_follows_membership_and_hands_out_new_lists():
    reg = WorkerRegistry(RouterConfig(), RouterMetrics(CollectorRegistry()), PrefixIndex(), Telemetry())
    for wid, role in (("p1", "prefill"), ("d0", "decode"), ("p0", "prefill")):
        reg.add(role, _Client(wid))
    ps = reg.loads_of("prefill")
    assert [w.worker_id for w in ps] == ["p1", "p0"] and all(w is reg.loads[w.worker_id] for w in ps)
    ps.append(ps[0])                                        # a caller's list is its own
    again = reg.loads_of("prefill")
    assert again is not ps and [w.worker_id for w in again] == ["p1", "p0"]
    reg.loads["p1"].in_flight = 3                           # the same objects: field writes show
    assert reg.loads_of("prefill")[0].in_flight == 3
    reg.add("prefill", _Client("p2"))
    assert [w.worker_id for w in reg.loads_of("prefill")] == ["p1", "p0", "p2"]
    reg.remove("p1")
    assert [w.worker_id for w in reg.loads_of("prefill")] == ["p0", "p2"]
    assert [w.worker_id for w in reg.loads_of("decode")] == ["d0"]
    reg.remove("d0")
    assert reg.loads_of("decode") == []
    reg.add("decode", _Client("d0"))                        # back, as a new WorkerLoad
    assert reg.loads_of("decode")[0] is reg.loads["d0"]


def test_a_charge_counts_on_the_worker_and_tells_its_watchers():
    """charge(+1 / -1): in_flight and queued_tokens move, the pool's sent tokens rise on +1 only, and
    a watcher (the cost model's dirty set) hears of the worker each time."""
    reg = WorkerRegistry(RouterConfig(), RouterMetrics(CollectorRegistry()), PrefixIndex(), Telemetry())
    reg.add("prefill", _Client("p0"))
    w, dirty = reg.loads["p0"], set()
    w.watch(dirty)
    reg.charge("p0", 700, +1)
    assert (w.in_flight, w.queued_tokens, reg.sent_tokens["prefill"]) == (1, 700, 700) and dirty == {id(w)}
    dirty.clear()
    reg.charge("p0", 700, -1)
    assert (w.in_flight, w.queued_tokens, reg.sent_tokens["prefill"]) == (0, 0, 700) and dirty == {id(w)}
    reg.charge("gone", 5, +1)                               # an unknown worker: nothing counted
    assert reg.sent_tokens["prefill"] == 700


def test_ready_needs_a_healthy_worker_of_each_role_it_uses():
    """Router.ready (gRPC health): registered is not enough; a pool whose workers are all unhealthy
    (missed status polls: dead or hung) leaves the router not ready."""
    reg = WorkerRegistry(RouterConfig(), RouterMetrics(CollectorRegistry()), PrefixIndex(), Telemetry())
    assert not reg.ready()
    reg.add("prefill", _Client("p0"))
    reg.add("decode", _Client("d0"))
    reg.add("decode", _Client("d1"))
    assert reg.ready()
    reg.loads["d0"].healthy = False
    assert reg.ready()                                      # d1 still serves
    reg.loads["d1"].healthy = False
    assert not reg.ready()
    reg.loads["d1"].healthy = True
    reg.loads["p0"].healthy = False
    assert not reg.ready()                                  # prefills go remote: a prefill worker is needed
    local = WorkerRegistry(RouterConfig(remote_prefill=False), RouterMetrics(CollectorRegistry()), PrefixIndex(),
                           Telemetry())
    local.add("decode", _Client("d0"))
    assert local.ready()


class _Resyncing:
    """A worker whose status shows a gap in its block events (seq 5, none sent): the router resyncs it, and the
    snapshot RPC takes 50 ms."""
    t = Timeouts()

    def __init__(self, worker_id: str):
        self.worker_id = worker_id

    async def status(self, drain_events=True):
        return WorkerStatus(self.worker_id, "decode", "inc", 1, EngineFigures(num_blocks=8), block_seq=5)

    async def cached_hashes(self):
        await asyncio.sleep(0.05)
        return CacheSnapshot(5, [11, 12], disk=[13])


def test_a_worker_removed_while_its_resync_is_out_stays_out_of_the_index():
    index = PrefixIndex()
    reg = WorkerRegistry(RouterConfig(), RouterMetrics(CollectorRegistry()), index, Telemetry())
    reg.add("decode", _Resyncing("d0"))
    reg.add("decode", _Resyncing("d1"))

    async def main():
        async def retire_d1():                              # retire's last step, while refresh awaits the snapshots
            await asyncio.sleep(0.01)
            reg.remove("d1")
        await asyncio.gather(reg.refresh(), retire_d1())

    asyncio.run(main())
    assert "d1" not in reg.loads
    assert index.workers == ["d0"] and index.holders(11) == {"d0"} and index.match([11, 12]) == {"d0": 2}
    assert "d1" not in index.needs_resync()


def test_a_drain_waits_for_the_pulls_the_worker_serves():
    """A draining holder still serves peer pulls ordered from it (charged as serving_s). Before, the drain
    waited for its requests only, and stopped it mid-pull (the puller then recomputed). A rounding residue of
    the float charge does not hold the drain."""
    reg = WorkerRegistry(RouterConfig(), RouterMetrics(CollectorRegistry()), PrefixIndex(), Telemetry())
    reg.add("decode", _Client("d0"))
    w = reg.loads["d0"]
    w.serving_s = 0.4                                       # a pull out
    stopped = []

    async def stop():
        stopped.append(w.serving_s)

    async def main():
        async def pull_done():
            await asyncio.sleep(0.2)
            w.serving_s = 0.30000000000000004 - 0.1 - 0.2   # the charge taken back: ~5.6e-17 left
        return (await asyncio.gather(reg.retire("d0", stop, drain_timeout_s=5.0), pull_done()))[0]
    out = asyncio.run(main())
    assert not out["stopped_busy"] and 0.15 < out["waited_s"] < 2.0 and stopped == [w.serving_s]
