"""engine/engine_thread.py and the counters a worker reports while its engine waits: the thread survives a
failed step whose recovery fails too, a thread that died is reported at once (status raises: the router
marks the worker unhealthy), an engine with work it cannot schedule yet neither spins nor looks stuck to
a stream's heartbeats, and the waiting queue can be summed off the engine thread while it changes.
Stand-in engines, and the real Scheduler; no model."""
import collections
import sys
import threading
import time

import pytest

from pdcluster.engine.config import SchedulerConfig
from pdcluster.engine.engine_thread import EngineThread
from pdcluster.engine.kv_cache_manager import KVCacheManager
from pdcluster.engine.llm_engine import LLMEngine, StepStats
from pdcluster.engine.request import Request, Status
from pdcluster.engine.sampling_params import SamplingParams
from pdcluster.engine.scheduler import Scheduler

pytestmark = pytest.mark.timeout(60)


class Req:
    def __init__(self, rid):
        self.request_id, self.status = rid, Status.RUNNING


class Failing:
    """Every step fails; aborting request "a" fails too (state a failed step left half-updated)."""
    def __init__(self):
        self.running, self.waiting = [], []
        self.scheduler = self

    def has_work(self):
        return bool(self.running or self.waiting)

    def queued(self):
        return self.running + self.waiting

    def step(self):
        raise RuntimeError("step failed")

    def abort(self, rid):
        if rid == "a":
            raise AssertionError("block 17 freed twice")
        r = next(r for r in self.running + self.waiting if r.request_id == rid)
        (self.running if r in self.running else self.waiting).remove(r)
        return r


def test_a_failed_recovery_neither_ends_the_thread_nor_skips_the_other_requests():
    """Before, the abort that raised ended the loop: b never heard its end, every later command waited
    out its timeout, and status went on answering."""
    et = EngineThread(Failing())
    seen = []

    def add(e):
        e.running.append(Req("a"))
        e.waiting.append(Req("b"))
        et.listeners["b"] = lambda o: seen.append(o.finished)
    et.run(add)
    deadline = time.monotonic() + 5
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen == [True] and et.alive
    assert et.run(lambda e: "still here", timeout=5) == "still here"
    et.stop()


class Broken(Failing):
    """has_work raises once asked to: a bug in the loop itself, outside any step."""
    broken = False

    def has_work(self):
        if self.broken:
            raise KeyError("bug")
        return super().has_work()


def test_a_dead_engine_thread_is_reported_at_once():
    eng = Broken()
    et = EngineThread(eng)
    et.run(lambda e: setattr(e, "broken", True))
    et._thread.join(5)
    assert isinstance(et.died, KeyError)
    with pytest.raises(RuntimeError, match="engine thread died"):
        et.run(lambda e: None)
    with pytest.raises(RuntimeError, match="engine thread died"):
        et.check_alive()


def waiting_engine() -> LLMEngine:
    """A pool of 64 blocks held by a remote prefill's reservation (60 blocks) and a local prompt of 10
    blocks waiting for room: work the engine cannot schedule until the reservation ends."""
    from pdcluster.kv_transfer.pull import PullConnector
    from pdcluster.kv_transfer.receiver import KVReceiver
    eng = LLMEngine.__new__(LLMEngine)
    eng.scheduler = Scheduler(SchedulerConfig(), KVCacheManager(64, 16), 4096)
    eng.scheduler.connector = PullConnector(KVReceiver(), 30, 16, "", "decode-0")    # a decode worker's
    eng.stats, eng.detoks, eng.idle_polls = StepStats(), {}, 0
    eng.kv = eng.scheduler.kv
    p = SamplingParams(max_tokens=8)
    eng.scheduler.add_remote(Request(list(range(1, 60 * 16)), p, "remote-1", None, (2,), 16))
    eng.scheduler.add(Request(list(range(5000, 5000 + 10 * 16)), p, "local-1", None, (2,), 16))
    return eng


def test_an_engine_waiting_for_room_polls_gently_and_its_progress_counter_moves():
    """Before, step() returned at once: the thread spun at a whole core, and the step count a stream's
    heartbeats carry stood still, so the router took the waiting worker for a stuck one after
    stream_gap_s and migrated its requests."""
    eng = waiting_engine()
    calls = [0]
    real = eng.step
    eng.step = lambda: (calls.__setitem__(0, calls[0] + 1), real())[1]
    et = EngineThread(eng)
    c0 = time.process_time()
    time.sleep(1.0)
    cpu = time.process_time() - c0
    et.stop()
    assert eng.stats.steps == 0 and eng.idle_polls > 100       # alive and waiting: the counter moves
    assert calls[0] < 2000 and cpu < 0.6                        # ~1,000 polls a second, not a spin


def test_the_waiting_queue_sums_while_the_engine_thread_changes_it():
    """A status poll reads num_waiting_tokens off the engine thread. Before, a deque mutated mid-sum
    raised RuntimeError, the poll failed and the router counted the worker unhealthy."""
    s = Scheduler(SchedulerConfig(), KVCacheManager(64, 16), 4096)
    reqs = [Request(list(range(1, 17)), SamplingParams(max_tokens=2), f"r{i}", None, (2,), 16) for i in range(50)]
    s.waiting = collections.deque(reqs)
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            s.waiting.rotate(1)                             # one C call: the queue always holds all 50
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    t = threading.Thread(target=churn)
    t.start()
    try:
        errors = 0
        for _ in range(20_000):
            try:
                assert s.num_waiting_tokens == 50 * 16
            except RuntimeError:
                errors += 1
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(old)
    assert errors == 0


def test_an_engine_whose_steps_keep_failing_is_reported_until_it_has_not_failed_for_a_while(monkeypatch):
    """Each failed step aborts its batch and empties the worker, which then drew the next requests (the
    policies prefer an idle worker) to the same end while status said healthy. Now a status poll raises
    after FAILING_STEPS failures in a row (the router marks the worker unhealthy) until FAILING_FOR_S
    has passed since the last; a step that succeeds ends it at once. Commands still run meanwhile."""
    eng = Failing()
    et = EngineThread(eng)
    for k in range(3):
        et.run(lambda e, k=k: e.running.append(Req(f"r{k}")))
        deadline = time.monotonic() + 5
        while et.failed_steps < k + 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        if k < 2:
            et.check_healthy()                                  # one or two failures: still healthy
    with pytest.raises(RuntimeError, match="engine steps failing: the last 3 failed"):
        et.check_healthy()
    assert et.run(lambda e: "commands run", timeout=5) == "commands run"
    monkeypatch.setattr(EngineThread, "FAILING_FOR_S", 0.0)    # that long without a failure: healthy again
    et.check_healthy()
    et.stop()


def test_a_stopped_engine_thread_ends_its_waiters_at_once():
    """alive stayed True after stop(): a prefill waiting on check_alive looped forever, a decode stream kept
    sending heartbeats that never moved, and every later command waited out its 60 s timeout."""
    et = EngineThread(Failing())
    blocker = threading.Event()
    queued = et.call(lambda e: blocker.wait(5))          # holds the thread while stop() is asked
    stopper = threading.Thread(target=et.stop)
    stopper.start()
    deadline = time.monotonic() + 5
    while not et._stop.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)                                    # stop's sentinel is queued: this one comes behind it
    later = et.call(lambda e: "never")
    blocker.set()
    stopper.join(10)
    assert queued.result(5) is True and not et.alive
    with pytest.raises(RuntimeError, match="engine stopped"):
        later.result(5)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="engine stopped"):
        et.run(lambda e: None)
    with pytest.raises(RuntimeError, match="engine stopped"):
        et.call(lambda e: None).result(5)
    with pytest.raises(RuntimeError, match="engine stopped"):
        et.check_healthy()
    assert time.monotonic() - t0 < 1.0
