"""Refusals at placement: router/lifecycle/place.py refuses a new request whose chosen placement's
expected TTFT is over RouterConfig.admit_ttft_s, and one the policy sheds (DynamoKV's busy
thresholds), with RESOURCE_EXHAUSTED (Overloaded) before anything is held; a migration is never
refused. Pure Python: the router's own registry, loads, index and policies; no worker is called."""
import asyncio

import pytest

from pdcluster.engine.hashing import block_hashes
from pdcluster.engine.sampling_params import SamplingParams
from pdcluster.router.config import RouterConfig
from pdcluster.router.cost_config import CostConfig
from pdcluster.router.errors import Overloaded
from pdcluster.router.lifecycle import Router
from pdcluster.router.lifecycle.place import place
from pdcluster.router.placement import WorkerLoad, make_policy

pytestmark = pytest.mark.timeout(30)
IDS = list(range(1, 1025))                          # 1024 tokens: 0.5 s at 2,000 tokens/s


class Local:
    """A decode worker that prefills locally; its stream is recorded, never run here."""
    def __init__(self, wid):
        self.worker_id, self.streams = wid, []

    def stream(self, attempt_id, *args, **kw):
        self.streams.append(attempt_id)

        async def gen():
            yield None
        return gen()


def router(admit_ttft_s, policy="cost-model", queued=0) -> Router:
    r = Router(RouterConfig(policy=policy, remote_prefill=False, block_size=16, admit_ttft_s=admit_ttft_s), None,
               (2,), 4096, cost_config=CostConfig(block_size=16))
    r.add_worker("decode", Local("decode-0"))
    w = r.workers.loads["decode-0"]
    w.num_blocks, w.free_blocks, w.prefill_tps, w.queued_tokens = 1000, 1000, 2000.0, queued
    return r


def go(r, fresh=True, outputs=()):
    return asyncio.run(place(r, "a", IDS, SamplingParams(max_tokens=2), None, set(), list(outputs), fresh=fresh))


@pytest.mark.parametrize("policy", ["cost-model", "least-loaded"])
def test_a_request_expected_over_the_slo_is_refused_before_anything_is_held(policy):
    r = router(admit_ttft_s=1.0, policy=policy, queued=2000)       # 1 s of backlog + its own 0.5 s
    with pytest.raises(Overloaded, match=r"expected time to the first token is 1\.5\d*s, over --admit-ttft"):
        go(r)
    assert r.workers.decode["decode-0"].streams == []                 # nothing started
    assert not r.index.pending("decode-0")                            # nor its blocks expected
    assert r.workers.loads["decode-0"].queued_tokens == 2000          # nor charged
    # controls: the same request with the bound above its TTFT, with admission off, and as a migration
    for ok in (router(admit_ttft_s=2.0, policy=policy, queued=2000), router(None, policy, queued=2000)):
        assert go(ok).decode_worker == "decode-0"
    again = router(admit_ttft_s=1.0, policy=policy, queued=2000)
    assert go(again, fresh=False, outputs=[5]).decode_worker == "decode-0"
    assert again.workers.decode["decode-0"].streams == ["a"]


def test_dynamo_sheds_when_every_worker_is_past_a_busy_threshold():
    """DynamoKV's request rejection (off by default): busy workers take nothing; all busy -> Overloaded."""
    pol = make_policy("dynamo-kv", remote_prefill=True, busy_decode_blocks=0.85, busy_prefill_tokens=10_000)
    p0 = WorkerLoad("p0", "prefill", queued_tokens=12_000)            # busy: prompt tokens
    p1 = WorkerLoad("p1", "prefill", queued_tokens=9_000)
    d0 = WorkerLoad("d0", "decode", num_blocks=100, free_blocks=10)    # busy: 90% of its KV in use
    d1 = WorkerLoad("d1", "decode", num_blocks=100, free_blocks=60)
    got = pol.choose(512, [p0, p1], [d0, d1])
    assert (got.prefill, got.decode) == ("p1", "d1")
    p1.queued_tokens = 10_001
    with pytest.raises(Overloaded, match="every prefill worker is busy"):
        pol.choose(512, [p0, p1], [d0, d1])
    p1.queued_tokens, d1.free_blocks = 0, 14
    with pytest.raises(Overloaded, match="every decode worker is busy"):
        pol.choose(512, [p0, p1], [d0, d1])
    # control: the thresholds off (Dynamo's default), the least-cost pair is taken as before
    plain = make_policy("dynamo-kv", remote_prefill=True).choose(512, [p0, p1], [d0, d1])
    assert (plain.prefill, plain.decode) == ("p1", "d1")


def test_a_shed_request_reaches_the_client_as_overloaded():
    r = router(None, policy="dynamo-kv", queued=20_000)
    r.policy.busy_prefill_tokens = 10_000
    with pytest.raises(Overloaded, match="every decode worker is busy"):
        go(r)
    assert r.workers.decode["decode-0"].streams == [] and not r.index.pending("decode-0")
