"""Peer pull through the whole cluster (router, Ray actors, TCP KV transport): two decode workers
prefilling locally, the cost model with peer pulls on. A prompt cached on worker X is placed on Y
(X drains: it takes no placements but still serves pulls); Y pulls the prefix from X, computes only
the tail, and streams exactly the offline engine's greedy tokens. Then X dies before Y's pull: Y
recomputes, token-exact."""
import pytest
import ray

from pdcluster.engine import SamplingParams
from tests.faults.clusters import greedy_reference, running_cluster

MAX_NEW = 8
PROMPT = "Notes on harbours. " + " ".join(f"Fact {i} about harbours is worth remembering." for i in range(12))


@pytest.fixture(scope="module")
def pulling():
    with running_cluster(prefill_workers=0, decode_workers=2, remote_prefill=False, policy="cost-model",
                         cost__peer_pull=True, kv_cache_memory=64 * 2**20) as c:
        yield c


async def _run(c, ids, rid):
    """(tokens, the placement, cached prompt tokens) of one request through the router."""
    toks, where, usage = [], None, None
    async for ev in c.router.generate(ids, SamplingParams(max_tokens=MAX_NEW, temperature=0), rid):
        toks += ev.token_ids
        where = where or ev.placement
        usage = ev.usage or usage
    return toks, where, usage["cached_prompt_tokens"]


async def _prefilled(c, wid) -> int:
    return (await c.actors[wid].status.remote()).engine.prefill_tokens


def test_a_prompt_placed_away_from_its_holder_pulls_the_prefix(pulling):
    c = pulling
    (ids,), (ref,) = greedy_reference([PROMPT], MAX_NEW)
    toks, where, _ = c.run(_run(c, ids, "first"))
    assert toks == ref
    x = where["decode_worker"]
    y = next(w for w in c.router.workers.decode if w != x)
    c.run(c.router.refresh_loads())                  # x's block events reach the router's index
    c.router.workers.loads[x].draining = True       # takes no placements; still serves pulls
    try:
        before = c.run(_prefilled(c, y))
        toks, where, cached = c.run(_run(c, ids, "second"))
        n = where.get("pulled_blocks", 0)
        assert where["decode_worker"] == y and where.get("pulled_from") == x and n > 0, where
        assert toks == ref
        assert cached == n * 16                      # y had none of it: every cached token was pulled
        assert c.run(_prefilled(c, y)) - before == len(ids) - n * 16    # y computed only the tail
    finally:
        c.router.workers.loads[x].draining = False


def test_a_holder_that_died_before_the_pull_is_recomputed(pulling):
    c = pulling
    (ids,), (ref,) = greedy_reference([PROMPT.replace("harbours", "lighthouses")], MAX_NEW)
    toks, where, _ = c.run(_run(c, ids, "third"))
    assert toks == ref
    x = where["decode_worker"]
    y = next(w for w in c.router.workers.decode if w != x)
    c.run(c.router.refresh_loads())
    c.router.workers.loads[x].draining = True
    ray.kill(c.actors[x], no_restart=True)           # the router still believes x holds the prefix
    before = c.run(_prefilled(c, y))
    toks, where, _ = c.run(_run(c, ids, "fourth"))
    assert where.get("pulled_from") == x, where      # the pull was planned (else this test is vacuous)
    assert toks == ref
    assert c.run(_prefilled(c, y)) - before == len(ids)        # recomputed, the whole prompt
