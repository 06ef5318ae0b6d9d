"""The product end to end on loopback: router + 1 prefill + 1 decode Ray actor, real gRPC."""
import asyncio
import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdcluster.engine import SamplingParams
from pdcluster.router.proto import generation_pb2 as pb
from pdcluster.router.proto import generation_pb2_grpc as pbg
from tests.e2e.conftest import PROMPTS

MAX_NEW = 16


async def collect(stub, req, cancel_after=None):
    msgs = []
    call = stub.Generate(req)
    async for m in call:
        msgs.append(m)
        if cancel_after is not None and len(msgs) >= cancel_after:
            call.cancel()
            break
    return msgs


def greedy(ids=None, text=None, max_tokens=MAX_NEW, rid=""):
    sp = pb.SamplingParams(max_tokens=max_tokens, temperature=0.0)
    if ids is not None:
        return pb.GenerateRequest(request_id=rid, token_ids=pb.TokenIds(ids=ids), sampling=sp)
    return pb.GenerateRequest(request_id=rid, text=text, sampling=sp)


async def idle_pools(cluster, timeout=15.0):
    """Wait until every worker's free-block count is back to its pool size."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        st = await cluster.worker_status()
        if all(s.engine.free_blocks == s.engine.num_blocks for s in st.values()):
            return st
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"blocks not freed: {st}")
        await asyncio.sleep(0.2)


def test_cluster_greedy_equals_offline_engine_8_at_a_time(cluster, llm):
    tok = llm.tokenizer
    prompts = [tok.encode(p, add_special_tokens=False) for p in PROMPTS]
    offline = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0))]

    async def go():
        sem = asyncio.Semaphore(8)
        async with grpc.aio.insecure_channel(cluster.address) as ch:
            stub = pbg.GenerationStub(ch)

            async def one(ids):
                async with sem:
                    return await collect(stub, greedy(ids))
            return await asyncio.gather(*(one(p) for p in prompts))

    results = cluster.run(go())
    for ids, msgs, ref in zip(prompts, results, offline):
        toks = [t for m in msgs for t in m.token_ids]
        assert toks == ref
        assert msgs[0].HasField("placement") and msgs[0].placement.remote_prefill
        assert msgs[0].placement.kv_bytes_transferred > 0
        last = msgs[-1]
        assert last.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
        assert last.usage.prompt_tokens == len(ids) and last.usage.completion_tokens == len(toks)
        assert "".join(m.text for m in msgs) == tok.decode(toks, skip_special_tokens=True)


def test_cached_prompt_sends_only_uncached_blocks(cluster, llm):
    ids = llm.tokenizer.encode(PROMPTS[15] * 2, add_special_tokens=False)      # > 3 blocks
    assert len(ids) > 48

    async def go():
        async with grpc.aio.insecure_channel(cluster.address) as ch:
            stub = pbg.GenerationStub(ch)
            a = await collect(stub, greedy(ids + [11], max_tokens=4))
            b = await collect(stub, greedy(ids + [12], max_tokens=4))
            return a, b

    a, b = cluster.run(go())
    m = llm.engine.cfg.model
    per_block = 16 * m.kv_bytes_per_token(4)
    n_blocks = -(-(len(ids) + 1) // 16)
    assert a[0].placement.kv_bytes_transferred <= n_blocks * per_block
    sent_b = b[0].placement.kv_bytes_transferred
    assert 0 < sent_b < a[0].placement.kv_bytes_transferred
    skipped = n_blocks - sent_b // per_block
    assert skipped == len(ids) // 16                       # every full prompt block came from the cache
    assert b[-1].usage.cached_prompt_tokens >= 16 * (len(ids) // 16) - 16


def test_cancel_mid_stream_frees_blocks_on_both_workers(cluster):
    async def go():
        before = await idle_pools(cluster)
        async with grpc.aio.insecure_channel(cluster.address) as ch:
            stub = pbg.GenerationStub(ch)
            req = pb.GenerateRequest(text="Write a long story about the sea. " * 4,
                                     sampling=pb.SamplingParams(max_tokens=400, ignore_eos=True))
            msgs = await collect(stub, req, cancel_after=3)
            assert len(msgs) == 3
            after = await idle_pools(cluster)
            # the next request is served normally
            ok = await collect(stub, greedy(text="Hello", max_tokens=3))
        return before, after, ok

    before, after, ok = cluster.run(go())
    assert {k: v.engine.free_blocks for k, v in after.items()} == {k: v.engine.free_blocks for k, v in before.items()}
    assert ok[-1].finish_reason == pb.FINISH_REASON_LENGTH


@pytest.mark.parametrize("req, code, field", [
    (pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=4)), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (pb.GenerateRequest(text="", sampling=pb.SamplingParams(max_tokens=4)), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(max_tokens=0)), grpc.StatusCode.INVALID_ARGUMENT,
     "max_tokens"),
    (pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(max_tokens=2, temperature=-1)),
     grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(max_tokens=2, top_p=1.5)),
     grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 49152]), sampling=pb.SamplingParams(max_tokens=2)),
     grpc.StatusCode.INVALID_ARGUMENT, "vocab"),
    (pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(max_tokens=10**6)),
     grpc.StatusCode.INVALID_ARGUMENT, "context length"),
])
def test_bad_input_gets_status_code_and_next_request_is_served(cluster, req, code, field):
    async def go():
        async with grpc.aio.insecure_channel(cluster.address) as ch:
            stub = pbg.GenerationStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await collect(stub, req)
            ok = await collect(stub, greedy(text="Hi", max_tokens=2))
            return e.value, ok
    err, ok = cluster.run(go())
    assert err.code() == code and field in err.details()
    assert ok[-1].usage.completion_tokens == 2


def test_duplicate_in_flight_request_id(cluster):
    async def go():
        async with grpc.aio.insecure_channel(cluster.address) as ch:
            stub = pbg.GenerationStub(ch)
            long = pb.GenerateRequest(request_id="dup", text="Count to one hundred:",
                                      sampling=pb.SamplingParams(max_tokens=60, ignore_eos=True))
            t = asyncio.ensure_future(collect(stub, long))
            await asyncio.sleep(0.3)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await collect(stub, pb.GenerateRequest(request_id="dup", text="x",
                                                       sampling=pb.SamplingParams(max_tokens=2)))
            first = await t
            return e.value, first
    err, first = cluster.run(go())
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert first[-1].usage.completion_tokens == 60


def test_a_request_id_is_the_client_s_whatever_n_and_free_again_once_it_ends(cluster, caplog):
    """A named request with n = 2 in flight holds its id for n = 1 too (its choices are not "x-0",
    "x-1" to the check). And once it ends (here: cancelled mid-stream, which aborts it on both
    workers), the id is free: the retry prefills remotely again. Before, the workers knew the
    client's id itself, and the prefill worker's abort fence refused the retry for 10 minutes."""
    import logging
    caplog.set_level(logging.INFO, logger="pdcluster.router")

    async def go():
        async with grpc.aio.insecure_channel(cluster.address) as ch:
            stub = pbg.GenerationStub(ch)
            two = pb.GenerateRequest(request_id="twice", text="Count to one hundred:",
                                     sampling=pb.SamplingParams(max_tokens=40, ignore_eos=True, n=2))
            t = asyncio.ensure_future(collect(stub, two))
            await asyncio.sleep(0.3)
            with pytest.raises(grpc.aio.AioRpcError) as dup:
                await collect(stub, greedy(text="x", max_tokens=2, rid="twice"))
            await t
            cut = await collect(stub, pb.GenerateRequest(request_id="again", text="Tell me a long story.",
                                sampling=pb.SamplingParams(max_tokens=200, ignore_eos=True)), cancel_after=3)
            await idle_pools(cluster)
            retry = await collect(stub, pb.GenerateRequest(request_id="again", text="Tell me a long story.",
                                  sampling=pb.SamplingParams(max_tokens=4, ignore_eos=True)))
            return dup.value, cut, retry
    dup, cut, retry = cluster.run(go())
    assert dup.code() == grpc.StatusCode.ALREADY_EXISTS and len(cut) == 3
    assert retry[-1].usage.completion_tokens == 4 and {m.request_id for m in retry} == {"again"}
    lines = [r.request for r in caplog.records if hasattr(r, "request") and r.request["id"].startswith("again@")]
    assert [(x["status"], x["kind"]) for x in lines] == [("cancelled", "remote"), ("length", "remote")], lines


def test_health_follows_the_workers(cluster):
    """gRPC health is NOT_SERVING while the router has no healthy worker of a role it needs (here
    Router.ready made to say so), and SERVING again after, without a restart."""
    r = cluster.router

    async def status(stub):
        return (await stub.Check(health_pb2.HealthCheckRequest())).status

    async def go():
        async with grpc.aio.insecure_channel(cluster.address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            seen = [await status(stub)]
            r.ready = lambda: False
            try:
                for _ in range(40):
                    await asyncio.sleep(0.1)
                    if (s := await status(stub)) != seen[-1]:
                        seen.append(s)
                        break
            finally:
                del r.ready
            for _ in range(40):
                await asyncio.sleep(0.1)
                if (s := await status(stub)) != seen[-1]:
                    seen.append(s)
                    break
            return seen
    S = health_pb2.HealthCheckResponse
    assert cluster.run(go()) == [S.SERVING, S.NOT_SERVING, S.SERVING]


def test_health_reflection_and_model_info(cluster):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async def go():
        async with grpc.aio.insecure_channel(cluster.address) as ch:
            h = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
            info = await pbg.GenerationStub(ch).GetModelInfo(pb.ModelInfoRequest())
            refl = reflection_pb2_grpc.ServerReflectionStub(ch)
            names = []
            async for r in refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])):
                names += [s.name for s in r.list_services_response.service]
            return h, info, names
    h, info, names = cluster.run(go())
    assert h.status == health_pb2.HealthCheckResponse.SERVING
    assert info.vocab_size == 49152 and info.prefill_workers == 1 and info.decode_workers == 1
    assert "pdcluster.v1.Generation" in names and "grpc.health.v1.Health" in names


def test_router_keeps_measured_link_bandwidth(cluster):
    cluster.run(cluster.router.refresh_loads())
    links = cluster.router.workers.loads["prefill-0"].links
    assert links and links[0].dst_id == "decode-0" and links[0].ewma_bytes_per_s > 0 and links[0].count > 0


def test_idle_link_probe_through_the_prefill_actor(cluster):
    """The router's probe path end to end: prefill actor -> its TCP transport -> the decode worker's
    KV endpoint (secret checked); the sample reaches the router's link table with the next poll."""
    r = cluster.router
    d = r.workers.loads["decode-0"]

    async def go():
        before = next((ln.count for ln in r.workers.loads["prefill-0"].links if ln.dst_id == "decode-0"), 0)
        bps = await r.workers.prefill["prefill-0"].probe(d.kv_address, "decode-0")
        await r.refresh_loads()
        after = next(ln.count for ln in r.workers.loads["prefill-0"].links if ln.dst_id == "decode-0")
        return before, bps, after
    before, bps, after = cluster.run(go())
    assert d.kv_address and bps > 1e6 and after > before   # (the router's own probes may add samples)
    assert r.telemetry.links.links[("prefill-0", "decode-0")].count == after


def test_bench_serve_against_live_cluster(cluster, tmp_path):
    from pdcluster.bench.datasets import build_dataset
    from pdcluster.bench.serve import run_benchmark
    reqs = build_dataset({"dataset": "random", "num_prompts": 6, "input_len": 40, "output_len": 8,
                          "seed": 0, "ignore_eos": True}, 49152)
    res = cluster.run(run_benchmark(cluster.address, reqs, request_rate=float("inf"), burstiness=1.0,
                                    max_concurrency=4, seed=0, goodput={"tpot": 10_000.0}, progress=False))
    out = tmp_path / "r.json"
    out.write_text(json.dumps(res))
    d = json.loads(out.read_text())
    for k in ("mean_ttft_ms", "p99_tpot_ms", "median_itl_ms", "p90_e2el_ms", "request_throughput",
              "output_throughput", "request_goodput", "prefix_cache_hit_rate", "kv_bytes_transferred"):
        assert k in d, k
    assert d["completed"] == 6 and d["failed"] == 0 and d["kv_bytes_transferred"] > 0


def test_prometheus_metrics_move_with_a_request(cluster):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    m = cluster.router.metrics
    port = m.serve_http("127.0.0.1", 0)          # the exporter `pdcluster serve --metrics-port` starts

    async def scrape() -> dict:
        await cluster.router.refresh_loads()     # what the 0.5 s status poll does
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(body) for s in fam.samples}

    async def go():
        before = await scrape()
        async with grpc.aio.insecure_channel(cluster.address) as ch:
            msgs = await collect(pbg.GenerationStub(ch), greedy(text="Metrics are numbers about", max_tokens=4))
        return before, msgs, await scrape()

    try:
        before, msgs, after = cluster.run(go())
    finally:
        m.stop_http()
    link = ("pdcluster_kv_transfer_bytes_total", (("dst", "decode-0"), ("src", "prefill-0")))
    ttft = ("pdcluster_ttft_seconds_count", ())
    remote = ("pdcluster_placement_decisions_total", (("kind", "remote"),))
    assert after[ttft] == before[ttft] + 1
    assert after[remote] == before[remote] + 1
    # the link counter is in wire bytes (payload + frame headers); placement reports the payload
    payload = msgs[0].placement.kv_bytes_transferred
    assert 0 < payload <= after[link] - before.get(link, 0) <= payload * 1.02
    assert after[("pdcluster_requests_total", (("status", "length"),))] >= 1
    assert after[("pdcluster_kv_blocks_free", (("worker", "decode-0"),))] > 0
    assert after[("pdcluster_prefix_cache_queries_tokens_total", (("worker", "prefill-0"),))] > 0
    assert after[("pdcluster_pool_replicas", (("pool", "prefill"),))] == 1
    assert after[("pdcluster_queue_depth", ())] == 0 and after[("pdcluster_running_requests", ())] == 0
    # peer pulls (off here): each worker reports its pull figures, as puller and as holder
    for w in ("prefill-0", "decode-0"):
        assert after[("pdcluster_kv_pulls_total", (("worker", w),))] == 0
        assert after[("pdcluster_kv_pull_served_blocks_total", (("tier", "host"), ("worker", w)))] == 0


def test_global_prefix_index_tracks_worker_caches_and_cost_model_places(cluster, llm):
    from pdcluster.engine.hashing import block_hashes
    from pdcluster.router.placement import make_policy
    r = cluster.router
    ids = llm.tokenizer.encode(PROMPTS[15] * 3, add_special_tokens=False)
    hashes = block_hashes(ids, 16)

    async def go():
        async with grpc.aio.insecure_channel(cluster.address) as ch:
            stub = pbg.GenerationStub(ch)
            await collect(stub, greedy(ids, max_tokens=2))
            await r.refresh_loads()                      # the poll that carries the block events
            match = r.index.match(hashes)
            pending = r.index.pending("prefill-0") | r.index.pending("decode-0")
            old = r.policy
            r.policy = make_policy("cost-model", index=r.index, telemetry=r.telemetry)
            try:
                short = await collect(stub, greedy(text="Hi there", max_tokens=4))
            finally:
                r.policy = old
            return match, pending, short

    match, pending, short = cluster.run(go())
    full = (len(ids) - 1) // 16
    assert match.get("prefill-0", 0) >= full - 1 and match.get("decode-0", 0) >= full - 1, match
    assert not pending & set(hashes[:full - 1])     # the workers' own events confirmed the placement's guess
    # an idle decode worker and an 2-token prompt: the cost model prefills it locally
    assert short[0].placement.remote_prefill is False and short[0].placement.decode_worker == "decode-0"
    ref = llm.generate(["Hi there"], SamplingParams(max_tokens=4, temperature=0))[0].token_ids
    assert [t for m in short for t in m.token_ids] == ref


def test_workers_that_cannot_be_placed_fail_clearly_instead_of_hanging(cluster):
    from pdcluster.deploy.flags import dotted, override
    from pdcluster.deploy.launch import Cluster, ClusterConfig
    # the session cluster holds every pool resource and this host has no GPU: nothing can be placed
    c2 = Cluster(override(ClusterConfig(), dotted(server__port=0, server__metrics_port=0, server__http_port=0, engine__use_gpu=True,
                                                  pools__start_timeout_s=3,
                                                  engine__cache__kv_cache_memory=32 * 2**20)))
    with pytest.raises(RuntimeError, match="did not start within 3s"):
        cluster.run(c2.start())
    ok = cluster.run(collect_one(cluster))
    assert ok[-1].usage.completion_tokens == 2


async def collect_one(cluster):
    async with grpc.aio.insecure_channel(cluster.address) as ch:
        return await collect(pbg.GenerationStub(ch), greedy(text="Hi", max_tokens=2))
