"""router/admission.py: the expected wait before a prefill starts, and the limit it is held to."""
import pytest

from pdcluster.router.admission import expected_wait_s, refusal
from pdcluster.router.placement import WorkerLoad

RATES = {"p0": 1000.0, "p1": 4000.0, "d0": 500.0}


def rate(w: WorkerLoad) -> float:
    return RATES[w.worker_id]


def test_the_least_backlogged_candidate_sets_the_wait():
    p0 = WorkerLoad("p0", "prefill", queued_tokens=3000)              # 3 s
    p1 = WorkerLoad("p1", "prefill", queued_tokens=1000, waiting_tokens=8000)   # reported 8000: 2 s
    assert expected_wait_s([p0, p1], rate) == 2.0
    d0 = WorkerLoad("d0", "decode", queued_tokens=500)                 # local prefill: 1 s
    assert expected_wait_s([p0, p1, d0], rate) == 1.0
    p1.healthy = False                                                 # not placeable: not a candidate
    assert expected_wait_s([p0, p1], rate) == 3.0
    assert expected_wait_s([], rate) is None and expected_wait_s([p1], rate) is None
    assert expected_wait_s([WorkerLoad("p0", "prefill")], rate) == 0.0   # idle: no wait


def test_own_prefill_counts_toward_the_first_token():
    p0 = WorkerLoad("p0", "prefill", queued_tokens=3000)
    p1 = WorkerLoad("p1", "prefill", queued_tokens=6000)
    assert expected_wait_s([p0, p1], rate, own_tokens=1000) == 1.75   # p1: 7000 / 4000 beats p0's 4 s


def test_refused_on_the_queue_bound_or_on_the_deadline_and_says_which():
    p0 = WorkerLoad("p0", "prefill", queued_tokens=3000)              # starts in 3 s, first token after 4 s
    assert refusal([p0], rate, 1000, None, None) is None
    assert refusal([p0], rate, 1000, 3.5, None) is None
    assert "--max-queue-wait (2.0s)" in refusal([p0], rate, 1000, 2.0, None)
    assert refusal([p0], rate, 1000, None, 4.5) is None
    why = refusal([p0], rate, 1000, 30.0, 3.5)                        # starts in time, yet finishes too late
    assert "deadline" in why and "4.0s" in why
    assert refusal([], rate, 1000, 0.1, 0.1) is None                  # no candidate: placement's answer


# admission by TTFT SLO (RouterConfig.admit_ttft_s): the placement the policy chose, over the SLO
def test_the_slo_check_reads_the_cost_models_own_estimate_else_the_chosen_workers_backlog():
    from pdcluster.router.admission import placement_ttft_s, slo_refusal
    from pdcluster.router.placement import Placement
    loads = {"p0": WorkerLoad("p0", "prefill", queued_tokens=3000), "d0": WorkerLoad("d0", "decode")}
    priced = Placement("p0", "d0", "remote", {"ttft_s": 0.4})        # the cost model's estimate wins
    assert placement_ttft_s(priced, loads, rate, 1000) == 0.4
    plain = Placement("p0", "d0", "remote", {"hit_blocks_prefill": 3})   # others: (3000 + 1000) / 1000
    assert placement_ttft_s(plain, loads, rate, 1000) == 4.0
    local = Placement(None, "d0", "local")                           # local: d0 prefills, 1000 / 500
    assert placement_ttft_s(local, loads, rate, 1000) == 2.0
    assert placement_ttft_s(Placement("gone", "d0", "remote"), loads, rate, 1000) is None
    assert slo_refusal(plain, loads, rate, 1000, None) is None       # off
    assert slo_refusal(plain, loads, rate, 1000, 4.0) is None        # at the bound: admitted
    why = slo_refusal(plain, loads, rate, 1000, 2.0)
    assert "4.00s" in why and "--admit-ttft (2s)" in why
    assert slo_refusal(priced, loads, rate, 1000, 0.3) and not slo_refusal(priced, loads, rate, 1000, 0.5)


@pytest.mark.parametrize("cost, admitted", [("allow_local=False", False), ("local_max_tokens=256", False),
                                            ("default", True)])
def test_decode_workers_count_as_prefill_candidates_only_where_the_cost_model_may_prefill_locally(cost, admitted):
    """Before, the cost-model policy always counted them: with local prefills off (or the prompt over
    local_max_tokens) a request was admitted on an idle decode worker's wait, then placed behind a
    500 s prefill backlog."""
    from types import SimpleNamespace

    from pdcluster.router.config import RouterConfig
    from pdcluster.router.cost_config import CostConfig
    from pdcluster.router.errors import Overloaded
    from pdcluster.router.lifecycle.router import Router
    kw = {"default": {}, "allow_local=False": {"allow_local": False}, "local_max_tokens=256": {"local_max_tokens": 256}}
    kw = kw[cost]
    r = Router(RouterConfig(max_queue_wait_s=30.0), None, (), 4096, cost_config=CostConfig(**kw))
    r.workers.add("prefill", SimpleNamespace(worker_id="p0"))
    r.workers.add("decode", SimpleNamespace(worker_id="d0"))
    r.workers.loads["p0"].queued_tokens = 1_000_000                  # 500 s at the 2,000 tokens/s prior
    r.workers.loads["d0"].num_blocks = r.workers.loads["d0"].free_blocks = 1000
    if admitted:
        r._admit_by_wait(2000, None)
    else:
        with pytest.raises(Overloaded, match="over --max-queue-wait"):
            r._admit_by_wait(2000, None)


def test_with_no_prefill_worker_up_the_simple_policies_decode_workers_are_the_candidates():
    """A simple policy (LocalSwitch) prefills on a decode worker when no prefill worker is up; admission
    counted decode workers only for prompts under local_prefill_max_tokens, so it found no placeable
    candidate and admitted the request without checking any wait, behind a 500 s local backlog."""
    from types import SimpleNamespace

    from pdcluster.router.config import RouterConfig
    from pdcluster.router.errors import Overloaded
    from pdcluster.router.lifecycle.router import Router
    r = Router(RouterConfig(max_queue_wait_s=30.0, policy="least-loaded"), None, (), 4096)
    r.workers.add("prefill", SimpleNamespace(worker_id="p0"))
    r.workers.add("decode", SimpleNamespace(worker_id="d0"))
    r.workers.loads["d0"].queued_tokens = 1_000_000                  # 500 s at the 2,000 tokens/s prior
    r._admit_by_wait(2000, None)                                     # p0 is up and idle: admitted
    r.workers.loads["p0"].healthy = False
    with pytest.raises(Overloaded, match="over --max-queue-wait"):
        r._admit_by_wait(2000, None)


def test_the_deadline_check_credits_a_cached_prefix():
    """A 20,000-token prompt all but its last block cached on an idle decode worker comes well within a
    5 s deadline (the cost model says so too). Before, admission priced the whole prompt at the prefill
    rate (10 s at the 2,000 tokens/s prior) and refused it on an idle cluster. The control: the same
    length uncached is still refused."""
    import time
    from types import SimpleNamespace

    from pdcluster.engine.hashing import block_hashes
    from pdcluster.router.config import RouterConfig
    from pdcluster.router.cost_config import CostConfig
    from pdcluster.router.errors import Overloaded
    from pdcluster.router.lifecycle.router import Router
    r = Router(RouterConfig(block_size=16), None, (), 65536, cost_config=CostConfig(block_size=16))
    r.workers.add("prefill", SimpleNamespace(worker_id="p0"))
    r.workers.add("decode", SimpleNamespace(worker_id="d0"))
    r.workers.loads["d0"].num_blocks = r.workers.loads["d0"].free_blocks = 4000
    prompt = list(range(20_000))
    r.index.apply("d0", "stored", block_hashes(prompt, 16)[:-1], seq=1, now=time.time())
    r._admit_by_wait(len(prompt), 5.0, prompt)
    with pytest.raises(Overloaded, match="over the request's deadline"):
        r._admit_by_wait(len(prompt), 5.0, list(range(1, 20_001)))


def test_a_deadline_already_passed_is_deadline_exceeded_not_an_overload():
    """A 2-10 ms gRPC deadline reached admission with nothing left: it was refused RESOURCE_EXHAUSTED ("0.0s
    left", counted overloaded), which clients retry; API.md: a passed deadline is DEADLINE_EXCEEDED."""
    from types import SimpleNamespace

    from pdcluster.router.config import RouterConfig
    from pdcluster.router.lifecycle.router import Router
    from pdcluster.router.validate import InvalidRequest
    r = Router(RouterConfig(block_size=16), None, (), 65536)
    r.workers.add("decode", SimpleNamespace(worker_id="d0"))
    for left in (0.0, -0.01):
        with pytest.raises(InvalidRequest, match="deadline passed") as e:
            r._admit("r1", 100, 10, left, list(range(100)))
        assert e.value.code == "DEADLINE_EXCEEDED"
    assert r.metrics.requests.labels("deadline")._value.get() == 2
    assert r.metrics.requests.labels("overloaded")._value.get() == 0
