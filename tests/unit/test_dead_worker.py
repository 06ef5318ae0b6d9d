"""A worker whose actor is dead for good (Ray restarts spent, or killed without restart) leaves the
router and the pool: its poll's ActorDiedError reads as WorkerGone, the cluster confirms it with a
fresh call and forgets it. Before, it stayed registered and unhealthy for good, holding a pool slot
under max_replicas (PoolMetrics.held), so the pool could never get back to its size. Stand-in actor
handles raising Ray's own exception types under the real Router, DecodeClient, status loop and Cluster."""
import asyncio
import time
from types import SimpleNamespace

import pytest
import ray.exceptions

from pdcluster.deploy import scaling
from pdcluster.deploy.config import ClusterConfig
from pdcluster.deploy.launch import Cluster
from pdcluster.deploy.pool_config import PoolsSection
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


class Spawner:
    """Cluster.add_replica's stand-in (no Ray): registers make(worker id) as the next decode worker, as
    add_replica does once a spawned actor has loaded; its first `fail` calls raise instead, as a start
    that times out. `calls`: monotonic time of each call."""
    def __init__(self, c, make=lambda wid: Handle(wid, False, []), fail=0):
        self.c, self.make, self.fail, self.calls = c, make, fail, []

    async def __call__(self, role):
        self.calls.append(time.monotonic())
        if len(self.calls) <= self.fail:
            raise RuntimeError("not placed and loaded in time")
        wid = f"{role}-{self.c._next_index[role]}"
        self.c._next_index[role] += 1
        self.c.actors[wid] = h = self.make(wid)
        self.c.router.add_worker(role, DecodeClient(wid, h, self.c.timeouts))
        return wid


def run(handles: dict, seconds: float, setup=lambda c: None):
    """A cluster (not started: no Ray) whose router polls these decode handles for `seconds`;
    replacements come from a Spawner (setup(c) may swap it or set an autoscaler)."""
    async def go():
        c = Cluster(ClusterConfig())
        c.router = Router(RouterConfig(status_interval_s=0.1), None, (2,), 4096)
        c.timeouts = Timeouts(health_s=1.0)
        c._next_index["decode"] = len(handles)
        c.add_replica = Spawner(c)
        setup(c)
        for wid, h in handles.items():
            c.actors[wid] = h
            c.router.add_worker("decode", DecodeClient(wid, h, c.timeouts))
        c.router.workers.on_gone = c.forget_dead
        poll = asyncio.ensure_future(c._poll())
        await asyncio.sleep(seconds)
        poll.cancel()
        metrics = c.pool_metrics()["decode"]
        await c.stop_replacing()
        await c.router.workers.close()
        return c, metrics
    return asyncio.run(go())


def test_a_dead_worker_is_confirmed_removed_and_frees_its_pool_slot():
    dead = Dying("decode-0", 2, ray.exceptions.ActorDiedError())
    auto = lambda c: setattr(c, "autoscaler", SimpleNamespace(policies={"decode": None}))   # it sizes the pool
    c, m = run({"decode-0": dead, "decode-1": Handle("decode-1", False, [])}, 1.0, auto)
    assert "decode-0" not in c.actors and "decode-0" not in c.router.workers.loads
    assert m.replicas == 1 and m.held == 1                  # no slot held for it under max_replicas
    assert c.router.metrics.dead.labels("decode")._value.get() == 1
    assert dead.calls <= 4      # 2 answers, the poll that found it dead, the confirming call: then left alone
    assert c.add_replica.calls == []                        # the autoscaler replaces it, by its rules


def test_a_dead_worker_of_a_pool_no_autoscaler_sizes_is_replaced_at_once():
    dead = Dying("decode-0", 2, ray.exceptions.ActorDiedError())
    c, m = run({"decode-0": dead, "decode-1": Handle("decode-1", False, [])}, 1.0)
    assert set(c.router.workers.decode) == set(c.actors) == {"decode-1", "decode-2"}
    assert m.replicas == m.held == 2 and len(c.add_replica.calls) == 1
    assert c.router.workers.loads["decode-2"].healthy
    assert c.free_tier_keys["decode"] == ["decode-0"]       # its disk tier, for the next replica add_replica starts


def test_replacements_that_die_young_or_fail_to_start_back_off(monkeypatch):
    """Each replacement dies at its first poll: the next one waits twice as long as the last (from
    BACKOFF_MIN_S), so a worker that crashes on start does not spin. Failed starts back off alike."""
    monkeypatch.setattr(scaling, "BACKOFF_MIN_S", 0.1)
    dies = lambda wid: Dying(wid, 0, ray.exceptions.ActorDiedError())
    c, _ = run({"decode-0": dies("decode-0")}, 2.5, lambda c: setattr(c, "add_replica", Spawner(c, dies)))
    t = c.add_replica.calls
    gaps = [b - a for a, b in zip(t, t[1:])]
    assert len(t) >= 3, t
    for k, gap in enumerate(gaps):                          # detection takes a poll (0.1 s) on top
        assert gap >= 0.1 * 2 ** k, gaps
    assert len(t) <= 6, t                                   # 0, .1, .2, .4, .8 s waits; without them ~12

    c, m = run({"decode-0": dies("decode-0")}, 1.5, lambda c: setattr(c, "add_replica", Spawner(c, fail=2)))
    t = c.add_replica.calls
    assert len(t) == 3 and t[1] - t[0] >= 0.1 and t[2] - t[1] >= 0.2, t    # failed twice, retried later
    assert set(c.router.workers.decode) == {"decode-1"} and m.replicas == 1


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


def test_a_worker_gone_for_good_leaves_its_disk_tier_to_the_next_replica(monkeypatch):
    """Each worker's disk tier was a subdirectory named by its id, which is never reused: every replaced or
    retired worker left its directory behind (disk use grew with each one started). A replica now takes
    over a key such a worker left, so it comes back warm and the directories stay as many as the workers."""
    from pdcluster.decode_worker import actor as decode_actor
    spawned = []
    monkeypatch.setattr(decode_actor, "spawn", lambda wid, *a, **kw: spawned.append((wid, kw.get("tier_key"))))
    c = Cluster(ClusterConfig())
    c.worker_kwargs, c.engine_kwargs = {"decode": {}}, {"decode": {}}
    assert c._take_tier_key("decode", "decode-0") == "decode-0"
    c._spawn("decode", "decode-0", "decode-0")
    c._leave_tier_key("decode", "decode-0")                 # dead (forget_dead) or retired (remove_replica)
    assert c._take_tier_key("decode", "decode-2") == "decode-0"
    c._spawn("decode", "decode-2", "decode-0")
    assert spawned == [("decode-0", None), ("decode-2", "decode-0")]   # the worker builds its tiers under it
    assert c._take_tier_key("decode", "decode-3") == "decode-3"       # none left: its own
    c._leave_tier_key("decode", "decode-2")
    assert c.free_tier_keys["decode"] == ["decode-0"] and "decode-2" not in c.tier_keys


def test_two_crash_loops_back_off_apart(monkeypatch):
    """Each chain of replacements backs off on its own. Before, the back-off was one per pool, keyed to its
    last replacement: with two workers dying at once, the other chain's young deaths were replaced at once
    (and reset the wait to 0), and any old worker's death reset a crash loop's wait too."""
    monkeypatch.setattr(scaling, "BACKOFF_MIN_S", 0.1)
    delays = []
    replace = scaling.Scaling._replace

    async def spy(self, role, dead, delay):
        delays.append(delay)
        return await replace(self, role, dead, delay)
    monkeypatch.setattr(scaling.Scaling, "_replace", spy)
    dies = lambda wid: Dying(wid, 0, ray.exceptions.ActorDiedError())
    run({"decode-0": dies("decode-0"), "decode-1": dies("decode-1")}, 2.5,
        lambda c: setattr(c, "add_replica", Spawner(c, dies)))
    assert delays.count(0.0) == 2, delays                   # the two first deaths only
    assert sorted(delays)[2:4] == [0.1, 0.1], delays        # each chain's first young death: the least wait


def test_an_old_workers_death_leaves_a_crash_loops_wait_alone():
    async def go():
        c = Cluster(ClusterConfig())
        c.add_replica = lambda role: asyncio.sleep(0, "decode-9")
        c.replaced["decode-7"] = (time.monotonic(), 8.0)    # a crash loop: decode-7 joined after an 8 s wait
        waits = []
        c._replace = lambda role, dead, delay: waits.append((dead, delay)) or asyncio.sleep(0)
        c.replace_dead("decode", "decode-1")                # up for days: replaced at once
        c.replace_dead("decode", "decode-7")                # died young again: twice its chain's wait
        await c.stop_replacing()
        return waits
    assert asyncio.run(go()) == [("decode-1", 0.0), ("decode-7", 16.0)]


def test_a_spawn_ray_refuses_gives_its_disk_tier_key_back(monkeypatch):
    """add_replica took a key before spawning the actor, outside the try that gives it back: a spawn that
    raised (Ray refusing the actor) left the key held by no worker, one more leaked at each retry."""
    c = Cluster(ClusterConfig())
    c.free_tier_keys["decode"] = ["decode-0"]

    def refuse(role, wid, key):
        raise RuntimeError("the GCS is unreachable")
    monkeypatch.setattr(c, "_spawn", refuse)
    with pytest.raises(RuntimeError, match="unreachable"):
        asyncio.run(c.add_replica("decode"))
    assert c.tier_keys == {} and c.free_tier_keys["decode"] == ["decode-0"] and c.starting == {}


def test_a_replica_that_never_loads_is_killed_off_the_event_loop(monkeypatch):
    """ray.kill waits on the GCS's reply: on the router's loop a slow GCS stalled every client. add_replica's
    timeout now returns at once and the kill runs on a thread (still done: the actor does not outlive it)."""
    import threading
    c = Cluster(ClusterConfig(pools=PoolsSection(replica_start_timeout_s=0.1)))
    never = SimpleNamespace(status=SimpleNamespace(remote=lambda: asyncio.sleep(60)))
    monkeypatch.setattr(c, "_spawn", lambda role, wid, key: never)
    killed, main = [], threading.get_ident()

    def slow_kill(h):
        time.sleep(0.5)                                      # a slow GCS
        killed.append((h, threading.get_ident()))
    monkeypatch.setattr(ray, "kill", slow_kill)

    async def go():
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="not placed and loaded within"):
            await c.add_replica("decode")
        took = time.monotonic() - t0
        for _ in range(100):                                # the kill lands later, on its thread
            if killed:
                break
            await asyncio.sleep(0.02)
        return took
    took = asyncio.run(go())
    assert took < 0.4, took                                  # 0.1 s timeout, not + the 0.5 s kill
    assert [h for h, _ in killed] == [never] and killed[0][1] != main
    assert c.starting == {} and c.tier_keys == {}


def test_a_cancel_while_a_failed_start_cleans_up_keeps_the_cleanup_and_the_error(monkeypatch):
    """serve's Ctrl-C cancels a start in progress; one that came while a start that had already failed was
    stopping what it had started cut that stop() short and replaced the start's error with the cancel."""
    from pdcluster.deploy.launch import StartFailed
    c = Cluster(ClusterConfig())
    state = []

    async def fail():
        raise StartFailed("worker died while loading")

    async def stop():
        state.append("stopping")
        await asyncio.sleep(0.3)
        state.append("stopped")
    monkeypatch.setattr(c, "_start", fail)
    monkeypatch.setattr(c, "stop", stop)

    async def go():
        t = asyncio.ensure_future(c.start())
        while not state:
            await asyncio.sleep(0.01)
        t.cancel()                                           # inside stop()
        with pytest.raises(StartFailed, match="died while loading"):
            await t
    asyncio.run(go())
    assert state == ["stopping", "stopped"]
