"""Fault injection on loopback: a decode worker and a prefill worker are killed mid-request; every
stream completes with exactly the tokens of an undisturbed run (greedy), and no block leaks."""
import asyncio
import logging
import os
import signal
import time

import grpc
import pytest
import ray

from pdcluster.router.proto import generation_pb2 as pb
from pdcluster.router.proto import generation_pb2_grpc as pbg
from tests.faults.clusters import greedy_reference

N = 16
MAX_NEW = 24
PROMPTS = [f"Question {i}: name a city in Europe and describe it in a few words." for i in range(N)]
# ~60 tokens each, none in the prefill worker's prefix cache from PROMPTS (its number is in the
# first block): 16 of them are ~15 steps of the step budget below, so the prefill worker can be
# stopped after its first step with most of them still to compute
LONG_PROMPTS = [f"Note {i}: in a few plain words, describe harbour town number {i}: its narrow streets, its fish "
                "market, the lighthouse on the rocks, the boats that leave at dawn, the bells of its church, and "
                "the storms the sailors fear most when the winter nights are long." for i in range(N)]
# the engine step budget (prompt chunks + decodes) is 64 tokens (clusters.ONE_PREFILL_TWO_DECODE)


@pytest.fixture(scope="module")
def faulty(one_prefill_two_decode):
    """The session's 1 prefill + 2 decode cluster (tests/faults/conftest.py; no admission by expected
    wait: admission has its own tests). These tests kill decode-0 and prefill-0 for good: the cluster
    is spent afterwards (a later user gets a fresh one)."""
    yield one_prefill_two_decode.get()
    one_prefill_two_decode.spend()


@pytest.fixture(scope="module")
def reference():
    return greedy_reference(PROMPTS, MAX_NEW)


@pytest.fixture(scope="module")
def long_reference():
    return greedy_reference(LONG_PROMPTS, MAX_NEW)


async def stream_all(addr, ids, on_tokens=None):
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = pbg.GenerationStub(ch)

        async def one(p):
            toks, reason, where = [], None, None
            async for m in stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=p),
                                                            sampling=pb.SamplingParams(max_tokens=MAX_NEW))):
                toks += m.token_ids
                reason = m.finish_reason
                where = where or (m.placement.decode_worker if m.HasField("placement") else None)
                if on_tokens:
                    await on_tokens(len(toks), where)
            return toks, reason
        return await asyncio.gather(*(one(p) for p in ids))


def kill_when(c, role_id, predicate):
    """on_tokens(n, decode worker) for stream_all: kills role_id once predicate(n, decode worker) holds."""
    fired = {"done": False}

    async def on_tokens(n, where):
        if not fired["done"] and predicate(n, where):
            fired["done"] = True
            ray.kill(c.actors[role_id], no_restart=True)
    return on_tokens, fired


def done_records(caplog) -> list[dict]:
    """The router's per-request `request done` records (logfmt line + `record.request`)."""
    return [r.request for r in caplog.records if hasattr(r, "request")]


def test_decode_worker_killed_mid_stream_requests_migrate_token_exact(faulty, reference, caplog):
    caplog.set_level(logging.INFO, logger="pdcluster.router.lifecycle")
    ids, ref = reference
    # a stream that decode-0 is decoding: its requests are mid-stream, not still waiting for a prefill
    # (on a loaded host every stream on decode-1 can be ahead while decode-0's are still prefilling)
    on_tokens, fired = kill_when(faulty, "decode-0", lambda n, where: n >= 4 and where == "decode-0")
    t = time.monotonic()
    res = faulty.run(stream_all(faulty.address, ids, on_tokens))
    took = time.monotonic() - t
    assert fired["done"]
    ok = sum(toks == r for (toks, _), r in zip(res, ref))
    print(f"\n[faults] decode worker killed mid-stream: {ok}/{N} streams complete and token-exact "
          f"({took:.1f}s)")
    assert ok == N
    assert all(reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH) for _, reason in res)
    recs = done_records(caplog)
    moved = [r for r in recs if r["migrations"] >= 1]
    assert len(recs) == N and moved, recs              # at least one stream did move...
    assert all(r["decode"] == "decode-1" for r in moved)   # ...and its line names where it finished
    # dead for good (killed without restart): it leaves the router and the pool, holding no slot, and
    # (no autoscaler sizes this pool) a fresh decode-2 takes its place
    gone = faulty.run(wait_gone(faulty, "decode-0"))
    assert "decode-0" not in faulty.actors
    back = faulty.run(wait_joined(faulty, "decode-2"))
    m = faulty.pool_metrics()["decode"]
    print(f"[faults] dead decode-0 removed from the pool {gone:.1f}s after the streams ended, replaced by "
          f"decode-2 {back:.1f}s later; decode pool: {m.replicas} replica(s), {m.held} held")
    assert m.replicas == m.held == 2 and set(faulty.router.workers.decode) == {"decode-1", "decode-2"}


async def wait_gone(c, worker_id: str, timeout_s: float = 20.0) -> float:
    t0 = time.monotonic()
    while worker_id in c.router.workers.loads:
        assert time.monotonic() - t0 < timeout_s, f"{worker_id} still registered after {timeout_s:g}s"
        await asyncio.sleep(0.1)
    return time.monotonic() - t0


async def wait_joined(c, worker_id: str, timeout_s: float = 120.0) -> float:
    """Seconds until worker_id is registered and healthy (a replacement loads the model first)."""
    t0 = time.monotonic()
    while not (worker_id in c.router.workers.loads and c.router.workers.loads[worker_id].healthy):
        assert time.monotonic() - t0 < timeout_s, f"{worker_id} not serving after {timeout_s:g}s"
        await asyncio.sleep(0.1)
    return time.monotonic() - t0


async def kill_mid_prefill(c, worker_id: str, timeout_s: float = 120.0) -> dict:
    """Kill prefill worker `worker_id` while it holds prompts: once its engine has run a step since
    this was called and still has prompts waiting, stop its process (SIGSTOP: it computes and answers
    nothing more), let replies it already sent reach the router, count the prefills the router still
    awaits from it (`pending`: they can only end by failing), then kill it for good."""
    actor, load = c.actors[worker_id], c.router.workers.loads[worker_id]
    st = await actor.status.remote()
    steps0, t0 = st.engine.steps, time.monotonic()
    while not (st.engine.steps > steps0 and st.engine.waiting_tokens > 0):
        assert time.monotonic() - t0 < timeout_s, f"{worker_id} ran no step with prompts waiting: {st.engine}"
        await asyncio.sleep(0.01)
        st = await actor.status.remote()
    os.kill(st.pid, signal.SIGSTOP)
    await asyncio.sleep(0.5)
    seen = dict(pending=load.in_flight, steps=st.engine.steps - steps0, waiting_tokens=st.engine.waiting_tokens)
    ray.kill(actor, no_restart=True)
    os.kill(st.pid, signal.SIGKILL)      # stopped processes take no graceful exit
    return seen


def test_prefill_worker_killed_requests_prefill_locally_and_complete(faulty, long_reference, caplog):
    caplog.set_level(logging.INFO, logger="pdcluster.router.lifecycle")
    ids, ref = long_reference
    # decode-0 died in the previous test (decode-2 replaced it); prefill-0 dies with prompts still queued on it

    async def run():
        return await asyncio.gather(stream_all(faulty.address, ids),
                                    kill_mid_prefill(faulty, "prefill-0"))
    res, seen = faulty.run(run())
    ok = sum(toks == r for (toks, _), r in zip(res, ref))
    redone = [r for r in caplog.records if "on prefill-0 failed" in r.getMessage() and "placing again" in r.getMessage()]
    recs = done_records(caplog)
    print(f"\n[faults] prefill worker killed after {seen['steps']} step(s) with {seen['pending']}/{N} prefills pending "
          f"({seen['waiting_tokens']} prompt tokens waiting): {len(redone)} placed again, {ok}/{N} streams complete "
          f"and token-exact")
    assert seen["pending"] >= 1, seen                   # the precondition: it died holding prompts
    assert ok == N
    assert len(redone) >= seen["pending"] and len(recs) == N    # each pending prefill was placed again...
    assert all(r["decode"] in ("decode-1", "decode-2") for r in recs)
    # ...and prefilled on a decode worker, or on prefill-1 if the replacement had joined by then
    assert sum(r["kind"] == "local" or r["prefill"] == "prefill-1" for r in recs) >= seen["pending"]
    back = faulty.run(wait_joined(faulty, "prefill-1"))
    print(f"[faults] prefill-0 replaced by prefill-1 ({back:.1f}s after the streams ended)")
    assert set(faulty.router.workers.prefill) == {"prefill-1"}

    async def pools():
        await asyncio.sleep(0.5)
        return await asyncio.gather(*(faulty.actors[w].status.remote() for w in ("decode-1", "decode-2")))
    for st in faulty.run(pools()):
        assert st.engine.free_blocks == st.engine.num_blocks and st.running == 0 and st.reserved == 0
