"""`pdcluster bench serve`: a load-generating client against a running router (gRPC), or against any
OpenAI-compatible server (--backend openai / openai-chat, bench/openai_client.py): same datasets, same
metrics, so pdcluster, vLLM and llama.cpp's llama-server are measured by one client.

Library use (e.g. a scenario runner, inside its own event loop):
    reqs = build_dataset({"dataset": "shared-prefix", "seed": 1}, vocab_size)
    result = await run_benchmark("127.0.0.1:50051", reqs, request_rate=8.0, burstiness=1.0,
                                 max_concurrency=None, seed=1, goodput={"ttft": 500.0}, progress=False)
CLI: python -m pdcluster.bench.serve --dataset random --num-prompts 50 --request-rate 4 --out result.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from typing import Any

import grpc
import httpx
import numpy as np
from tqdm import tqdm

from pdcluster.bench import openai_client
from pdcluster.bench.datasets import (DATASETS, DEFAULTS, PATH_DATASETS, BenchRequest, build_dataset, check_counts,
                                      check_trace)
from pdcluster.bench.metrics import RequestOutput, StreamRecorder, calculate_metrics, format_table, parse_goodput
from pdcluster.router.proto import generation_pb2 as pb
from pdcluster.router.proto import generation_pb2_grpc as pb_grpc

SKIPPED = "SKIPPED"  # error key of a multi-turn turn whose previous turn failed (never sent)


def arrival_offsets(n: int, request_rate: float, burstiness: float, seed: int) -> np.ndarray:
    """Send times (s, from the start) of n requests: the first at 0, then gamma-distributed gaps with
    shape=burstiness and mean 1/request_rate (burstiness 1 = Poisson); all 0 when the rate is inf."""
    if request_rate == float("inf"):
        return np.zeros(n)
    if request_rate <= 0 or burstiness <= 0:
        raise ValueError("request_rate and burstiness must be > 0")
    gaps = np.random.default_rng(seed).gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=n)
    return np.concatenate(([0.0], np.cumsum(gaps[:-1])))


def trace_offsets(requests: list[BenchRequest]) -> np.ndarray | None:
    """The requests' own send times (s) when every one has arrival_s (a replayed trace), else None."""
    if not requests or any(r.arrival_s is None for r in requests):
        if any(r.arrival_s is not None for r in requests):
            raise ValueError("either every request has an arrival time or none")
        return None
    out = np.array([r.arrival_s for r in requests], dtype=float)
    if (out < 0).any() or (np.diff(out) < 0).any():
        raise ValueError("arrival times must be >= 0 and in list order")
    return out


def _grpc_request(req: BenchRequest, prompt_ids: list[int] | None) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(max_tokens=req.output_len, temperature=0.0, ignore_eos=req.ignore_eos)
    if prompt_ids is not None:
        return pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt_ids), sampling=sampling)
    return pb.GenerateRequest(text=req.prompt_text, sampling=sampling)


async def _generate(stub: pb_grpc.GenerationStub, req: BenchRequest, prompt_ids: list[int] | None) -> RequestOutput:
    """Sends one request and records its stream."""
    rec = StreamRecorder(time.perf_counter(), len(prompt_ids) if prompt_ids is not None else 0)
    try:
        async for msg in stub.Generate(_grpc_request(req, prompt_ids)):
            rec.on_message(msg, time.perf_counter())
    except grpc.aio.AioRpcError as e:
        return rec.fail(e.code().name, time.perf_counter())
    return rec.finish(time.perf_counter())


def _check_requests(requests: list[BenchRequest], max_concurrency: int | None) -> None:
    if not requests:
        raise ValueError("no requests to send")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1 or None, got {max_concurrency}")
    turns = [(r.conversation, r.turn) for r in requests if r.conversation is not None]
    present = set(turns)
    if len(present) != len(turns):
        raise ValueError("a (conversation, turn) pair appears twice")
    for r in requests:
        if r.conversation is None:
            continue
        if r.prompt_ids is None:
            raise ValueError(f"conversation {r.conversation} turn {r.turn}: multi-turn needs prompt_ids")
        if r.turn > 0 and (r.conversation, r.turn - 1) not in present:
            raise ValueError(f"conversation {r.conversation} turn {r.turn} has no turn {r.turn - 1}")


def longest_context(requests: list[BenchRequest]) -> int:
    """Upper bound (tokens) on prompt + max_tokens of any one request; a conversation's last turn
    carries every earlier prompt and reply. Text prompts count as 0 (tokenized by the router)."""
    per_conversation: dict[int, int] = {}
    longest = 0
    for r in sorted(requests, key=lambda r: r.turn):
        own = len(r.prompt_ids or ()) + r.output_len
        if r.conversation is None:
            longest = max(longest, own)
        else:
            per_conversation[r.conversation] = per_conversation.get(r.conversation, 0) + own
            longest = max(longest, per_conversation[r.conversation])
    return longest


async def run_benchmark(
    addr: str,
    requests: list[BenchRequest],
    request_rate: float,
    burstiness: float,
    max_concurrency: int | None,
    seed: int,
    goodput: dict[str, float] | None,
    progress: bool = True,
    backend: str = "grpc",
    model: str = "",
    tokenizer=None,
) -> dict[str, Any]:
    """Sends `requests` in list order at the arrival process's times (or at their own arrival_s, a
    replayed trace's: request_rate and burstiness are then unused), at most max_concurrency in
    flight (None = unbounded), and returns calculate_metrics' result dict plus the run settings.

    A multi-turn request (turn > 0) is sent at its arrival time or when the previous turn's reply
    arrived, whichever is later, with prompt = previous prompt + reply token ids + its prompt_ids.
    It waits for its predecessor without holding a concurrency slot; its latencies count from sending.
    backend "openai" / "openai-chat": `addr` is the server's base URL (…/v1) and `model` its model id.
    """
    _check_requests(requests, max_concurrency)
    offsets = trace_offsets(requests)
    if backend != "grpc" and any(r.conversation is not None for r in requests):
        raise ValueError("multi-turn datasets need the reply's token ids: --backend grpc only")
    loop = asyncio.get_running_loop()
    # (conversation, turn) -> that turn's prompt + reply token ids, or None when it failed.
    histories: dict[tuple[int, int], asyncio.Future[list[int] | None]] = {
        (r.conversation, r.turn): loop.create_future() for r in requests if r.conversation is not None
    }
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
    bar = tqdm(total=len(requests), disable=not progress, desc="requests")

    async def send(conn, req: BenchRequest, prompt: list[int] | None) -> RequestOutput:
        if backend == "grpc":
            return await _generate(conn, req, prompt)
        chat = backend == "openai-chat"
        return await openai_client.generate(conn, addr, openai_client.body(req, prompt, model, chat, tokenizer),
                                            len(prompt or ()), chat)

    async def one(conn, req: BenchRequest) -> RequestOutput:
        prompt, skipped = req.prompt_ids, False
        if req.conversation is not None and req.turn > 0:
            history = await histories[(req.conversation, req.turn - 1)]
            skipped = history is None
            prompt = None if skipped else history + req.prompt_ids
        if skipped:
            out = RequestOutput(error=SKIPPED)
        else:
            async with limit:
                out = await send(conn, req, prompt)
        if req.conversation is not None:
            histories[(req.conversation, req.turn)].set_result(prompt + out.token_ids if out.success else None)
        bar.update(1)
        return out

    replay = offsets is not None
    if offsets is None:
        offsets = arrival_offsets(len(requests), request_rate, burstiness, seed)
    if backend == "grpc":
        session = grpc.aio.insecure_channel(addr)
    else:
        session = httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=None))
    async with session:
        conn = pb_grpc.GenerationStub(session) if backend == "grpc" else session
        start = time.perf_counter()
        tasks = []
        for req, offset in zip(requests, offsets):
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            tasks.append(asyncio.create_task(one(conn, req)))
        outputs = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    result = calculate_metrics(outputs, duration, goodput)
    # "inf" as a string like vLLM's result file: json would write the non-standard Infinity.
    rate = "trace" if replay else request_rate if request_rate < float("inf") else "inf"
    result.update(request_rate=rate, burstiness=burstiness, max_concurrency=max_concurrency)
    return result


async def get_model_info(addr: str) -> pb.ModelInfo:
    async with grpc.aio.insecure_channel(addr) as channel:
        return await pb_grpc.GenerationStub(channel).GetModelInfo(pb.ModelInfoRequest(), timeout=10.0)


def _dataset_name(value: str) -> str:
    if value in DATASETS[:-len(PATH_DATASETS)] or any(value.startswith(p) and len(value) > len(p)
                                                      for p in PATH_DATASETS):
        return value
    raise argparse.ArgumentTypeError(f"{value!r}: choose from {', '.join(DATASETS)}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    run = parser.add_argument_group("load")
    run.add_argument("--backend", default="grpc", choices=openai_client.BACKENDS,
                     help="grpc: pdcluster's Generate; openai / openai-chat: any OpenAI-compatible server at "
                          "--base-url (/v1/completions with token-id prompts / /v1/chat/completions with text)")
    run.add_argument("--addr", default="127.0.0.1:50051", help="router gRPC address host:port (--backend grpc)")
    run.add_argument("--base-url", default="http://127.0.0.1:8000/v1",
                     help="the OpenAI-compatible server's base URL (--backend openai / openai-chat)")
    run.add_argument("--num-prompts", type=int, default=d["num_prompts"], help="requests (random, mixed, sharegpt)")
    run.add_argument("--request-rate", type=float, default=float("inf"), help="req/s; inf = all at once")
    run.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps; 1 = Poisson")
    run.add_argument("--max-concurrency", type=int, default=None, help="max requests in flight (default: no limit)")
    run.add_argument("--seed", type=int, default=d["seed"], help="seeds the dataset and the arrivals")
    run.add_argument("--ignore-eos", action="store_true", help="generate exactly the output length")
    run.add_argument("--goodput", nargs="+", metavar="NAME:MS", default=None,
                     help="SLO targets in ms, NAME in ttft, tpot, e2el; e.g. --goodput ttft:500 tpot:50")
    run.add_argument("--out", default=None, help="write the result JSON here")
    run.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    data = parser.add_argument_group("dataset")
    data.add_argument("--dataset", type=_dataset_name, default=d["dataset"], help=" | ".join(DATASETS))
    data.add_argument("--input-len", type=int, default=d["input_len"], help="prompt tokens (per turn in multi-turn)")
    data.add_argument("--output-len", type=int, default=d["output_len"],
                      help="max output tokens (default: 128; sharegpt: the reply's word count)")
    data.add_argument("--range-ratio", type=float, default=d["range_ratio"], help="lengths vary by +-ratio")
    data.add_argument("--num-groups", type=int, default=d["num_groups"], help="shared-prefix groups")
    data.add_argument("--prompts-per-group", type=int, default=d["prompts_per_group"], help="prompts per shared prefix")
    data.add_argument("--prefix-len", type=int, default=d["prefix_len"], help="shared system prompt tokens")
    data.add_argument("--suffix-len", type=int, default=d["suffix_len"], help="per-prompt tokens after it")
    data.add_argument("--num-conversations", type=int, default=d["num_conversations"], help="multi-turn conversations")
    data.add_argument("--turns", type=int, default=d["turns"], help="turns per conversation")
    data.add_argument("--first-input-len", type=int, default=d["first_input_len"],
                      help="multi-turn: turn 0's prompt tokens, each conversation's opening context (default: "
                           "--input-len)")
    data.add_argument("--long-fraction", type=float, default=d["long_fraction"], help="mixed: share of long prompts")
    data.add_argument("--long-input-len", type=int, default=d["long_input_len"], help="mixed: long prompt tokens")
    trace = parser.add_argument_group("trace replay (--dataset mooncake:PATH, bench/trace_dataset.py): arrivals "
                                      "are the trace's timestamps; --request-rate and --burstiness are unused")
    trace.add_argument("--block-size", type=int, default=d["block_size"],
                       help="the engine's tokens per KV block (its cache block_size)")
    trace.add_argument("--token-scale", type=int, default=d["token_scale"],
                       help="engine blocks per 512-token trace block: prompt lengths scale by "
                            "token_scale * block_size / 512")
    trace.add_argument("--output-scale", type=float, default=d["output_scale"],
                       help="output tokens per trace output token (default: the prompt's length factor)")
    trace.add_argument("--time-scale", type=float, default=d["time_scale"],
                       help="replay seconds per trace second (0.5: twice as fast)")
    trace.add_argument("--start", type=int, default=d["start"], help="trace lines to skip")
    trace.add_argument("--max-requests", type=int, default=d["max_requests"], help="requests to replay (default: all)")
    trace.add_argument("--conversation-sample", type=int, default=d["conversation_sample"],
                       help="replay 1 conversation in this many (whole conversations: a short replay keeps the "
                            "trace's reuse)")


def target(args: argparse.Namespace):
    """(address, model id, vocab size, context length or None, tokenizer or None) of the server to load.
    OpenAI servers do not say their vocabulary: random prompts draw from the embedded model's, so
    point those backends at servers of that model (the same GGUF)."""
    if args.backend == "grpc":
        info = asyncio.run(get_model_info(args.addr))
        return args.addr, info.model, info.vocab_size, info.max_context_tokens, None
    from pdcluster.engine.loader import load_model_config
    from pdcluster.engine.tokenizer import load_tokenizer
    model, context = asyncio.run(openai_client.model_of(args.base_url))
    mcfg = load_model_config(None)
    return args.base_url.rstrip("/"), model, mcfg.vocab_size, context, load_tokenizer(mcfg)


def reserved_ids(vocab_size: int, tokenizer=None) -> list[int]:
    """Token ids a replayed trace must not draw: the tokenizer's added (special) tokens. The server's
    tokenizer is not known over gRPC: the embedded model's, whose vocabulary must have vocab_size
    entries (as for --backend openai's random prompts)."""
    if tokenizer is None:
        from pdcluster.engine.loader import load_model_config
        from pdcluster.engine.tokenizer import load_tokenizer
        mcfg = load_model_config(None)
        if mcfg.vocab_size != vocab_size:
            raise ValueError(f"the server's vocabulary ({vocab_size}) is not the embedded model's "
                             f"({mcfg.vocab_size}): its special tokens are unknown here")
        tokenizer = load_tokenizer(mcfg)
    return sorted(set(tokenizer.added_tokens_decoder) | set(tokenizer.all_special_ids))


def main(args: argparse.Namespace) -> int:
    try:
        goodput = parse_goodput(args.goodput) if args.goodput else None
        check_counts(vars(args))        # before connecting: a bad count is the user's, not the server's
        check_trace(vars(args))         # (and so is a bad trace option, or a trace with nothing to replay)
        addr, model, vocab_size, context, tokenizer = target(args)
        reserved = reserved_ids(vocab_size, tokenizer) if args.dataset.startswith("mooncake:") else ()
        requests = build_dataset(args, vocab_size, reserved)
    except grpc.aio.AioRpcError as e:
        print(f"bench serve: GetModelInfo on {args.addr} failed: {e.code().name} {e.details()}", file=sys.stderr)
        return 1
    except httpx.HTTPError as e:
        print(f"bench serve: GET {args.base_url}/models failed: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:
        print(f"bench serve: {e}", file=sys.stderr)
        return 2
    if context and longest_context(requests) > context:
        print(f"bench serve: warning: some requests need up to {longest_context(requests)} tokens, beyond "
              f"the model's {context}; the server rejects them", file=sys.stderr)
    rate = (f"trace arrivals x{args.time_scale} over {requests[-1].arrival_s:.1f} s"
            if requests[0].arrival_s is not None else
            f"request rate {args.request_rate} req/s, burstiness {args.burstiness}")
    print(f"model {model} ({args.backend}): {len(requests)} requests of dataset {args.dataset}, "
          f"{rate}, max concurrency {args.max_concurrency}")
    try:
        result = asyncio.run(
            run_benchmark(addr, requests, args.request_rate, args.burstiness, args.max_concurrency,
                          args.seed, goodput, progress=not args.disable_tqdm, backend=args.backend, model=model,
                          tokenizer=tokenizer))
    except ValueError as e:
        print(f"bench serve: {e}", file=sys.stderr)
        return 2
    result.update(model=model, backend=args.backend, dataset=args.dataset, num_prompts=len(requests))
    if args.dataset.startswith("mooncake:"):
        result["trace"] = {k: getattr(args, k) for k in ("block_size", "token_scale", "output_scale", "time_scale",
                                                         "start", "max_requests", "conversation_sample", "seed")}
    print(format_table(result))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    from pdcluster.deploy.cli import HelpFormatter
    cli = argparse.ArgumentParser(prog="pdcluster bench serve", description=__doc__.splitlines()[0],
                                  formatter_class=HelpFormatter)
    add_arguments(cli)
    sys.exit(main(cli.parse_args()))
