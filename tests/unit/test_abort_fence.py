"""An abort that overtakes its request's call (each worker RPC runs on its own thread) fences the id:
the late reserve, prefill or local prefill is refused and holds nothing (pdcluster/abort_fence.py).
The router's placement sends each retry under a fresh id, so a fenced one is never reused. The CI
failure this fixes: an n=2 request whose second choice was refused (429) cancelled the first mid-
reserve; its abort ran first on the decode worker, the reserve after it, and the reservation stayed
held until its TTL."""
import asyncio

import pytest

from pdcluster.abort_fence import AbortFence, RequestAborted
from pdcluster.engine.sampling_params import SamplingParams
from pdcluster.messages import PrefillResult, Reservation
from pdcluster.router.config import RouterConfig
from pdcluster.router.cost_config import CostConfig
from pdcluster.router.errors import WorkerLost
from pdcluster.router.lifecycle import Router
from pdcluster.router.lifecycle.place import place
from tests.unit.kv_workers import GREEDY, pair, remote

IDS = list(range(1, 60))


def test_the_fence_refuses_an_id_until_its_ttl_and_keeps_at_most_max_ids():
    f = AbortFence(ttl_s=10.0, max_ids=3)
    f.add("a", now=0.0)
    with pytest.raises(RequestAborted, match="aborted before it arrived"):
        f.check("a", now=9.0)
    f.check("a", now=10.5)                  # past its TTL: an id nobody will send again is let go
    f.check("b", now=1.0)                   # never aborted
    for i, rid in enumerate("bcd"):
        f.add(rid, now=1.0 + i)
    assert len(f) == 3                      # "a" went first
    f.add("e", now=20.0)                    # sweeps the expired ones too
    assert len(f) == 1
    f.check("b", now=20.0)
    with pytest.raises(RequestAborted):
        f.check("e", now=20.0)


@pytest.fixture(scope="module")
def workers():
    p, d = pair("tcp")
    yield p, d
    p.close()
    d.close()


def free(w) -> tuple[int, int]:
    st = w.status()
    return st.engine.free_blocks, st.reserved


def test_an_abort_before_its_reserve_or_generate_leaves_nothing_on_the_decode_worker(workers):
    p, d = workers
    idle = free(d)
    d.abort("late")                         # the abort's RPC thread won the race
    with pytest.raises(RequestAborted):
        d.reserve("late", IDS, GREEDY)
    with pytest.raises(RequestAborted):
        d.generate("late", IDS, GREEDY)
    assert free(d) == idle and "late" not in d.engine_thread.listeners
    # control: an abort that finds its reservation frees it and fences nothing; other ids are served
    d.reserve("held", IDS, GREEDY)
    assert free(d) != idle
    d.abort("held")
    assert free(d) == idle and len(d.fence) == 1
    toks, _ = remote(p, d, "fresh", IDS)
    assert len(toks) == GREEDY.max_tokens and free(d) == idle


def test_an_abort_before_its_prefill_leaves_nothing_on_the_prefill_worker(workers):
    p, d = workers
    idle = free(p)
    p.abort("late-p")
    with pytest.raises(RequestAborted):
        p.prefill("late-p", IDS, GREEDY, None)
    assert free(p) == idle and p.in_flight == 0
    assert p.prefill("ok-p", IDS, GREEDY, None).first_token >= 0


class Decode:
    """A decode worker client: records each reserve's id; the first one called is lost mid-reserve."""
    calls: list = []

    def __init__(self, wid):
        self.worker_id = wid

    async def reserve(self, rid, *a):
        Decode.calls.append((self.worker_id, rid))
        if len(Decode.calls) == 1:
            raise WorkerLost(self.worker_id, "no answer")
        return Reservation("127.0.0.1:1", self.worker_id, 0, [0, 1, 2, 3], 0)


class Prefill:
    def __init__(self, wid):
        self.worker_id, self.calls = wid, []

    async def prefill(self, rid, *a):
        self.calls.append(rid)
        return PrefillResult(7, 0, 0.01, 0, 0.0, 0.0, "none")


def test_each_placement_try_after_the_first_goes_out_under_a_fresh_id():
    r = Router(RouterConfig(policy="cost-model", status_interval_s=0.01, block_size=16), None, (2,), 4096,
               cost_config=CostConfig(block_size=16))
    pre = Prefill("prefill-0")
    r.add_worker("prefill", pre)
    for wid in ("decode-0", "decode-1"):
        r.add_worker("decode", Decode(wid))
    for w in r.workers.loads.values():
        w.num_blocks, w.free_blocks, w.healthy = 1000, 1000, True
    r.workers.loads["prefill-0"].prefill_tps = 50_000.0     # remote prefill is the policy's choice
    for wid in ("decode-0", "decode-1"):
        r.workers.loads[wid].prefill_tps = 500.0
    Decode.calls = []
    attempt = asyncio.run(place(r, "a", list(range(1, 1025)), SamplingParams(max_tokens=2), None, set()))
    (lost, first_id), (second, second_id) = Decode.calls
    assert (first_id, second_id) == ("a", "a#t1") and lost != second
    assert pre.calls == ["a#t1"] and attempt.attempt_id == "a#t1" and attempt.decode_worker == second
