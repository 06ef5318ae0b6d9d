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
   SIGINT and died under the streams (ActorDiedError). The OpenAI HTTP API drains alike: a whole
   answer still running at the bound gets 503 naming it, a stream an error event naming it and
   [DONE] (before: a bare 500 and a cut stream, uvicorn's tracebacks in the log)."""
import asyncio
import json
import os
import re
import signal
import subprocess
import time
import urllib.request

import grpc
import httpx
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
HTTP_LONG = 1000            # output tokens of each HTTP request (whole, streamed): neither ends within it
KV_MIB = 64         # per pool: the decode pool's int8 cache (~5,800 tokens) holds LONG's and both HTTP_LONGs


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    (d / "pools.yaml").write_text(POOLS)
    log, metrics, http = d / "serve.log", free_port(), free_port()
    argv = [str(BIN / "pdcluster"), "serve", "--config", str(d / "pools.yaml"), "--port", "0",
            "--metrics-port", str(metrics), "--http-port", str(http), "--kv-cache-memory", str(KV_MIB),
            "--kv-compression", "int8", "--policy", "least-loaded", "--drain-timeout", str(DRAIN_S)]
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=d)
    try:
        wait_for(lambda: "pdcluster serving on" in log.read_text(), 240, "pdcluster serve", proc, log)
        yield {"proc": proc, "log": log, "port": serving_port(log),
               "metrics": f"http://127.0.0.1:{metrics}/metrics", "http": f"http://127.0.0.1:{http}/v1"}
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


def running(metrics: httpx.Response) -> float:
    m = re.search(r"^pdcluster_running_requests (\S+)$", metrics.text, re.M)
    return float(m.group(1)) if m else 0.0


def test_sigint_drains_streams_then_stops(served):
    serve, log, port, url = served["proc"], served["log"], served["port"], served["http"]
    body = {"model": "SmolLM2-135M-Instruct", "prompt": "Tell me about the sea.", "max_tokens": HTTP_LONG,
            "temperature": 0, "ignore_eos": True}

    async def http_whole(c, on):
        on.set()
        return await c.post(f"{url}/completions", json=body)

    async def http_stream(c, on):
        lines = []
        async with c.stream("POST", f"{url}/completions", json=body | {"stream": True}) as r:
            async for line in r.aiter_lines():
                if line:
                    lines.append(line)
                    on.set()
        return r.status_code, lines

    async def run():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch, httpx.AsyncClient(timeout=120) as c:
            model = (await c.get(f"{url}/models")).json()["data"][0]["id"]
            body["model"] = model
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
            w_on, h_on = asyncio.Event(), asyncio.Event()
            short = asyncio.ensure_future(stream(SHORT, s_toks, s_on))
            long = asyncio.ensure_future(stream(LONG, l_toks, l_on))
            whole = asyncio.ensure_future(http_whole(c, w_on))
            hstream = asyncio.ensure_future(http_stream(c, h_on))
            await asyncio.wait_for(asyncio.gather(s_on.wait(), l_on.wait(), w_on.wait(), h_on.wait()), 120)
            deadline = time.monotonic() + 60                    # all four have their first token
            while running(await c.get(served["metrics"])) < 4:
                assert time.monotonic() < deadline, "the four requests never all ran"
                await asyncio.sleep(0.1)
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
            return await short, await long, refused, time.monotonic() - t0, at_sigint, await whole, await hstream
    (s_toks, s_code, _), (l_toks, l_code, l_details), refused, took, at_sigint, whole, (h_status, h_lines) = \
        asyncio.run(run())
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
    assert whole.status_code == 503 and "drain bound" in whole.json()["error"]["message"], whole.text
    assert h_status == 200 and h_lines[-1] == "data: [DONE]", h_lines[-3:]
    assert "drain bound" in json.loads(h_lines[-2][len("data: "):])["error"]["message"], h_lines[-3:]
    assert 2 < len(h_lines) < HTTP_LONG                            # tokens came, and not all of them
    assert "ActorDiedError" not in text and "drained; 3 stream(s) cut" in text, text[-3000:]
    assert "Exception in ASGI application" not in text and "Traceback" not in text, text[-3000:]
