"""DecodeWorker (real engines, real TCP, no Ray): start() waits for every part of a reservation's KV,
the host tier's blocks too, and a refused duplicate generate leaves the live request's pull plan alone."""
import threading
import time

import pytest

from pdcluster.decode_worker.worker import DecodeWorker
from pdcluster.engine.hashing import block_hashes
from pdcluster.engine.llm_engine import LLMEngine, build_config
from pdcluster.engine.sampling_params import SamplingParams
from pdcluster.messages import PullPlan, PullResult
from pdcluster.prefill_worker.worker import PrefillWorker
from tests.unit.kv_workers import tokens

pytestmark = pytest.mark.timeout(180)
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def test_start_waits_for_the_blocks_a_tier_loads_into_the_reservation():
    """The reservation takes its first blocks from the host tier (loaded by the tier's loader thread) and the
    rest from the prefill worker. start() waited on the pull connector (the transfer) only: with the loader
    busy, the engine found the tier's part still loading and aborted a request whose KV was about to land."""
    d = DecodeWorker("d", lambda: LLMEngine(build_config(kv_cache_memory=16 * 2**20, num_threads=1,
                                                         host_cache_gb=0.05)), kv_transport="tcp", transfer_timeout_s=10)
    p = PrefillWorker("p", LLMEngine(build_config(kv_cache_memory=16 * 2**20, num_threads=1)), transport="tcp",
                      transfer_timeout_s=10)
    try:
        ids = list(range(200, 200 + 16 * 6 + 5))
        ref = tokens(d.generate("warm", ids, GREEDY))
        assert d.tiers.wait_idle()

        def evict(e):                           # the prefix leaves the device pool: the host tier holds it
            pool = e.kv.pool
            pool.free(pool.allocate(pool.num_free_blocks))
        d.engine_thread.run(evict)
        assert d.tiers.wait_idle()
        load = d.tiers._load_layers

        def busy_loader(job):                   # behind another request's disk reads, say
            time.sleep(1.5)
            return load(job)
        d.tiers._load_layers = busy_loader
        r = d.reserve("x", ids, GREEDY)
        assert r.skip_blocks > 0                # the tier's blocks load here (the precondition)
        res = p.prefill("x", ids, GREEDY, r.destination())
        assert [res.first_token] + tokens(d.start("x", res.first_token)) == ref
    finally:
        p.close()
        d.close()


def test_a_refused_duplicate_generate_leaves_the_live_requests_pull_plan():
    d = DecodeWorker("d", lambda: LLMEngine(build_config(kv_cache_memory=8 * 2**20, num_threads=1)),
                     kv_transport="tcp")
    try:
        ids = list(range(300, 300 + 16 * 5 + 3))
        plan = PullPlan("holder", "127.0.0.1:1", 0, block_hashes(ids, 16)[:5])
        orders = []

        def order_fn(o):
            orders.append(o.request_id)
            return PullResult(False, reason="the test's holder refuses")     # then it computes them
        gate = threading.Event()
        d.engine_thread.call(lambda e: gate.wait(10))      # both adds run back to back, before any step
        got = {}

        def gen(tag):
            try:
                got[tag] = d.generate("x", ids, GREEDY, pull=plan, order_fn=order_fn)
            except Exception as e:              # noqa: BLE001
                got[tag] = e
        live = threading.Thread(target=gen, args=("live",))
        live.start()
        time.sleep(0.3)
        dup = threading.Thread(target=gen, args=("dup",))
        dup.start()
        time.sleep(0.3)
        gate.set()
        live.join(), dup.join()
        assert isinstance(got["dup"], ValueError) and "already in flight" in str(got["dup"])
        assert len(tokens(got["live"])) == 6 and orders == ["x"]      # the live request still pulled
    finally:
        d.close()
