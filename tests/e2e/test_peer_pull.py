"""Peer pull (kv_transfer/pull.py) between two real DecodeWorkers (no Ray), real TCP sockets, the
float engine: worker B pulls a prompt's prefix blocks that worker A holds, computes only the tail,
and its greedy tokens match transformers'. A holder that evicted the blocks, a link cut mid-pull
and a plan naming another tenant's blocks all end in a recompute, token-exact."""
import pytest

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


def _engine() -> LLMEngine:
    return LLMEngine(build_config(kv_cache_memory=24 * 2**20, num_threads=1, dtype="float32", quantization="none"))


@pytest.fixture(scope="module")
def peers():
    a = DecodeWorker("pull-a", _engine, transfer_timeout_s=10)
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


def test_evicted_blocks_are_recomputed(peers):
    a, b = peers
    ids = _prompt(a, "glaciers")
    ref = _hold(a, "hold-2", ids)
    a.engine_thread.run(lambda e: e.kv.pool.reset_prefix_cache())      # A no longer holds them
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
