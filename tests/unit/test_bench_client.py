"""bench serve against a scripted grpc.aio Generation server on 127.0.0.1 (ephemeral port)."""

import asyncio
import contextlib
import json
import sys
import time

import grpc
import numpy as np
import pytest

from pdcluster.bench.datasets import BenchRequest, build_dataset
from pdcluster.bench.serve import arrival_offsets, longest_context, run_benchmark
from pdcluster.router.proto import generation_pb2 as pb
from pdcluster.router.proto import generation_pb2_grpc as pb_grpc

FIRST_DELAY_S = 0.05  # before the first token
TOKEN_DELAY_S = 0.02  # between later tokens
KV_BYTES = 4096  # per request
KV_MS = 2.0  # per request
# A prompt whose first id is one of these fails: before any token, or after the first one.
FAIL_UNAVAILABLE, FAIL_EXHAUSTED, FAIL_MIDSTREAM = 900_001, 900_002, 900_003

DOCUMENTED_KEYS = {
    "duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
    "output_throughput", "total_token_throughput", "request_goodput", "prefix_cache_hit_rate",
    "kv_bytes_transferred", "mean_kv_transfer_ms", "kv_transfer_bandwidth_gbps", "remote_prefill_fraction",
    "errors", "ttfts", "tpots", "itls", "e2els",
} | {f"{s}_{m}_ms" for s in ("mean", "median", "std", "p90", "p99") for m in ("ttft", "tpot", "itl", "e2el")}


def reply(prompt: list[int], n: int) -> list[int]:
    """The scripted reply: n tokens that depend on the prompt."""
    return [(len(prompt) + i) % 1000 for i in range(n)]


class ScriptedGeneration(pb_grpc.GenerationServicer):
    """One token per message: the first after FIRST_DELAY_S, then every TOKEN_DELAY_S; half the prompt
    is reported cached; every request is a remote prefill of KV_BYTES taking KV_MS."""

    def __init__(self):
        self.prompts: list[list[int]] = []
        self.received: list[float] = []     # time.perf_counter() of each request's arrival
        self.in_flight = 0
        self.max_in_flight = 0

    async def GetModelInfo(self, request, context):
        return pb.ModelInfo(model="scripted", max_context_tokens=4096, vocab_size=1000, prefill_workers=1,
                            decode_workers=1)

    async def Generate(self, request, context):
        prompt = list(request.token_ids.ids)
        self.prompts.append(prompt)
        self.received.append(time.perf_counter())
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if prompt[0] == FAIL_UNAVAILABLE:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "no ready worker")
            if prompt[0] == FAIL_EXHAUSTED:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "admission queue full")
            tokens = reply(prompt, request.sampling.max_tokens)
            await asyncio.sleep(FIRST_DELAY_S)
            for i, tok in enumerate(tokens):
                if i > 0:
                    await asyncio.sleep(TOKEN_DELAY_S)
                if prompt[0] == FAIL_MIDSTREAM and i == 1:
                    await context.abort(grpc.StatusCode.INTERNAL, "worker lost")
                last = i == len(tokens) - 1
                yield pb.GenerateResponse(
                    token_ids=[tok],
                    placement=pb.Placement(prefill_worker="p0", decode_worker="d0", remote_prefill=True,
                                           kv_bytes_transferred=KV_BYTES, kv_transfer_ms=KV_MS) if i == 0 else None,
                    finish_reason=pb.FINISH_REASON_LENGTH if last else pb.FINISH_REASON_UNSPECIFIED,
                    usage=pb.Usage(prompt_tokens=len(prompt), completion_tokens=len(tokens),
                                   cached_prompt_tokens=len(prompt) // 2) if last else None,
                )
        finally:
            self.in_flight -= 1


@contextlib.asynccontextmanager
async def scripted_server():
    server = grpc.aio.server()
    servicer = ScriptedGeneration()
    pb_grpc.add_GenerationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await server.stop(None)


def test_streams_and_failures_counted_by_code():
    ok = [BenchRequest(prompt_ids=[i + 1] * 4, output_len=3) for i in range(4)]
    bad = [BenchRequest(prompt_ids=[code, 1], output_len=3)
           for code in (FAIL_UNAVAILABLE, FAIL_UNAVAILABLE, FAIL_EXHAUSTED, FAIL_MIDSTREAM)]

    async def body():
        async with scripted_server() as (addr, _):
            return await run_benchmark(addr, ok + bad, float("inf"), 1.0, None, 0, {"ttft": 60_000.0},
                                       progress=False)

    r = asyncio.run(body())
    assert DOCUMENTED_KEYS <= r.keys()
    json.dumps(r, allow_nan=False)
    assert (r["completed"], r["failed"]) == (4, 4)
    assert r["errors"] == {"UNAVAILABLE": 2, "RESOURCE_EXHAUSTED": 1, "INTERNAL": 1}
    assert (r["total_input_tokens"], r["total_output_tokens"]) == (16, 12)
    assert r["request_goodput"] == pytest.approx(r["request_throughput"])
    # TTFT and E2EL are bounded below by the server's sleeps (a loaded machine only adds time);
    # single gaps are not (a late message shortens the next gap), so ITL/TPOT are checked by definition.
    assert min(r["ttfts"]) >= FIRST_DELAY_S * 1e3
    assert min(r["e2els"]) >= (FIRST_DELAY_S + 2 * TOKEN_DELAY_S) * 1e3
    assert r["duration"] * 1e3 >= max(r["e2els"])
    assert len(r["itls"]) == 8 and min(r["itls"]) > 0
    assert sum(r["itls"]) <= sum(r["e2els"]) - sum(r["ttfts"]) + 1e-6
    for ttft, tpot, e2el in zip(r["ttfts"], r["tpots"], r["e2els"], strict=True):
        assert ttft + 2 * tpot == pytest.approx(e2el)
    assert r["prefix_cache_hit_rate"] == pytest.approx(0.5)
    assert r["cached_lens"] == [2] * 4 and r["input_lens"] == [4] * 4     # per request, same order
    assert r["decode_workers"] == ["d0"] * 4 and r["prefill_workers"] == ["p0"] * 4
    assert r["kv_bytes_transferred"] == 4 * KV_BYTES and r["remote_prefill_fraction"] == 1.0
    assert r["mean_kv_transfer_ms"] == pytest.approx(KV_MS)
    assert r["kv_transfer_bandwidth_gbps"] == pytest.approx(KV_BYTES * 8e-6 / KV_MS)


def test_multi_turn_resends_history_within_concurrency():
    reqs = build_dataset({"dataset": "multi-turn", "num_conversations": 3, "turns": 3, "input_len": 4,
                          "output_len": 2}, vocab_size=1000)

    async def body():
        async with scripted_server() as (addr, servicer):
            r = await run_benchmark(addr, reqs, 200.0, 1.0, 2, 0, None, progress=False)
            return r, servicer

    r, servicer = asyncio.run(body())
    assert r["completed"] == 9 and r["failed"] == 0 and servicer.max_in_flight <= 2
    for c in range(3):
        turns = [r for r in reqs if r.conversation == c]
        expected = []
        for t in turns:
            expected = expected + (reply(expected, 2) if expected else []) + t.prompt_ids
            assert expected in servicer.prompts
    assert r["total_input_tokens"] == 3 * (4 + 10 + 16)


def test_follow_up_of_failed_turn_is_skipped():
    reqs = [BenchRequest(prompt_ids=[FAIL_UNAVAILABLE], output_len=2, conversation=0, turn=0),
            BenchRequest(prompt_ids=[5], output_len=2, conversation=0, turn=1)]

    async def body():
        async with scripted_server() as (addr, servicer):
            return await run_benchmark(addr, reqs, float("inf"), 1.0, None, 0, None, progress=False), servicer

    r, servicer = asyncio.run(body())
    assert r["errors"] == {"UNAVAILABLE": 1, "SKIPPED": 1} and len(servicer.prompts) == 1


def test_cli_writes_json_and_table(tmp_path):
    out = tmp_path / "result.json"

    async def body():
        async with scripted_server() as (addr, _):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pdcluster.bench.serve", "--addr", addr, "--num-prompts", "3", "--input-len", "5",
                "--output-len", "2", "--request-rate", "50", "--burstiness", "0.5", "--goodput", "ttft:60000",
                "--disable-tqdm", "--out", str(out), stdout=asyncio.subprocess.PIPE)
            stdout, _ = await proc.communicate()
            return proc.returncode, stdout.decode()

    rc, stdout = asyncio.run(body())
    assert rc == 0, stdout
    assert "============ Serving Benchmark Result ============" in stdout and "Mean TTFT (ms):" in stdout
    r = json.loads(out.read_text())
    assert DOCUMENTED_KEYS <= r.keys()
    assert r["completed"] == 3 and r["model"] == "scripted" and r["request_goodput"] > 0


def test_arrival_process():
    assert not arrival_offsets(5, float("inf"), 1.0, 0).any()
    poisson = arrival_offsets(20_000, 10.0, 1.0, 0)
    gaps = np.diff(poisson)
    assert poisson[0] == 0.0 and gaps.mean() == pytest.approx(0.1, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: CV 1
    smooth = np.diff(arrival_offsets(20_000, 10.0, 4.0, 0))
    assert smooth.mean() == pytest.approx(0.1, rel=0.03)
    assert smooth.std() / smooth.mean() == pytest.approx(0.5, rel=0.05)  # gamma shape k: CV 1/sqrt(k)
    assert (arrival_offsets(10, 5.0, 1.0, 3) == arrival_offsets(10, 5.0, 1.0, 3)).all()


def test_longest_context_counts_whole_conversations():
    reqs = build_dataset({"dataset": "multi-turn", "num_conversations": 2, "turns": 3, "input_len": 10,
                          "output_len": 5}, vocab_size=1000)
    assert longest_context(reqs) == 3 * (10 + 5)
    assert longest_context([BenchRequest(prompt_ids=[1] * 7, output_len=4)]) == 11


def test_a_replayed_trace_is_sent_at_its_own_arrival_times():
    """Requests with arrival_s (a mooncake replay's) go out at those times, not the arrival process's."""
    reqs = [BenchRequest(prompt_ids=[i + 1] * 4, output_len=1, arrival_s=t) for i, t in enumerate((0.0, 0.0, 0.4))]

    async def body():
        async with scripted_server() as (addr, servicer):
            t0 = time.perf_counter()
            # request_rate 1000 req/s would send all three within a few ms: the trace's times win
            r = await run_benchmark(addr, reqs, 1000.0, 1.0, None, 0, None, progress=False)
            return r, [t - t0 for t in servicer.received], servicer.prompts

    r, received, prompts = asyncio.run(body())
    assert r["completed"] == 3 and r["request_rate"] == "trace"
    firsts = [p[0] for p in prompts]           # the two arrivals at 0.0 may go out in either order
    assert sorted(firsts[:2]) == [1, 2] and firsts[2] == 3
    assert received[2] >= 0.4                   # sent no earlier than its arrival time (a lower bound: no
    assert r["duration"] >= 0.4                 # flakiness on a loaded host)
    with pytest.raises(ValueError, match="every request has an arrival time or none"):
        asyncio.run(run_benchmark("127.0.0.1:1", reqs + [BenchRequest(prompt_ids=[1])], 1.0, 1.0, None, 0, None,
                                  progress=False))
