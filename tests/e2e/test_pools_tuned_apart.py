"""A 1 prefill + 1 decode cluster whose pools are tuned apart in pools.yaml (issue 18 point 5):
prefill float32 with a float32 KV cache, decode float32 with an int8 KV cache; KV crosses int8
compressed and lands in the decode cache as codes + scales. Greedy tokens within the top-5 rule of
transformers (tests/e2e/conftest.check_top5). Its own `pdcluster serve --config` (a separate Ray):
the session cluster's pools are alike and its tests compare tokens exactly."""
import asyncio
import re
import signal
import subprocess
import urllib.request

import grpc
import pytest

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
N = 12


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    d = tmp_path_factory.mktemp("tuned")
    (d / "pools.yaml").write_text(POOLS)
    log, metrics = d / "serve.log", free_port()
    argv = [str(BIN / "pdcluster"), "serve", "--config", str(d / "pools.yaml"), "--port", "0",
            "--metrics-port", str(metrics), "--http-port", "0", "--kv-cache-memory", "16",
            "--kv-compression", "int8", "--policy", "least-loaded"]
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=d)
    try:
        wait_for(lambda: "pdcluster serving on" in log.read_text(), 240, "pdcluster serve", proc, log)
        yield {"addr": f"127.0.0.1:{serving_port(log)}", "metrics": f"http://127.0.0.1:{metrics}/metrics"}
    finally:
        stop_group(proc, signal.SIGINT, 60)


def test_pools_tuned_apart_serve_within_the_top5_rule(tuned, llm, hf_ref):
    tok = llm.tokenizer
    prompts = [tok.encode(PROMPTS[i], add_special_tokens=False) for i in (1, 15)]   # code; ~50 tokens (4 blocks)

    async def go():
        async with grpc.aio.insecure_channel(tuned["addr"]) as ch:
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
        same.append(check_top5(hf_ref, ids, toks, hf_greedy(hf_ref, ids, N)))
    print(f"tuned-apart cluster: leading tokens equal to transformers' greedy: {same} of {N}")
    # the decode pool's int8 cache holds ~4x the blocks of the prefill pool's float32 one in the same 16 MiB
    text = urllib.request.urlopen(tuned["metrics"], timeout=10).read().decode()
    free = dict(re.findall(r'pdcluster_kv_blocks_free\{worker="(\w+-\d+)"\} ([\d.]+)', text))
    assert float(free["decode-0"]) > 3.9 * float(free["prefill-0"]), free
