"""kv_transfer/pull.py PullConnector's scheduler half, without an engine: which tokens a plan makes
external, the tenant check, the reservation and order it makes, and how a pull's end is reported."""
import threading

import torch

from pdcluster.engine.hashing import block_hashes
from pdcluster.engine.request import Request
from pdcluster.engine.sampling_params import SamplingParams
from pdcluster.kv_transfer.pull import PullConnector
from pdcluster.kv_transfer.receiver import KVReceiver
from pdcluster.messages import PullPlan, PullResult

BS, L = 16, 100                                     # 6 full blocks; the last token always computes
IDS = list(range(1000, 1000 + L))


def connector():
    c = PullConnector(KVReceiver(), num_layers=2, block_size=BS, address="127.0.0.1:9", worker_id="b")
    c.register_caches([torch.zeros(8, BS, 1, 2)] * 2, [torch.zeros(8, BS, 1, 2)] * 2)
    return c


def plan(salt=None, first=0, n=6):
    return PullPlan("a", "127.0.0.1:1", first, block_hashes(IDS, BS, salt)[first:first + n])


def req(rid="r", salt=None):
    return Request(IDS, SamplingParams(max_tokens=4), rid, cache_salt=salt, block_size=BS)


def test_a_plan_makes_the_blocks_past_the_local_hits_external():
    c = connector()
    c.plan("r", plan(), lambda o: PullResult(True))
    assert c.external_tokens(req(), 2 * BS) == 4 * BS           # blocks [2, 6): 64 tokens
    c.plan("s", plan(first=3, n=3), lambda o: PullResult(True))
    assert c.external_tokens(req("s"), 0) == 6 * BS             # a stale plan start: pulled from our hits on
    assert c.external_tokens(req("t"), 0) == 0                  # no plan, nothing external


def test_a_plan_of_another_tenants_hashes_is_dropped():
    c = connector()
    c.plan("r", plan(salt="t1"), lambda o: PullResult(True))
    assert c.external_tokens(req(salt="t2"), 0) == 0
    assert c.external_tokens(req(salt="t2"), 0) == 0            # dropped, not retried
    c.plan("r", plan(salt="t1"), lambda o: PullResult(True))
    assert c.external_tokens(req(salt="t1"), 0) == 6 * BS       # control: the tenant's own plan


def test_after_alloc_reserves_and_orders_a_refusal_fails_the_load():
    c = connector()
    orders, done = [], threading.Event()

    def order(o):
        orders.append(o)
        done.set()
        return PullResult(False, reason="blocks no longer cached (evicted)")
    r = req()
    c.plan("r", plan(), order)
    assert c.external_tokens(r, BS) == 5 * BS
    c.after_alloc(r, [3, 4, 5, 6, 7], 5 * BS)
    assert done.wait(5)
    o = orders[0]
    assert (o.request_id, o.address, o.dst_id, o.dst_block_ids) == ("r", "127.0.0.1:9", "b", [3, 4, 5, 6, 7])
    assert o.hashes == r.block_hashes()[1:6]                     # our own salted hashes of blocks [1, 6)
    for _ in range(100):
        if (out := c.finished_loading()):
            break
        threading.Event().wait(0.01)
    assert out == [("r", False)] and c.failed_pulls == 1 and c.pulled_blocks == 0
    assert c.external_tokens(r, 0) == 0                          # the recompute pulls nothing


def test_an_abort_fences_the_pulls_reservation():
    c = connector()
    gate = threading.Event()
    c.plan("r", plan(), lambda o: (gate.wait(5), PullResult(True))[1])
    r = req()
    c.external_tokens(r, 0)
    c.after_alloc(r, [0, 1, 2, 3, 4, 5], 6 * BS)
    assert c.receiver.pending() == ["r"] and c.finished_loading() == []      # waiting for the holder
    c.request_aborted("r")
    gate.set()
    assert c.receiver.pending() == [] and c.finished_loading() == []         # fenced, and not reported


def test_a_plan_the_scheduler_never_used_ends_with_its_request():
    c = connector()
    c.plan("r", plan(), lambda o: PullResult(True))
    assert c.external_tokens(req(), 0) == 6 * BS     # offered; the pool had no room, so it computed them
    assert c.request_finished("r", [0, 1]) is False
    assert c.external_tokens(req(), 0) == 0 and not c._plans and not c._range


def test_an_ok_whose_blocks_never_land_fails_the_load(monkeypatch):
    """Only a refusal or an error ended a pull's reservation: a holder that answered ok and sent nothing (or
    an answer that is no PullResult) left it pending for good, the request waiting, its blocks held, while
    the engine's idle polls kept the worker's heartbeat moving. Now the pull fails and the prompt computes."""
    monkeypatch.setattr(PullConnector, "LANDED_GRACE_S", 0.05, raising=False)
    for rid, answer in (("r", PullResult(True, blocks=6)), ("s", {"ok": True})):
        c = connector()
        c.plan(rid, plan(), lambda o, a=answer: a)
        r = req(rid)
        assert c.external_tokens(r, 0) == 6 * BS
        c.after_alloc(r, [0, 1, 2, 3, 4, 5], 6 * BS)
        for _ in range(300):
            if (out := c.finished_loading()):
                break
            threading.Event().wait(0.01)
        assert out == [(rid, False)] and c.receiver.pending() == [] and c.failed_pulls == 1
