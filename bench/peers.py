"""`pdcluster bench scenario peers --peer NAME=URL ...`: pdcluster against the servers users would
run instead, through one client, on one workload.

Every server is driven by bench serve's OpenAI backend (bench/openai_client.py: /v1/completions,
token-id prompts, streamed, greedy, EOS ignored), so pdcluster is measured through its own HTTP API
exactly like a peer. pdcluster's sides are clusters this command starts (one at a time, each alone:
a peer given by URL must be started beforehand and stays idle meanwhile); peers are any
OpenAI-compatible servers of the same model (llama.cpp's llama-server on the same GGUF:
`python -m pdcluster.bench.llama_server`; vLLM: ../PEERS.md).

Rounds alternate the servers (pdcluster sides, then each peer, per round), and at each server the
concurrencies run in order, each after a warm-up. The table gives each (server, concurrency) and the
ratios of each pdcluster side to each peer: output throughput (higher is better) and TPOT (lower).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass, replace

from pdcluster.bench.scenario import cluster, emit
from pdcluster.bench.scenario_report import _jsonable, merge_results
from pdcluster.deploy.config import ClusterConfig

# The workload of ../PEERS.md and issue 18: 16 prompts of 128 random tokens, 64 output tokens.
WORKLOAD = {"dataset": "random", "num_prompts": 16, "input_len": 128, "output_len": 64, "ignore_eos": True}
CONCURRENCY = (1, 4, 16)
METRICS = ("output_throughput", "mean_ttft_ms", "mean_tpot_ms", "median_tpot_ms")

# pdcluster's sides: the default disaggregated cluster (1 prefill + 1 decode worker, a core each),
# and one worker that prefills and decodes on both cores; each at the defaults (float32 weights) and
# as the fast CPU setup: the GGUF's own 4-bit blocks kept packed (--quantization int4: the same
# weights llama.cpp computes on) and decode steps through the compiled layer (--cpu-compile; its
# first start per thread count compiles for ~20-60 s, before the measured runs).
_SINGLE = dict(pools__prefill__initial_replicas=0, pools__decode__initial_replicas=1,
               router__remote_prefill=False, engine__threads_per_worker=2)
_FAST = dict(engine__quantization="int4", engine__cpu_compile=True)
# the design card's split on one CPU host: a compute-tuned prefill pool (dequantized weights in
# bfloat16: oneDNN's AMX / AVX-512 bf16 GEMMs, ~4x float32's at a 128-token prompt) beside the
# bandwidth-tuned decode pool above (packed int4 + the compiled layer, float32 KV; the KV codec casts
# the prefill pool's bfloat16 blocks as they land)
_SPLIT = dict(pools__prefill__quantization="none", pools__prefill__dtype="bfloat16", pools__prefill__cpu_compile=False)
# and with the decode pool's wide steps (batches of >= 12 rows, prompt tails, prefill chunks) on an int8 copy
# of its int4 linears (engine/quant/int8_rows.py; 12 rows: the measured break-even against q4x8 with rows
# interleaved, bench/RESULTS.md "The int8 copy's threshold after q4x8's new layout"; 10 before it)
_I8 = dict(pools__decode__cpu_int8_rows=12)
# the split where bfloat16 is not native (AVX2 hosts: no amx_bf16 / avx512_bf16), as deploy/pools-cpu.yaml says to
# set it there: a float32 prefill pool (weights dequantized once at load, MKL's GEMMs) beside the int4 decode pool
_SPLIT_F32 = dict(_SPLIT, pools__prefill__dtype="float32")
SIDES: dict[str, ClusterConfig] = {
    "disagg": cluster(),
    "single": cluster(**_SINGLE),
    "disagg-int4": cluster(**_FAST),
    "single-int4": cluster(**_SINGLE, **_FAST),
    "disagg-split": cluster(**_FAST, **_SPLIT),
    "disagg-split-i8": cluster(**_FAST, **_SPLIT, **_I8),
    "disagg-split-f32": cluster(**_FAST, **_SPLIT_F32),
    "single-int4-i8": cluster(**_SINGLE, **_FAST, **_I8),
}
SIDE_LABELS = {"disagg": "pdcluster 1P+1D", "single": "pdcluster 1 worker",
               "disagg-int4": "pdcluster 1P+1D int4 compiled", "single-int4": "pdcluster 1 worker int4 compiled",
               "disagg-split": "pdcluster 1P bf16 + 1D int4 compiled",
               "disagg-split-i8": "pdcluster 1P bf16 + 1D int4 compiled, int8 copy >= 12 rows",
               "disagg-split-f32": "pdcluster 1P f32 + 1D int4 compiled",
               "single-int4-i8": "pdcluster 1 worker int4 compiled, int8 copy >= 12 rows"}


@dataclass(frozen=True)
class Peer:
    name: str
    base_url: str           # ".../v1"


def parse_peer(text: str) -> Peer:
    """NAME=URL or URL (named by its host:port); the URL is the server's OpenAI base (…/v1)."""
    name, sep, url = text.partition("=")
    if not sep:
        name, url = "", text
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--peer {text!r}: expected NAME=http://HOST:PORT/v1")
    if not url.endswith("/v1"):
        url += "/v1"
    return Peer(name or url.split("//", 1)[1].removesuffix("/v1"), url)


async def _measure(base_url: str, model: str, requests: dict[int, list], concurrency: tuple[int, ...], seed: int,
                   warmup, tokenizer) -> dict[int, dict]:
    """{concurrency: run_benchmark result} against one OpenAI-compatible server; requests[c]: the prompts
    measured at concurrency c."""
    from pdcluster.bench.serve import run_benchmark
    out = {}
    for c in concurrency:
        await run_benchmark(base_url, warmup, float("inf"), 1.0, c, seed, None, progress=False,
                            backend="openai", model=model, tokenizer=tokenizer)
        out[c] = await run_benchmark(base_url, requests[c], float("inf"), 1.0, c, seed, None, progress=False,
                                     backend="openai", model=model, tokenizer=tokenizer)
    return out


def measured_prompts(workload: dict, vocab_size: int, seed: int, rnd: int, concurrency: tuple[int, ...]) -> dict:
    """The prompts measured in round `rnd` at each concurrency: the same for every server in that round,
    and never sent before: a server's prefix cache (ours within one cluster start, llama-server's
    across its whole life) must not serve a repeat of an earlier level's or round's prompts, nor of another
    --seed's run against the same server (seeds 100,000 apart: rounds < 99, concurrency < 1,000)."""
    from pdcluster.bench.datasets import build_dataset
    return {c: build_dataset(dict(workload, seed=seed * 100_000 + 1000 * (rnd + 1) + c), vocab_size)
            for c in concurrency}


@contextlib.asynccontextmanager
async def _pdcluster(cfg: ClusterConfig):
    """A started cluster serving HTTP on a free port: its base URL."""
    from pdcluster.deploy.launch import Cluster
    from pdcluster.ports import free_port
    c = Cluster(replace(cfg, server=replace(cfg.server, port=0, metrics_port=0, http_port=free_port())))
    try:
        await c.start()
        yield f"http://127.0.0.1:{c.http.port}/v1"
    finally:
        await c.stop()


async def run_peers(sides: list[str], peers: list[Peer], concurrency: tuple[int, ...], rounds: int, seed: int,
                    workload: dict, progress: bool = True) -> dict:
    from tqdm import tqdm

    from pdcluster.bench.datasets import build_dataset
    from pdcluster.bench.openai_client import model_of
    from pdcluster.engine.loader import load_model_config
    from pdcluster.engine.tokenizer import load_tokenizer
    mcfg = load_model_config(None)
    tok = load_tokenizer(mcfg)
    warmup = build_dataset(dict(workload, seed=seed + 1, num_prompts=max(concurrency)), mcfg.vocab_size)
    servers = [SIDE_LABELS[s] for s in sides] + [p.name for p in peers]
    runs: dict[str, dict[int, list[dict]]] = {s: {c: [] for c in concurrency} for s in servers}
    models = {p.name: (await model_of(p.base_url))[0] for p in peers}   # fails early on a peer that is down
    t0 = time.perf_counter()
    with tqdm(total=rounds * len(servers), desc="servers", disable=not progress) as bar:
        for rnd in range(rounds):
            requests = measured_prompts(workload, mcfg.vocab_size, seed, rnd, concurrency)
            for s in sides:
                bar.set_postfix_str(f"{SIDE_LABELS[s]}: starting")
                async with _pdcluster(SIDES[s]) as url:
                    bar.set_postfix_str(SIDE_LABELS[s])
                    model = (await model_of(url))[0]
                    res = await _measure(url, model, requests, concurrency, seed, warmup, tok)
                for c, r in res.items():
                    runs[SIDE_LABELS[s]][c].append(r)
                bar.update(1)
            for p in peers:
                bar.set_postfix_str(p.name)
                res = await _measure(p.base_url, models[p.name], requests, concurrency, seed, warmup, tok)
                for c, r in res.items():
                    runs[p.name][c].append(r)
                bar.update(1)
    results = {s: {c: merge_results(rs) for c, rs in by_c.items()} for s, by_c in runs.items()}
    report = dict(
        scenario=dict(name="peers", workload=workload, concurrency=list(concurrency), rounds=rounds, seed=seed,
                      sides={SIDE_LABELS[s]: dataclasses.asdict(SIDES[s]) for s in sides},
                      peers={p.name: p.base_url for p in peers}, wall_s=round(time.perf_counter() - t0, 1)),
        results={s: {str(c): {m: r.get(m) for m in METRICS} | {"completed": r["completed"], "failed": r["failed"],
                                                                   "errors": r.get("errors") or {}}
                     for c, r in by_c.items()} for s, by_c in results.items()},
        ratios=peer_ratios({s: {c: r for c, r in by_c.items()} for s, by_c in results.items()},
                           [SIDE_LABELS[s] for s in sides], [p.name for p in peers], concurrency))
    return _jsonable(report)


def peer_ratios(results: dict[str, dict[int, dict]], ours: list[str], theirs: list[str],
                concurrency: tuple[int, ...]) -> dict[str, dict[str, dict[str, float | None]]]:
    """{"ours vs theirs": {concurrency: {"output_throughput": ours/theirs, "mean_tpot_ms": ours/theirs}}}."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for a in ours:
        for b in theirs:
            out[f"{a} vs {b}"] = {
                str(c): {m: (results[a][c][m] / results[b][c][m]) if results[a][c].get(m) and results[b][c].get(m)
                         else None for m in ("output_throughput", "mean_tpot_ms")} for c in concurrency}
    return out


def format_peers(report: dict) -> str:
    sc, res = report["scenario"], report["results"]
    conc = [str(c) for c in sc["concurrency"]]
    w0 = max(len(s) for s in [*res, *report["ratios"], "ratio ours / peer"]) + 2
    head = [f"peers: {json.dumps(sc['workload'])}, greedy, streamed, one OpenAI client; {sc['rounds']} round(s)",
            "server".ljust(w0) + "conc  " + "  ".join(m.rjust(16) for m in METRICS) + "  failed"]
    rows = []
    for s, by_c in res.items():
        for c in conc:
            r = by_c[c]
            cells = [(f"{r[m]:.1f}" if r.get(m) is not None else "n/a").rjust(16) for m in METRICS]
            rows.append(s.ljust(w0) + c.rjust(4) + "  " + "  ".join(cells) + f"  {r['failed']:6d}")
    ratio_rows = ["", "ratio ours / peer".ljust(w0) + "conc  " + "output tok/s".rjust(16) + "  " + "mean TPOT".rjust(16)
                  + "   (tok/s: higher is better; TPOT: lower)"]
    for pair, by_c in report["ratios"].items():
        for c in conc:
            r = by_c[c]
            cells = [(f"{r[m]:.2f}x" if r[m] is not None else "n/a").rjust(16)
                     for m in ("output_throughput", "mean_tpot_ms")]
            ratio_rows.append(pair.ljust(w0) + c.rjust(4) + "  " + "  ".join(cells))
    failed = [f"{s} at {c}: " + ", ".join(f"{n} {code}" for code, n in sorted(by_c[c].get("errors", {}).items()))
              for s, by_c in res.items() for c in conc if by_c[c]["failed"]]
    rows += [""] + ["failed requests (the client's error codes): " + "; ".join(failed)] if failed else []
    return "\n".join(head + rows + (ratio_rows if report["ratios"] else []))


def plot_peers(report: dict, path: str) -> None:
    """Output throughput and mean TPOT per concurrency, one bar per server."""
    import numpy as np
    from matplotlib.figure import Figure
    res, conc = report["results"], [str(c) for c in report["scenario"]["concurrency"]]
    fig = Figure(figsize=(12, 5), layout="constrained")
    axes = fig.subplots(1, 2)
    x, width = np.arange(len(conc)), 0.8 / max(1, len(res))
    for ax, (m, title, unit) in zip(axes, (("output_throughput", "Output throughput", "tok/s"),
                                          ("mean_tpot_ms", "Mean TPOT", "ms"))):
        for i, (s, by_c) in enumerate(res.items()):
            ax.bar(x + (i - (len(res) - 1) / 2) * width, [by_c[c].get(m) or 0.0 for c in conc], width, label=s)
        ax.set(title=title, ylabel=unit, xlabel="concurrency", xticks=x, xticklabels=conc)
        ax.grid(alpha=0.3, axis="y")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=min(3, len(res)),
               fontsize="small")                 # below the plots: long server names never cover a bar
    fig.savefig(path, dpi=100)


def main(a: argparse.Namespace) -> int:
    import sys
    try:
        peers = [parse_peer(p) for p in a.peer or ()]
        sides = a.sides
        if not peers and not sides:
            raise ValueError("nothing to run: give --peer URL and/or --sides")
        workload = dict(WORKLOAD)
        for k in ("num_prompts", "input_len", "output_len"):
            if getattr(a, k, None) is not None:
                workload[k] = getattr(a, k)
        conc = tuple(a.concurrency)
        if not conc or min(conc) < 1:
            raise ValueError("--concurrency takes integers >= 1")
        if a.rounds < 1:
            raise ValueError(f"--rounds must be >= 1, got {a.rounds}")
    except ValueError as e:
        print(f"bench scenario peers: {e}", file=sys.stderr)
        return 2
    import httpx
    try:
        report = asyncio.run(run_peers(sides, peers, conc, a.rounds, a.seed, workload, progress=not a.disable_tqdm))
    except httpx.HTTPError as e:     # a peer down or not OpenAI-compatible (GET /v1/models)
        print(f"bench scenario peers: {type(e).__name__} from {e.request.url}: {e}", file=sys.stderr)
        return 1
    emit(report, format_peers(report), a.out, a.plot, lambda path: plot_peers(report, path))
    return 0
