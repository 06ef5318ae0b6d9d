"""One `pdcluster serve --config pools.yaml` process (its own Ray), in its own session, for two
things a separate process is needed for (one start: loading the workers is most of each test):

1. Pools tuned apart in pools.yaml (issue 18 point 5): prefill float32 with a float32 KV cache,
   decode float32 with an int8 KV cache; KV crosses int8 compressed and lands in the decode cache as
   codes + scales. Greedy tokens within the top-5 rule of transformers (tests/e2e/conftest.check_top5;
   the judge is transformers on our float32 weights, tests/hf_reference.py). The session clusters'
   pools are alike and their tests compare tokens exactly.
2. Ctrl-C drains instead of cutting (last: it stops the process): SIGINT on serve's whole process
   group (what a terminal's Ctrl-C does). Health turns NOT_SERVING and new requests get UNAVAILABLE
   at once; a stream that ends within --drain-timeout completes; one that does not ends with
   UNAVAILABLE naming the drain bound; the server then exits 0. Before, Ray's workers took the same
   SIGINT and died under the streams (ActorDiedError)."""
import asyncio
import os
import re
import signal
import subprocess
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdcluster.router.proto import generation_pb2 as pb
from pdcluster.router.proto import generation_pb2_grpc as pbg
from tests.e2e.conftest import PROMPTS, check_top5, hf_greedy
from tests.procs import BIN, free_port, serving_port, stop_group, wait_for

POOLS = """\
autoscaler: {enabled: false}
prefill:
  initial_replicas: 1
  resources: {cpus: 1, gpus: 0, threads: 1}
  dtype: float32
  kv_cache_dtype: auto
  quantization: none
decode:
  initial_replicas: 1
  resources: {cpus: 1, gpus: 0, threads: 1}
  dtype: float32
  kv_cache_dtype: int8
  quantization: none
  max_num_seqs: 8
"""
N = 12              # greedy tokens compared with transformers
DRAIN_S = 10.0
SHORT, LONG = 20, 2000      # output tokens: one stream ends within the drain bound, one cannot
KV_MIB = 32         # per pool: the decode pool's int8 cache holds LONG's ~2,000 tokens


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    (d / "pools.yaml").write_text(POOLS)
    log, metrics = d / "serve.log", free_port()
    argv = [str(BIN / "pdcluster"), "serve", "--config", str(d / "pools.yaml"), "--port", "0",
            "--metrics-port", str(metrics), "--http-port", "0", "--kv-cache-memory", str(KV_MIB),
            "--kv-compression", "int8", "--policy", "least-loaded", "--drain-timeout", str(DRAIN_S)]
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=d)
    try:
        wait_for(lambda: "pdcluster serving on" in log.read_text(), 240, "pdcluster serve", proc, log)
        yield {"proc": proc, "log": log, "port": serving_port(log),
               "metrics": f"http://127.0.0.1:{metrics}/metrics"}
    finally:
        stop_group(proc, signal.SIGINT, 60)


@pytest.fixture(scope="module")
def judge():
    """transformers on our float32 weights of the embedded GGUF (tests/hf_reference.py; the same
    object test_kv_compression.py judges with)."""
    from tests.hf_reference import transformers_on_our_weights
    return transformers_on_our_weights()


def test_pools_tuned_apart_serve_within_the_top5_rule(served, judge):
    from tests.faults.clusters import offline_llm
    llm = offline_llm()                    # the tokenizer and model config (the same embedded model)
    tok = llm.tokenizer
    prompts = [tok.encode(PROMPTS[i], add_special_tokens=False) for i in (1, 15)]   # code; ~50 tokens (4 blocks)

    async def go():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{served['port']}") as ch:
            stub = pbg.GenerationStub(ch)
            sp = pb.SamplingParams(max_tokens=N, temperature=0.0)

            async def one(ids):
                return [m async for m in stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=sp))]
            return await asyncio.gather(*(one(p) for p in prompts))

    results = asyncio.run(go())
    same = []
    for ids, msgs in zip(prompts, results):
        toks = [t for m in msgs for t in m.token_ids]
        p = msgs[0].placement
        assert p.remote_prefill and p.prefill_worker == "prefill-0"
        fp32 = -(-len(ids) // 16) * 16 * llm.engine.cfg.model.kv_bytes_per_token(4)   # whole blocks ship
        assert 0 < p.kv_bytes_transferred < fp32 / 3                                   # int8 on the wire
        same.append(check_top5(judge, ids, toks, hf_greedy(judge, ids, N)))
    print(f"\n[faults] tuned-apart cluster: leading tokens equal to transformers' greedy: {same} of {N}")
    # the decode pool's int8 cache holds ~4x the blocks of the prefill pool's float32 one in the same memory
    text = urllib.request.urlopen(served["metrics"], timeout=10).read().decode()
    free = dict(re.findall(r'pdcluster_kv_blocks_free\{worker="(\w+-\d+)"\} ([\d.]+)', text))
    assert float(free["decode-0"]) > 3.9 * float(free["prefill-0"]), free


def test_sigint_drains_streams_then_stops(served):
    serve, log, port = served["proc"], served["log"], served["port"]

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
