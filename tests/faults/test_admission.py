"""Admission weighs the expected wait (queued prompt tokens / measured prefill rate) against
--max-queue-wait and each request's deadline: under a burst of long prompts the ones that could not
start prefilling in time get RESOURCE_EXHAUSTED at once, instead of all being queued (the flat
in-flight cap let 200 of them wait 16 s at the median)."""
import asyncio
import time

import grpc

from pdcluster.router.proto import generation_pb2 as pb
from pdcluster.router.proto import generation_pb2_grpc as pbg
from tests.faults.clusters import running_cluster

MAX_WAIT_S = 1.5
LONG = " ".join(f"line {i}: the quick brown fox jumps over the lazy dog." for i in range(40))   # ~500 tokens


def test_burst_beyond_the_expected_wait_is_refused_at_once():
    with running_cluster(prefill_workers=1, decode_workers=1, kv_cache_memory=256 * 2**20,
                         max_queue_wait_s=MAX_WAIT_S) as c:
        async def run():
            async with grpc.aio.insecure_channel(c.address) as ch:
                stub = pbg.GenerationStub(ch)

                async def one(i, timeout=None):
                    t0 = time.monotonic()
                    try:
                        n = 0
                        async for m in stub.Generate(pb.GenerateRequest(
                                text=f"{i}. {LONG}", sampling=pb.SamplingParams(max_tokens=2)), timeout=timeout):
                            n += len(m.token_ids)
                        return "ok", time.monotonic() - t0, ""
                    except grpc.aio.AioRpcError as e:
                        return e.code().name, time.monotonic() - t0, e.details()
                await one("warm-up")                     # the router learns this host's prefill rate
                await asyncio.sleep(1.0)                 # a status poll or two: its counters reach the router
                tps = max(c.router.telemetry.prefill_tps(w) for w in c.router.pools.loads.values())
                n = min(48, max(8, int(3 * MAX_WAIT_S * tps / 500) + 1))   # ~3x the bound's worth of prefill
                burst = await asyncio.gather(*(one(i) for i in range(n)))
                # a deadline shorter than the queue ahead of it: refused now, not DEADLINE_EXCEEDED later
                blocker = [asyncio.ensure_future(one(f"b{i}")) for i in range(6)]
                await asyncio.sleep(0.3)
                short = await one("short-deadline", timeout=1.0)
                await asyncio.gather(*blocker)
                return burst, short, tps
        burst, short, tps = c.run(run())
    served = [b for b in burst if b[0] == "ok"]
    refused = [b for b in burst if b[0] == "RESOURCE_EXHAUSTED"]
    print(f"\n[faults] burst of {len(burst)} ~500-token prompts at a learned {tps:.0f} tokens/s, --max-queue-wait "
          f"{MAX_WAIT_S:g}s: {len(served)} served "
          f"(slowest {max(t for _, t, _ in served):.1f}s), {len(refused)} refused "
          f"(slowest refusal {max((t for _, t, _ in refused), default=0):.2f}s); short deadline: {short[0]}")
    other = [b for b in burst if b[0] not in ("ok", "RESOURCE_EXHAUSTED")]
    # admitted past the decode pool's KV (256 MiB: ~10 of these) may end UNAVAILABLE: capacity, not admission
    assert served and refused and all(code == "UNAVAILABLE" for code, _, _ in other), other
    assert all("expected wait" in d and "--max-queue-wait" in d for _, _, d in refused)
    assert max(t for _, t, _ in refused) < 1.0                   # refused at once, not after queueing
    assert short[0] == "RESOURCE_EXHAUSTED" and "deadline" in short[2], short
