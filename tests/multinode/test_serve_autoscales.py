"""`pdcluster serve --address auto --config pools.yaml` on a Ray cluster of `ray start` nodes, the
commands a `ray up` cluster runs, all on this machine:

    head        ray start --head          1 CPU, decode_pool: 1
    decode-b    ray start --address ...   1 CPU, decode_pool: 1
    prefill-a/b ray start --address ...   1 CPU, prefill_pool: 1 each

serve starts one replica per pool. Under a burst both pools grow 1 -> 2 (prefill on queued prompt
tokens, decode on KV utilization), the new replicas load on the b-nodes and serve; under a trickle
both drain back to 1; every request of the run gets the offline engine's tokens. Pool sizes come from
the router's /metrics, placements from the replies, decisions from serve's log. Ray's own autoscaler
does not launch nodes here (they are pre-started): a replica asks for a pool unit, which only the
idle b-node offers.

Teardown never runs `ray stop` (it stops every Ray instance of the host): each `ray start --block`
runs in its own session and is stopped with SIGTERM, then SIGKILL to its process group. Bounded:
~2-3 minutes on 2 cores.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml

from pdcluster.router.proto import generation_pb2_grpc as pbg
from tests.e2e.conftest import PROMPTS
from tests.multinode.client import generate
from tests.procs import BIN, free_port, port_open, serving_port, stop_group, wait_for

MAX_NEW = 4            # short decodes: both pools see the burst (prefill queue, decode KV)
CLIENTS = 8            # concurrent requests during the burst


def pools_yaml(metrics_port: int) -> str:
    def pool(metric: str, target: float) -> dict:
        return {"min_replicas": 1, "max_replicas": 2, "resources": {"cpus": 1, "gpus": 0, "threads": 1},
                "autoscale": {"signal": metric, "target": target, "upscale_delay_s": 0.6, "downscale_delay_s": 2,
                              "max_step": 1, "cooldown_s": 1},
                # the burst is sized for one token per decode step: n-gram drafts (on by default) end its
                # streams sooner and kept decode KV utilization under the target in one CI run here
                "speculative": "off"}
    return yaml.safe_dump({"router": {"host": "127.0.0.1", "port": 0, "metrics_port": metrics_port, "http_port": 0,
                                      "policy": "least-loaded"},
                           "autoscaler": {"interval_s": 0.2},
                           "prefill": pool("queued_prompt_tokens_per_replica", 100),
                           "decode": pool("kv_utilization", 0.4)})


NODES = [{"decode_pool": 1}, {"prefill_pool": 1}, {"prefill_pool": 1}]     # besides the head's


def _ray_start(argv: list[str], log: Path, env: dict) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([str(BIN / "ray"), "start", *argv, "--num-cpus=1", "--block",
                                 f"--dashboard-agent-listen-port={free_port()}"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


@pytest.fixture(scope="module")
def ray_cluster():
    """Head + 3 nodes, started one after the other (Ray gives a node 30 s to register; four at once
    on 2 cores miss it). Ray's token auth is off for this loopback cluster: `ray start` turns it on
    whenever the host has a token (~/.ray/auth_token), a driver given an address never does."""
    tmp = Path(tempfile.mkdtemp(prefix="pdc-ray-", dir="/tmp"))     # short: Ray's socket paths have a limit
    port = free_port()
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
                        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false"}
    procs = [_ray_start(["--head", f"--port={port}", f"--temp-dir={tmp}", "--include-dashboard=false",
                         "--resources=" + json.dumps({"decode_pool": 1}), f"--ray-client-server-port={free_port()}"],
                        tmp / "head.log", env)]
    try:
        wait_for(lambda: port_open(port), 60, "ray start --head", procs[0], tmp / "head.log")
        for i, res in enumerate(NODES):
            log = tmp / f"node{i}.log"
            procs.append(_ray_start([f"--address=127.0.0.1:{port}", "--resources=" + json.dumps(res),
                                     f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"],
                                    log, env))
            wait_for(lambda: "Ray runtime started" in log.read_text(), 90, f"ray start node {i}", procs[-1], log)
        yield {"env": env | {"RAY_ADDRESS": f"127.0.0.1:{port}"}, "tmp": tmp}
    finally:
        for p in reversed(procs):
            stop_group(p, signal.SIGTERM, 20)
        shutil.rmtree(tmp, ignore_errors=True)


def long_prompts(tok) -> list[list[int]]:
    """Distinct prompts of ~150-250 tokens (prefill-heavy), from the e2e prompts."""
    out = []
    for i, p in enumerate(PROMPTS[:8]):
        ids = tok.encode(f"[{i}] " + " ".join(PROMPTS[(i + j) % len(PROMPTS)] for j in range(10)),
                         add_special_tokens=False)
        out.append(ids[:250])
    return out


def pool_sizes(metrics_port: int) -> dict[str, int]:
    """pdcluster_pool_replicas{pool=...} from the router's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {m[1]: int(float(m[2])) for m in re.finditer(r'^pdcluster_pool_replicas\{pool="(\w+)"\} (\S+)$', text, re.M)}


def test_serve_config_scales_both_pools_out_and_back_with_exact_tokens(ray_cluster):
    from pdcluster.engine import LLM, SamplingParams
    ref_llm = LLM(dtype="float32", kv_cache_memory=64 * 2**20, max_num_seqs=8)
    prompts = long_prompts(ref_llm.tokenizer)
    ref = [o.token_ids for o in ref_llm.generate(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0))]
    del ref_llm

    tmp, metrics_port = ray_cluster["tmp"], free_port()
    (tmp / "pools.yaml").write_text(pools_yaml(metrics_port))
    log = tmp / "serve.log"
    argv = [str(BIN / "pdcluster"), "serve", "--address", "auto", "--config", str(tmp / "pools.yaml"),
            "--kv-cache-memory", "64"]
    with open(log, "w") as out:      # RAY_ADDRESS points `--address auto` at this cluster
        serve = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=ray_cluster["env"],
                                 start_new_session=True)
    replies: list[tuple[int, object]] = []          # (prompt index, Reply) of every request of the run
    trace: list[tuple[float, dict]] = []            # (s since the burst began, pool sizes) when they change
    try:
        wait_for(lambda: "pdcluster serving on" in log.read_text(), 240, "pdcluster serve", serve, log)
        port = serving_port(log)

        async def go():
            t0 = time.monotonic()

            async def watch(stop: asyncio.Event):
                while not stop.is_set():
                    sizes = await asyncio.to_thread(pool_sizes, metrics_port)
                    if not trace or trace[-1][1] != sizes:
                        trace.append((round(time.monotonic() - t0, 1), sizes))
                    await asyncio.sleep(0.1)

            async def client(stub, k: int, until):
                i = k
                while not until():
                    replies.append((i % len(prompts), await generate(stub, prompts[i % len(prompts)], MAX_NEW)))
                    i += CLIENTS

            def served_by_new() -> tuple[int, int]:
                return (sum(r.prefill_worker == "prefill-1" for _, r in replies),
                        sum(r.decode_worker == "decode-1" for _, r in replies))

            def sizes_now() -> dict:
                return trace[-1][1] if trace else {}

            stop_watch = asyncio.Event()
            watcher = asyncio.ensure_future(watch(stop_watch))
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = pbg.GenerationStub(ch)
                # burst: until both new replicas have served a few requests (bounded)
                burst_end = time.monotonic() + 180
                done = lambda: min(served_by_new()) >= 3 or time.monotonic() > burst_end
                await asyncio.gather(*(client(stub, k, done) for k in range(CLIENTS)))
                assert min(served_by_new()) >= 3, f"new replicas served {served_by_new()}; pool trace {trace}"
                # trickle (one request at a time, well under both targets): both pools drain back to 1,
                # with a request in flight most of the time, so the drains have running work to wait for
                shrink_end = time.monotonic() + 90
                await client(stub, 0, lambda: sizes_now() == {"prefill": 1, "decode": 1} or
                             time.monotonic() > shrink_end)
                for _ in range(2):      # a couple more once both are back to one replica
                    replies.append((0, await generate(stub, prompts[0], MAX_NEW)))
            stop_watch.set()
            await watcher
            return await asyncio.to_thread(lambda: urllib.request.urlopen(
                f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode())

        text = asyncio.run(go())
    finally:
        stop_group(serve, signal.SIGINT, 60)
    out = log.read_text()
    for pool in ("prefill", "decode"):
        sizes = [s[pool] for _, s in trace]
        assert [n for i, n in enumerate(sizes) if i == 0 or n != sizes[i - 1]] == [1, 2, 1], \
            f"{pool} replicas over time: {trace}"
        for action in ("add", "remove"):
            assert f'pdcluster_autoscaler_actions_total{{action="{action}",pool="{pool}",result="ok"}} 1.0' in text
        assert f"autoscale {pool} +1 (1 -> 2)" in out and f"autoscale {pool} -1 (2 -> 1)" in out, out[-3000:]
    assert 'result="failed"' not in text
    # every request of the run: finished normally, exact tokens, on all four replicas
    assert len(replies) >= CLIENTS
    bad = [(i, r) for i, r in replies if r.finish not in ("LENGTH", "STOP") or r.token_ids != ref[i]]
    assert not bad, f"{len(bad)} of {len(replies)} requests wrong, e.g. {bad[:2]} (want {ref[bad[0][0]]})"
    assert {r.prefill_worker for _, r in replies} == {"prefill-0", "prefill-1"}
    assert {r.decode_worker for _, r in replies} == {"decode-0", "decode-1"}
    # serve's own output: pool sizes, start-up progress as log lines (stdout is a file), no raw ANSI
    # escapes from Ray, a clean stop
    assert "1 prefill, 1 decode workers" in out and "starting 2 workers (loading the model)" in out, out[-3000:]
    assert "ready (2/2)" in out and "\x1b[" not in out and "shutting down" in out, out[-3000:]
