"""Router.context_tokens: the context length served is the model's, or what the largest decode worker's
KV pool holds when that is less (vLLM's max_model_len rule); _check_capacity, admission's safety net for
pools that shrank after a request was parsed, refuses by the workers' own block rule."""
import pytest

from pdcluster.router.config import RouterConfig
from pdcluster.router.cost_config import CostConfig
from pdcluster.router.lifecycle import Router
from pdcluster.router.validate import InvalidRequest

pytestmark = pytest.mark.timeout(30)


class Idle:
    def __init__(self, wid):
        self.worker_id = wid


def router(*pools: int) -> Router:
    r = Router(RouterConfig(policy="cost-model", remote_prefill=False, block_size=16), None, (2,), 4096,
               cost_config=CostConfig(block_size=16))
    for i, blocks in enumerate(pools):
        r.add_worker("decode", Idle(f"decode-{i}"))
        if blocks:                                   # 0: never polled (capacity unknown)
            w = r.workers.loads[f"decode-{i}"]
            w.num_blocks = w.free_blocks = blocks
    return r


def test_the_served_context_is_the_model_s_or_the_largest_pool_s():
    assert router().context_tokens == 4096                      # no worker: the model's
    assert router(0).context_tokens == 4096                     # none reported yet
    assert router(100).context_tokens == 1600
    assert router(100, 150).context_tokens == 2400              # the largest pool
    assert router(100, 300).context_tokens == 4096              # past the model's: the model's


def test_admission_refuses_what_no_pool_can_hold_by_the_workers_block_rule():
    r = router(100, 0)
    r._admit("fits", 1500, 100, None)                           # 1,600 tokens: exactly 100 blocks
    r.in_flight.clear()
    with pytest.raises(InvalidRequest, match="needs 101 KV blocks.*largest decode worker holds 100"):
        r._admit("over", 1500, 101, None)
    router(0)._admit("unknown", 10_000, 100, None)              # no capacity reported: nothing to refuse by
