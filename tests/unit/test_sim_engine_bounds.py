"""The simulator keeps the real engine's bounds (engine/scheduler.py): one token budget a step for the
decode rows and the prompt chunks together, no new prompt while max_num_seqs sequences run, a request
no decode pool could hold refused at admission (the router's), and a prefill instance's KV pool held by
the prompts it computes. Before, steps ran past the budget and the batch cap, an oversized request
stalled its instance's queue for good, and a prefill instance computed any number of prompts in no
memory. Pure Python, fast."""
import pytest

from pdcluster.sim.cluster import PoolSpec, SimConfig, Simulator
from pdcluster.sim.hardware import HARDWARE
from pdcluster.sim.trace import Request
from pdcluster.sim.validate import LocalSimConfig, block_hashes, with_kv_pool

pytestmark = pytest.mark.timeout(60)


class StepLog:
    """Wraps an instance's roofline: each decode step's (decode rows, prompt tokens, prompts) as priced."""
    def __init__(self, roof):
        self.roof, self.steps = roof, []

    def __getattr__(self, k):
        return getattr(self.roof, k)

    def decode_s(self, b, ctx, chunk=None):
        self.steps.append((b, sum(t for t, _ in chunk) if chunk else 0, len(chunk) if chunk else 0))
        return self.roof.decode_s(b, ctx, chunk)


def test_a_decode_step_keeps_one_token_budget_and_the_sequence_cap():
    budget, cap = 64, 4
    cfg = SimConfig("SmolLM2-135M", decode=PoolSpec("cpu", 1), prefill=None, policy="least-loaded",
                    block_tokens=16, prefill_batch_tokens=budget, local_chunk_tokens=budget, max_batch=cap)
    # 4 short prompts with long outputs fill the batch; 6 more prompts arrive while they decode
    reqs = [Request(i, 0.0, 16, 200, ()) for i in range(4)] + [Request(4 + i, 0.5, 200, 50, ()) for i in range(6)]
    sim = Simulator(cfg, reqs)
    log = sim.inst["decode-0"].roof = StepLog(sim.inst["decode-0"].roof)
    res = sim.run()
    assert res.summary()["finished"] == 10
    mixed = [s for s in log.steps if s[1]]
    assert mixed and max(b + t for b, t, _ in mixed) <= budget          # rows + chunk tokens within the budget
    assert max(b + n for b, _, n in log.steps) <= cap                  # sequences in a step within the cap


@pytest.mark.parametrize("remote", [False, True])
def test_a_request_no_decode_pool_can_hold_is_refused_and_the_rest_are_served(remote):
    hw = with_kv_pool(HARDWARE["cpu"], 8, 16)                          # 8 blocks of 16 tokens a worker
    cfg = LocalSimConfig("SmolLM2-135M", decode=PoolSpec("cpu", 1), prefill=PoolSpec("cpu", 1) if remote else None,
                         policy="least-loaded", block_tokens=16, prefill_batch_tokens=64, local_chunk_tokens=64,
                         admit_ttft_s=None, place_wait_s=None, drain_after_s=60.0, profile=hw)
    reqs = [Request(0, 0.0, 200, 8, ())] + [Request(i, 0.1 * i, 32, 8, ()) for i in range(1, 6)]   # 0: 13 blocks
    res = Simulator(cfg, reqs).run()
    assert [r.kind for r in res.records] == ["refused"] + ["remote" if remote else "local"] * 5
    assert res.summary()["finished"] == 5 and res.end_s < 10


def test_a_prefill_instance_holds_blocks_for_the_prompts_it_computes():
    small = with_kv_pool(HARDWARE["cpu"], 40, 16)                      # 40 blocks: one 32-block prompt at a time
    cfg = LocalSimConfig("SmolLM2-135M", decode=PoolSpec("cpu", 1), prefill=PoolSpec("cpu", 1),
                         policy="least-loaded", block_tokens=16, prefill_batch_tokens=2048, local_chunk_tokens=2048,
                         admit_ttft_s=None, profile=with_kv_pool(HARDWARE["cpu"], 1000, 16), prefill_profile=small)
    reqs = [Request(i, 0.0, 512, 4, block_hashes(list(range(1000 * i, 1000 * i + 512)), 16)) for i in range(3)]
    sim = Simulator(cfg, reqs)
    p = sim.inst["prefill-0"]
    seen = []
    step = p._step

    def logged(now):
        step(now)
        started = [j for j in p.q if j.started is not None]
        seen.append((len(started), p.figures()["free_blocks"]))
    p._step = logged
    res = sim.run()
    assert res.summary()["finished"] == 3 and all(r.kind == "remote" for r in res.records)
    assert seen and max(n for n, _ in seen) == 1                        # never two 32-block prompts in 40 blocks
    assert min(free for _, free in seen) == 40 - 32                     # the one computing holds its blocks
