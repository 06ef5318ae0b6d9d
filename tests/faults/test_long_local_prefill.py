"""A worker that is slow but stepping is never "lost": a local prefill that outlasts the stream-gap
bound completes token-exact on its one decode worker, because the stream carries heartbeats with
the engine's step count (decode_worker/actor.py) and the router judges progress, not silence."""
import time

import grpc

from pdcluster.router.proto import generation_pb2 as pb
from pdcluster.router.proto import generation_pb2_grpc as pbg
from tests.faults.clusters import greedy_reference, running_cluster

GAP_S = 3.0        # the stream-gap bound; the prefill below takes several times longer
MAX_NEW = 8
PROMPT = " ".join(f"item {i} is a {['red', 'green', 'blue'][i % 3]} box;" for i in range(120))
KV_MIB = 160       # fp32 SmolLM2: ~46 KB of KV per token


def test_long_local_prefill_is_not_a_lost_worker():
    ids, ref = greedy_reference([PROMPT], MAX_NEW)     # the session's offline engine (its 64 MiB hold ~1,400 tokens)
    assert len(ids[0]) > 1000
    # one decode worker, no prefill pool: a "lost" verdict would leave nowhere to go (UNAVAILABLE);
    # 8-token chunks make the prefill ~137 engine steps (32-token ones, ~35 steps, took 2.8 s once the linears
    # read Q4_1 codes: no longer past the bound)
    with running_cluster(prefill_workers=0, decode_workers=1, remote_prefill=False, worker_timeout_s=GAP_S,
                         max_num_batched_tokens=8, kv_cache_memory=KV_MIB * 2**20, max_model_len=4096) as c:
        async def run():
            async with grpc.aio.insecure_channel(c.address) as ch:
                toks, where, t0 = [], [], time.monotonic()
                first = None
                async for m in pbg.GenerationStub(ch).Generate(pb.GenerateRequest(
                        token_ids=pb.TokenIds(ids=ids[0]), sampling=pb.SamplingParams(max_tokens=MAX_NEW))):
                    first = first or time.monotonic() - t0
                    toks += m.token_ids
                    if m.HasField("placement"):
                        where.append(m.placement.decode_worker)
                return toks, where, first
        toks, where, ttft = c.run(run())
        print(f"\n[faults] local prefill of {len(ids[0])} tokens: first token after {ttft:.1f}s "
              f"(stream-gap bound {GAP_S:g}s), {len(toks)} tokens, placements {where}")
        assert ttft > GAP_S            # the prefill did outlast the bound
        assert toks == ref[0] and where == ["decode-0"]
