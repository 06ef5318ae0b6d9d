"""What the OpenAI HTTP API costs over gRPC on one running `pdcluster serve`: the same seeded workload
through both front doors, alternating gRPC, HTTP, gRPC, HTTP ... (--rounds), one client.

    .venv/bin/pdcluster serve --http-port 8000 &
    .venv/bin/python -m pdcluster.bench.api_overhead --addr 127.0.0.1:50051 --base-url http://127.0.0.1:8000/v1

Prints each run's p50 TTFT / p50 TPOT / throughput, then the HTTP - gRPC difference of the medians
over every round's requests (after one unmeasured warm-up run per API). The issue's bound: at most
5 ms on p50 TTFT at concurrency 1.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics

from pdcluster.bench.datasets import build_dataset
from pdcluster.bench.openai_client import model_of
from pdcluster.bench.serve import get_model_info, run_benchmark


async def compare(a: argparse.Namespace) -> None:
    info = await get_model_info(a.addr)
    model, _ = await model_of(a.base_url)
    reqs = build_dataset(argparse.Namespace(dataset="random", num_prompts=a.num_prompts, input_len=a.input_len,
                                            output_len=a.output_len, range_ratio=0.0, seed=a.seed,
                                            ignore_eos=True), info.vocab_size)
    runs = {"grpc": [], "openai": []}
    for backend in ("grpc", "openai"):     # warm-up (not counted): caches, connections, the kernels
        await run_benchmark(a.addr if backend == "grpc" else a.base_url, reqs[:4], float("inf"), 1.0, 1, a.seed,
                            None, progress=False, backend=backend, model=model)
    for r in range(a.rounds):
        for backend in ("grpc", "openai"):
            res = await run_benchmark(a.addr if backend == "grpc" else a.base_url, reqs, float("inf"), 1.0,
                                      a.max_concurrency, a.seed, None, progress=False, backend=backend, model=model)
            runs[backend].append(res)
            print(f"round {r + 1} {backend:6}  p50 TTFT {res['median_ttft_ms']:7.1f} ms  p50 TPOT "
                  f"{res['median_tpot_ms']:6.1f} ms  {res['output_throughput']:6.1f} tok/s  failed {res['failed']}")
    med = {b: (statistics.median(t for x in rs for t in x["ttfts"]), statistics.median(t for x in rs for t in x["tpots"]))
           for b, rs in runs.items()}
    print(f"p50 over every round's requests: gRPC TTFT {med['grpc'][0]:.1f} ms, HTTP TTFT {med['openai'][0]:.1f} ms: "
          f"HTTP - gRPC = {med['openai'][0] - med['grpc'][0]:+.1f} ms TTFT, "
          f"{med['openai'][1] - med['grpc'][1]:+.1f} ms TPOT")


def main() -> None:
    from pdcluster.deploy.cli import HelpFormatter
    p = argparse.ArgumentParser(prog="python -m pdcluster.bench.api_overhead", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--addr", default="127.0.0.1:50051", help="the router's gRPC address")
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the same router's OpenAI base URL")
    p.add_argument("--rounds", type=int, default=4, help="gRPC, HTTP pairs")
    p.add_argument("--num-prompts", type=int, default=16, help="requests per run")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (random ids)")
    p.add_argument("--output-len", type=int, default=16, help="output tokens (EOS ignored)")
    p.add_argument("--max-concurrency", type=int, default=1, help="requests in flight")
    p.add_argument("--seed", type=int, default=0, help="dataset seed")
    asyncio.run(compare(p.parse_args()))


if __name__ == "__main__":
    main()
