"""Peer pull (kv_transfer/pull.py) between two real DecodeWorkers (no Ray), real TCP sockets, the
float engine: worker B pulls a prompt's prefix blocks that worker A holds, computes only the tail,
and its greedy tokens match transformers'. A holds them in its device pool, or in its host-memory
tier after evicting them, or split between the two. A holder that dropped the blocks, a link cut
mid-pull and a plan naming another tenant's blocks all end in a recompute, token-exact."""
import time

import pytest
import torch

from pdcluster.decode_worker.worker import DecodeWorker
from pdcluster.engine.hashing import block_hashes
from pdcluster.engine.llm_engine import LLMEngine, build_config
from pdcluster.engine.sampling_params import SamplingParams
from pdcluster.messages import PullPlan
from tests.e2e.conftest import check_top5, hf_greedy
from tests.faults.test_transfer_corruption import Proxy
from tests.unit.kv_workers import tokens

GREEDY = SamplingParams(max_tokens=8, temperature=0)
BS = 16


def _engine(**kw) -> LLMEngine:
    return LLMEngine(build_config(kv_cache_memory=24 * 2**20, num_threads=1, dtype="float32", quantization="none",
                                  **kw))


@pytest.fixture(scope="module")
def peers():
    a = DecodeWorker("pull-a", lambda: _engine(host_cache_gb=0.08), transfer_timeout_s=10)    # ~110 blocks
    assert a.tiers is not None and a.tiers.wait_idle()
    b = DecodeWorker("pull-b", _engine, transfer_timeout_s=10)
    yield a, b
    a.close(), b.close()


def _prompt(a: DecodeWorker, topic: str) -> list[int]:
    text = f"Notes on {topic}. " + " ".join(f"Fact {i} about {topic} is worth remembering." for i in range(9))
    return a.engine.tokenizer.encode(text)


def _prefilled(w: DecodeWorker) -> int:
    return w.engine.stats.prefill_tokens


def _hold(a: DecodeWorker, rid: str, ids: list[int], salt=None) -> list[int]:
    """A computes the prompt: its blocks stay in A's prefix cache. Its tokens."""
    return tokens(a.generate(rid, ids, GREEDY, cache_salt=salt))


def _pull(a, b, rid, ids, plan_salt=None, salt=None, order_fn=None):
    """B generates ids with a plan to pull every full prefix block from A; (tokens, tokens B computed)."""
    n = (len(ids) - 1) // BS
    plan = PullPlan("pull-a", a.kv_address, 0, block_hashes(ids, BS, plan_salt)[:n])
    before = _prefilled(b)
    out = tokens(b.generate(rid, ids, GREEDY, cache_salt=salt, pull=plan, order_fn=order_fn or a.serve_pull))
    return out, _prefilled(b) - before


def test_b_pulls_the_prefix_a_holds_and_computes_only_the_tail(peers, hf_ref):
    a, b = peers
    ids = _prompt(a, "tides")
    n = (len(ids) - 1) // BS
    assert n >= 5, len(ids)
    ref_a = _hold(a, "hold-1", ids)
    pulled0 = b.connector.pulled_blocks
    out, computed = _pull(a, b, "pull-1", ids)
    assert b.connector.pulled_blocks - pulled0 == n > 0
    assert computed == len(ids) - n * BS              # only the tail: the pulled blocks were not recomputed
    assert out == ref_a
    assert check_top5(hf_ref, ids, out, hf_greedy(hf_ref, ids, len(out))) >= 1


def test_a_serves_a_pull_from_its_device_pool_while_its_engine_is_mid_step(peers, hf_ref):
    """A's KV cache is host memory: it reads the pulled blocks while its engine computes a long prompt
    (engine/peer_read.py read_device_blocks_now), instead of after that step. Before, the read waited
    for the step's end, which on these one-thread workers is seconds for a long prefill chunk."""
    a, b = peers
    ids = _prompt(a, "estuaries")
    n = (len(ids) - 1) // BS
    ref = _hold(a, "hold-now", ids)
    busy_ids = _prompt(a, "harbours") * 3                                  # ~330 tokens: one step of ~0.5 s+
    busy = a.generate("busy-now", busy_ids, SamplingParams(max_tokens=1, temperature=0))
    sched = a.engine.scheduler
    deadline = time.monotonic() + 10
    while not any(r.request_id == "busy-now" for r in list(sched.running)) and time.monotonic() < deadline:
        time.sleep(0.001)                                                  # scheduled: its forward pass runs
    still_running = []                                                     # at each serve's return

    def order(o):
        res = a.serve_pull(o)
        still_running.append(any(r.request_id == "busy-now" for r in list(sched.running)))
        return res
    device0 = a.connector.stats.served_blocks["device"]
    out, computed = _pull(a, b, "pull-now", ids, order_fn=order)
    assert len(tokens(busy)) == 1
    assert still_running == [True], "the pull waited for A's step to end"   # one step: 1 token, < a chunk
    assert a.connector.stats.served_blocks["device"] - device0 == n      # from A's device pool, not a tier
    assert computed == len(ids) - n * BS
    assert out == ref
    assert check_top5(hf_ref, ids, out, hf_greedy(hf_ref, ids, len(out))) >= 1


def test_a_block_handed_out_during_the_copy_is_left_out(peers, monkeypatch):
    """The race of an off-thread read, made to happen: between read_device_blocks_now's snapshot and its
    copy, A's pool hands every free block out (the held prompt's among them) and a "step" overwrites
    them. The copy then holds other bytes; the gen check leaves those rows out, so the read returns
    none of them. Without the check it returns every row, overwritten. A read with no race returns the
    blocks as cached (the control)."""
    from pdcluster.engine import peer_read
    a, _ = peers
    ids = _prompt(a, "lagoons")
    _hold(a, "hold-race", ids)
    hashes = block_hashes(ids, BS, None)[:(len(ids) - 1) // BS]
    ref = a.engine_thread.run(lambda e: peer_read.read_blocks(e, hashes))
    found, got = peer_read.read_device_blocks_now(a.engine, hashes)              # the control: no race
    assert found == list(range(len(hashes)))
    assert all(torch.equal(g, r) for g, r in zip(got.k + got.v, ref.k + ref.v))

    def churn(e):                                                                 # on A's engine thread
        pool = e.kv.pool
        blocks = pool.allocate(pool.num_free_blocks)
        ids_ = torch.tensor([b.block_id for b in blocks])
        for cache in e.kv_caches()[0] + e.kv_caches()[1]:
            cache.index_fill_(0, ids_, 7.0)                                      # what a step would write
        pool.free(blocks)
    real, raced = peer_read.gather_blocks, []

    def racing(cache, ids_, dtype):
        if not raced:
            raced.append(a.engine_thread.run(churn))
        return real(cache, ids_, dtype)
    monkeypatch.setattr(peer_read, "gather_blocks", racing)
    found, got = peer_read.read_device_blocks_now(a.engine, hashes)
    assert raced and (found, got) == ([], None)


def test_evicted_blocks_are_recomputed(peers):
    a, b = peers
    ids = _prompt(a, "glaciers")
    ref = _hold(a, "hold-2", ids)
    a.engine_thread.run(lambda e: e.kv.pool.reset_prefix_cache())      # A no longer holds them: not in its
    assert a.tiers.wait_idle()                                          # device pool, nor in its host tier,
    with a.tiers._lock:                                                 # which they were written through to
        for h in block_hashes(ids, BS):
            assert a.tiers.index["host"].remove(h) is not None
    failed0, pulled0 = b.connector.failed_pulls, b.connector.pulled_blocks
    out, computed = _pull(a, b, "pull-2", ids)
    assert b.connector.failed_pulls == failed0 + 1 and b.connector.pulled_blocks == pulled0
    assert computed == len(ids)                        # the whole prompt, computed on B
    assert out == ref


def test_a_link_cut_mid_pull_is_recomputed(peers):
    a, b = peers
    ids = _prompt(a, "volcanoes")
    ref = _hold(a, "hold-3", ids)
    proxy = Proxy(b.kv_address, "drop", after=300_000)     # cut after a few layers of the pull
    out, computed = _pull(a, b, "pull-3", ids,
                          order_fn=lambda o: a.serve_pull(type(o)(**{**o.__dict__, "address": proxy.address})))
    assert proxy.fired
    assert computed == len(ids)
    assert out == ref
    proxy.listener.close()


def test_a_plan_naming_another_tenants_blocks_is_refused(peers):
    a, b = peers
    ids = _prompt(a, "comets")
    ref = _hold(a, "hold-4", ids, salt="tenant-1")
    pulled0 = b.connector.pulled_blocks
    out, computed = _pull(a, b, "pull-4", ids, plan_salt="tenant-1", salt="tenant-2")
    assert b.connector.pulled_blocks == pulled0 and computed == len(ids)
    assert out == ref
    # control: the same tenant's plan is pulled
    out, computed = _pull(a, b, "pull-5", ids, plan_salt="tenant-1", salt="tenant-1")
    assert b.connector.pulled_blocks > pulled0 and computed < len(ids)
    assert out == ref


def _evict_device(w: DecodeWorker) -> None:
    """Memory pressure on w: every free block handed out once (the pool evicts its cached blocks, the
    tiers copy them out), then freed uncached; wait for the tier writer."""
    def churn(e):
        pool = e.kv.pool
        pool.free(pool.allocate(pool.num_free_blocks))
    w.engine_thread.run(churn)
    assert w.tiers.wait_idle()


def test_b_pulls_blocks_a_keeps_in_its_host_tier_and_in_both_tiers(peers):
    a, b = peers
    ids = _prompt(a, "auroras")
    n = (len(ids) - 1) // BS
    hashes = block_hashes(ids, BS, None)[:n]
    ref = _hold(a, "hold-6", ids)
    _evict_device(a)
    assert a.engine_thread.run(lambda e: [e.kv.pool.lookup(h) for h in hashes]) == [None] * n   # device: gone
    served0 = dict(a.connector.stats.served_blocks)
    out, computed = _pull(a, b, "pull-6", ids)
    got = {t: a.connector.stats.served_blocks[t] - served0[t] for t in served0}
    assert got == {"device": 0, "host": n, "disk": 0}     # every block read from A's host tier
    assert computed == len(ids) - n * BS and out == ref
    # split: A reloads its first 3 blocks into the device pool (a tier hit), the rest stay in host memory
    _hold(a, "hold-7", ids[:3 * BS + 5])
    b.engine_thread.run(lambda e: e.kv.pool.reset_prefix_cache())      # B recomputes unless it pulls again
    served0 = dict(a.connector.stats.served_blocks)
    out, computed = _pull(a, b, "pull-7", ids)
    got = {t: a.connector.stats.served_blocks[t] - served0[t] for t in served0}
    assert got == {"device": 3, "host": n - 3, "disk": 0}
    assert computed == len(ids) - n * BS and out == ref
    # control: the pulled bytes are A's host copies: garbage there changes B's tokens
    _evict_device(a)
    b.engine_thread.run(lambda e: e.kv.pool.reset_prefix_cache())
    for c in a.tiers.host.chunks:
        c.normal_()
    out, computed = _pull(a, b, "pull-8", ids)
    assert computed == len(ids) - n * BS and out != ref
    fig = b.status().pulls
    assert fig.pulls >= 3 and fig.pulled_blocks >= 3 * n and fig.pull_counts[-1] == fig.pulls + fig.pull_failures
    assert a.status().pulls.served_host_blocks >= 2 * n - 3


def test_a_puller_with_its_own_cache_tiers_pulls_what_its_tiers_lack(peers):
    """With tiers on the puller too (MultiConnector: its tiers beside the pull connector), a pull that
    offers more blocks than the puller's own tiers is taken; when its own host tier holds the whole
    prefix, the local copy wins and nothing is pulled. (Before, the tiers alone were asked: a puller
    with tiers never pulled, and the multi-turn scenario recomputed prompts its peer held.)"""
    a, _ = peers
    c = DecodeWorker("pull-c", lambda: _engine(host_cache_gb=0.02), transfer_timeout_s=10)
    try:
        assert c.tiers is not None and c.tiers.wait_idle()
        ids = _prompt(a, "glaciers")
        n = (len(ids) - 1) // BS
        ref = _hold(a, "hold-9", ids)
        out, computed = _pull(a, c, "pull-9", ids)
        fig = c.status().pulls
        assert fig.pulls == 1 and fig.pulled_blocks == n and fig.pull_failures == 0
        assert computed == len(ids) - n * BS and out == ref
        # c now holds the prompt itself: evicted to its host tier, a second plan is served from there
        _evict_device(c)
        hits0 = _host_hits(c)
        out, computed = _pull(a, c, "pull-10", ids)
        assert c.status().pulls.pulls == 1 and computed == len(ids) - n * BS and out == ref
        assert _host_hits(c) - hits0 == n
    finally:
        c.close()


def _host_hits(w: DecodeWorker) -> int:
    return next(f["hits"] for f in w.tiers.figures() if f["tier"] == "host")
