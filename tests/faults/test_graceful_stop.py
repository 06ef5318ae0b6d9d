"""Ctrl-C drains instead of cutting: `pdcluster serve` in its own session gets SIGINT on its whole
process group (what a terminal's Ctrl-C does). Health turns NOT_SERVING and new requests get
UNAVAILABLE at once; a stream that ends within --drain-timeout completes; one that does not ends
with UNAVAILABLE naming the drain bound; the server then exits 0. Before, Ray's workers took the
same SIGINT and died under the streams (ActorDiedError)."""
import asyncio
import os
import signal
import subprocess
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdcluster.router.proto import generation_pb2 as pb
from pdcluster.router.proto import generation_pb2_grpc as pbg
from tests.procs import BIN, serving_port, stop_group, wait_for

DRAIN_S = 10.0
SHORT, LONG = 20, 2000      # output tokens: one stream ends within the drain bound, one cannot


def test_sigint_drains_streams_then_stops(tmp_path):
    log = tmp_path / "serve.log"
    argv = [str(BIN / "pdcluster"), "serve", "--port", "0", "--metrics-port", "0", "--http-port", "0", "--kv-cache-memory", "256",
            "--drain-timeout", str(DRAIN_S)]
    with open(log, "w") as out:
        serve = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
    try:
        wait_for(lambda: "pdcluster serving on" in log.read_text(), 240, "pdcluster serve", serve, log)
        port = serving_port(log)

        async def run():
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub, health = pbg.GenerationStub(ch), health_pb2_grpc.HealthStub(ch)

                async def stream(n, toks, started):
                    code, details = grpc.StatusCode.OK, ""
                    try:
                        async for m in stub.Generate(pb.GenerateRequest(
                                text="Tell me about the sea.",
                                sampling=pb.SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))):
                            toks += m.token_ids
                            started.set()
                    except grpc.aio.AioRpcError as e:
                        code, details = e.code(), e.details()
                    started.set()
                    return toks, code, details
                s_toks, l_toks, s_on, l_on = [], [], asyncio.Event(), asyncio.Event()
                short = asyncio.ensure_future(stream(SHORT, s_toks, s_on))
                long = asyncio.ensure_future(stream(LONG, l_toks, l_on))
                await asyncio.wait_for(asyncio.gather(s_on.wait(), l_on.wait()), 120)
                at_sigint = len(s_toks)
                os.killpg(serve.pid, signal.SIGINT)           # the terminal's Ctrl-C: the whole group
                t0 = time.monotonic()
                while (await health.Check(health_pb2.HealthCheckRequest())).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    assert time.monotonic() - t0 < 10, "health still SERVING after SIGINT"
                    await asyncio.sleep(0.05)
                try:
                    [m async for m in stub.Generate(pb.GenerateRequest(text="Hi", sampling=pb.SamplingParams(
                        max_tokens=2)))]
                    refused = None
                except grpc.aio.AioRpcError as e:
                    refused = (e.code(), e.details())
                return await short, await long, refused, time.monotonic() - t0, at_sigint
        (s_toks, s_code, _), (l_toks, l_code, l_details), refused, took, at_sigint = asyncio.run(run())
        serve.wait(DRAIN_S + 60)
        text = log.read_text()
        print(f"\n[faults] SIGINT to the process group: short stream {s_code.name} with {len(s_toks)} tokens, "
              f"long stream {l_code.name} after {len(l_toks)} tokens ({took:.1f}s, drain bound {DRAIN_S:g}s); "
              f"new request: {refused[0].name if refused else None}; exit {serve.returncode}")
        assert 0 < at_sigint < SHORT                       # the short stream was in flight at SIGINT...
        assert s_code == grpc.StatusCode.OK and len(s_toks) == SHORT          # ...and completed
        assert l_code == grpc.StatusCode.UNAVAILABLE and "drain bound" in l_details and 0 < len(l_toks) < LONG
        assert refused and refused[0] == grpc.StatusCode.UNAVAILABLE and "shutting down" in refused[1]
        assert serve.returncode == 0, text[-3000:]
        assert "ActorDiedError" not in text and "drained; 1 stream(s) cut" in text, text[-3000:]
    finally:
        stop_group(serve, signal.SIGTERM, 30)
