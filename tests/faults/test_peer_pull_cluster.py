"""Peer pull through the whole cluster (router, Ray actors, TCP KV transport): two decode workers
prefilling locally, the cost model with peer pulls on. A prompt cached on worker X is placed on Y
(X drains: it takes no placements but still serves pulls); Y pulls the prefix from X, computes only
the tail, and streams exactly the offline engine's greedy tokens. Then X dies before Y's pull: Y
recomputes, token-exact."""
import asyncio
import logging

import grpc
import pytest
import ray

from pdcluster.router.proto import generation_pb2 as pb
from pdcluster.router.proto import generation_pb2_grpc as pbg
from tests.faults.clusters import greedy_reference, running_cluster

MAX_NEW = 8
PROMPT = "Notes on harbours. " + " ".join(f"Fact {i} about harbours is worth remembering." for i in range(12))


@pytest.fixture(scope="module")
def pulling():
    with running_cluster(prefill_workers=0, decode_workers=2, remote_prefill=False, policy="cost-model",
                         cost__peer_pull=True, kv_cache_memory=64 * 2**20) as c:
        yield c


async def _run(c, ids, rid):
    """(tokens, the decode worker, cached prompt tokens) of one request through the router's gRPC
    front door (the placement and usage as a client sees them)."""
    toks, where, cached = [], None, None
    async with grpc.aio.insecure_channel(c.address) as ch:
        async for m in pbg.GenerationStub(ch).Generate(pb.GenerateRequest(
                request_id=rid, token_ids=pb.TokenIds(ids=ids),
                sampling=pb.SamplingParams(max_tokens=MAX_NEW, temperature=0))):
            toks += m.token_ids
            where = where or (m.placement.decode_worker if m.HasField("placement") else None)
            cached = m.usage.cached_prompt_tokens if m.HasField("usage") else cached
    return toks, where, cached


def _pull_of(caplog, rid) -> tuple[str, int] | None:
    """(holder, blocks) of the request's peer pull, from its `request done` log record; None: no pull."""
    rec = next(r.request for r in caplog.records                # the workers' id: the client's + "@..."
               if getattr(r, "request", {}).get("id", "").partition("@")[0] == rid)
    return (rec["pull"].rsplit(":", 1)[0], int(rec["pull"].rsplit(":", 1)[1])) if rec["pull"] else None


async def _prefilled(c, wid) -> int:
    return (await c.actors[wid].status.remote()).engine.prefill_tokens


def test_a_prompt_placed_away_from_its_holder_pulls_the_prefix(pulling, caplog):
    caplog.set_level(logging.INFO, logger="pdcluster.router.lifecycle")
    c = pulling
    (ids,), (ref,) = greedy_reference([PROMPT], MAX_NEW)
    toks, where, _ = c.run(_run(c, ids, "first"))
    assert toks == ref and _pull_of(caplog, "first") is None      # nobody held it: computed
    x = where
    y = next(w for w in c.router.workers.decode if w != x)
    c.run(c.router.refresh_loads())                  # x's block events reach the router's index
    c.router.workers.loads[x].draining = True       # takes no placements; still serves pulls
    try:
        before = c.run(_prefilled(c, y))
        toks, where, cached = c.run(_run(c, ids, "second"))
        holder, n = _pull_of(caplog, "second")
        assert where == y and holder == x and n > 0, where
        assert toks == ref
        assert cached == n * 16                      # y had none of it: every cached token was pulled
        assert c.run(_prefilled(c, y)) - before == len(ids) - n * 16    # y computed only the tail
    finally:
        c.router.workers.loads[x].draining = False


def test_a_holder_that_died_before_the_pull_is_recomputed(pulling, caplog):
    caplog.set_level(logging.INFO, logger="pdcluster.router.lifecycle")
    c = pulling
    (ids,), (ref,) = greedy_reference([PROMPT.replace("harbours", "lighthouses")], MAX_NEW)
    toks, where, _ = c.run(_run(c, ids, "third"))
    assert toks == ref
    x = where
    y = next(w for w in c.router.workers.decode if w != x)
    # No status poll from the kill until the request is placed: the router still believes x holds the prefix, as
    # in the window before a poll notices a death (a poll in between makes x unhealthy: no pull is planned).
    # The cluster's loop runs only inside c.run, so a poll already out finishes first (its calls: 1 s bound).
    refresh = c.router.workers.refresh

    async def no_poll() -> None:
        pass

    c.router.workers.refresh = no_poll
    try:
        c.run(asyncio.sleep(1.5))
        c.run(refresh())                              # x's block events reach the router's index
        c.router.workers.loads[x].draining = True
        ray.kill(c.actors[x], no_restart=True)
        before = c.run(_prefilled(c, y))
        toks, where, _ = c.run(_run(c, ids, "fourth"))
    finally:
        c.router.workers.refresh = refresh
    assert _pull_of(caplog, "fourth")[0] == x        # the pull was planned (else this test is vacuous)
    assert toks == ref
    assert c.run(_prefilled(c, y)) - before == len(ids)        # recomputed, the whole prompt
