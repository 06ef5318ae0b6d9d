"""Fault injection on loopback: a decode worker and a prefill worker are killed mid-request; every
stream completes with exactly the tokens of an undisturbed run (greedy), and no block leaks."""
import asyncio
import logging
import time

import grpc
import pytest
import ray

from pdcluster.router.proto import generation_pb2 as pb
from pdcluster.router.proto import generation_pb2_grpc as pbg
from tests.faults.clusters import greedy_reference, running_cluster

N = 16
MAX_NEW = 24
PROMPTS = [f"Question {i}: name a city in Europe and describe it in a few words." for i in range(N)]


@pytest.fixture(scope="module")
def faulty():
    with running_cluster(prefill_workers=1, decode_workers=2, kv_cache_memory=96 * 2**20) as c:
        yield c


@pytest.fixture(scope="module")
def reference():
    return greedy_reference(PROMPTS, MAX_NEW)


async def stream_all(addr, ids, on_tokens):
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = pbg.GenerationStub(ch)

        async def one(p):
            toks, reason, where = [], None, None
            async for m in stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=p),
                                                            sampling=pb.SamplingParams(max_tokens=MAX_NEW))):
                toks += m.token_ids
                reason = m.finish_reason
                where = where or (m.placement.decode_worker if m.HasField("placement") else None)
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


def test_prefill_worker_killed_requests_prefill_locally_and_complete(faulty, reference, caplog):
    caplog.set_level(logging.INFO, logger="pdcluster.router.lifecycle")
    ids, ref = reference
    # decode-0 is dead since the previous test; kill the prefill worker as the first tokens stream
    on_tokens, fired = kill_when(faulty, "prefill-0", lambda n, where: n >= 1)
    res = faulty.run(stream_all(faulty.address, ids, on_tokens))
    ok = sum(toks == r for (toks, _), r in zip(res, ref))
    print(f"\n[faults] prefill worker killed during prefill/transfer: {ok}/{N} streams complete and token-exact")
    assert fired["done"] and ok == N
    redone = [r for r in caplog.records if "placing again" in r.getMessage()]
    recs = done_records(caplog)
    assert redone and len(recs) == N                   # at least one prefill was redone elsewhere
    assert all(r["decode"] == "decode-1" for r in recs) and any(r["kind"] == "local" for r in recs)

    async def pools():
        await asyncio.sleep(0.5)
        return (await faulty.actors["decode-1"].status.remote())
    st = faulty.run(pools())
    assert st.engine.free_blocks == st.engine.num_blocks and st.running == 0 and st.reserved == 0
