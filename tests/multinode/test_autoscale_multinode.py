"""Multi-node on one machine: under a burst the prefill pool grows 1 -> 2 replicas and the new replica
serves; idle again, it drains back to 1; every request of the run completes with the tokens of the
offline engine (greedy, same model and dtype).

The Ray cluster is `ray.cluster_utils.Cluster` with its nodes pre-added, not `AutoscalingCluster`:
the latter's shutdown runs `ray stop --force`, which stops every Ray instance on the host (other
test runs included). So Ray does not launch the second prefill node here; the pool autoscaler still
does all of its own part: a replica asks for one `prefill_pool` unit, which only the idle second
prefill node offers, loads the model there and registers with the router; scale-down drains it.

    head        1 CPU, no pool resource (nothing of ours is placed there)
    decode      1 CPU, decode_pool: 1
    prefill-a   1 CPU, prefill_pool: 1          the initial replica
    prefill-b   1 CPU, prefill_pool: 1          room for the second replica

The router runs in this process (the driver). Each worker runs 1 torch thread. Bounded: ~1-2 minutes.
"""
from __future__ import annotations

import asyncio
import socket
import time

import grpc
import pytest

from pdcluster.deploy.pools import parse_pools_config
from pdcluster.router.proto import generation_pb2_grpc as pbg
from pdcluster.deploy.ray_env import runtime_env
from tests.e2e.conftest import PROMPTS
from tests.multinode.client import generate

MAX_NEW = 4            # short decodes: the load sits in prefill, the pool under test
CLIENTS = 8            # concurrent requests during the burst
POOLS_YAML = """
autoscaler: {interval_s: 0.2}
prefill:
  min_replicas: 1
  max_replicas: 2
  autoscale: {signal: queued_prompt_tokens_per_replica, target: 100, upscale_delay_s: 0.6,
              downscale_delay_s: 2, max_step: 1, cooldown_s: 1}
decode: {min_replicas: 1, max_replicas: 1}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_nodes():
    import ray
    from ray.cluster_utils import Cluster as RayNodes
    nodes = RayNodes(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                           "dashboard_agent_listen_port": free_port()})
    try:
        nodes.add_node(num_cpus=1, resources={"decode_pool": 1})
        nodes.add_node(num_cpus=1, resources={"prefill_pool": 1})
        nodes.add_node(num_cpus=1, resources={"prefill_pool": 1})
        nodes.wait_for_nodes()
        ray.init(address=nodes.address, log_to_driver=False, runtime_env=runtime_env())
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()


def long_prompts(tok) -> list[list[int]]:
    """Distinct prompts of ~150-250 tokens (prefill-heavy), from the e2e prompts."""
    out = []
    for i, p in enumerate(PROMPTS[:8]):
        ids = tok.encode(f"[{i}] " + " ".join(PROMPTS[(i + j) % len(PROMPTS)] for j in range(10)),
                         add_special_tokens=False)
        out.append(ids[:250])
    return out


def test_prefill_pool_grows_under_a_burst_serves_and_shrinks_back(ray_nodes):
    from dataclasses import replace

    from pdcluster.deploy.launch import Cluster, ClusterConfig
    from pdcluster.engine import LLM, SamplingParams

    serve = parse_pools_config(POOLS_YAML, "test-pools.yaml")
    cfg = replace(ClusterConfig(**serve.to_cluster_kwargs()), port=0, metrics_port=0, kv_cache_memory=64 * 2**20,
                  policy="least-loaded", replica_start_timeout_s=120, drain_timeout_s=10)
    ref_llm = LLM(dtype="float32", kv_cache_memory=64 * 2**20, max_num_seqs=8)
    prompts = long_prompts(ref_llm.tokenizer)
    ref = [o.token_ids for o in ref_llm.generate(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0))]
    del ref_llm
    replies: list[tuple[int, object]] = []          # (prompt index, Reply) of every request of the run
    trace: list[tuple[float, int]] = []             # (s since start, prefill replicas) when it changes

    async def go():
        cluster = await Cluster(cfg).start()
        try:
            cluster.start_autoscaler(serve.autoscaling_rules(), serve.autoscaler.interval_s)
            pool = cluster.router.pools.prefill
            t0 = time.monotonic()

            async def watch(stop: asyncio.Event):
                while not stop.is_set():
                    if not trace or trace[-1][1] != len(pool):
                        trace.append((round(time.monotonic() - t0, 1), len(pool)))
                    await asyncio.sleep(0.05)

            async def client(stub, k: int, until):
                i = k
                while not until():
                    replies.append((i % len(prompts), await generate(stub, prompts[i % len(prompts)], MAX_NEW)))
                    i += CLIENTS

            def served_by_new() -> int:
                return sum(1 for _, r in replies if r.prefill_worker == "prefill-1")

            stop_watch = asyncio.Event()
            watcher = asyncio.ensure_future(watch(stop_watch))
            async with grpc.aio.insecure_channel(cluster.address) as ch:
                stub = pbg.GenerationStub(ch)
                # burst: until the second replica has served a few requests (bounded)
                burst_end = time.monotonic() + 150
                done = lambda: served_by_new() >= 3 or time.monotonic() > burst_end
                await asyncio.gather(*(client(stub, k, done) for k in range(CLIENTS)))
                assert served_by_new() >= 3, f"the new replica served {served_by_new()}; pool trace {trace}"
                # trickle (one request at a time, well under the target): the pool drains back to 1
                # with a request in flight most of the time, so the drain has running work to wait for
                shrink_end = time.monotonic() + 60
                await client(stub, 0, lambda: len(pool) == 1 or time.monotonic() > shrink_end)
                for _ in range(2):      # a couple more once it is back to one replica
                    replies.append((0, await generate(stub, prompts[0], MAX_NEW)))
            stop_watch.set()
            await watcher
            a = cluster.autoscaler
            counters = a.counters()
            text = cluster.router.metrics.render().decode()
            return counters, sorted(pool), text
        finally:
            await cluster.stop()

    counters, final_pool, text = asyncio.run(go())
    assert [n for _, n in trace][:3] == [1, 2, 1], f"prefill replicas over time: {trace}"
    assert final_pool == ["prefill-0"], (final_pool, trace)
    assert counters["replicas_added"] == {"prefill": 1} and counters["replicas_removed"] == {"prefill": 1}
    assert counters["action_errors"] == {}
    assert 'pdcluster_autoscaler_actions_total{action="add",pool="prefill",result="ok"} 1.0' in text
    assert 'pdcluster_autoscaler_actions_total{action="remove",pool="prefill",result="ok"} 1.0' in text
    # every request of the run: finished normally, exact tokens
    assert len(replies) >= CLIENTS
    bad = [(i, r) for i, r in replies if r.finish not in ("LENGTH", "STOP") or r.token_ids != ref[i]]
    assert not bad, f"{len(bad)} of {len(replies)} requests wrong, e.g. {bad[:2]} (want {ref[bad[0][0]]})"
    assert {r.prefill_worker for _, r in replies} == {"prefill-0", "prefill-1"}
