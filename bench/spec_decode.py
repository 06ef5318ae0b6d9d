"""Speculative decoding on vs off, side by side in one run, on the real model (offline engine).

    python -m pdcluster.bench.spec_decode [--copy-prompts 6] [--random-prompts 16] [--repeats 2]
                                          [--out bench/spec-decode.json] [--plot bench/spec-decode.png]

Two workloads, each run with n-gram speculation (engine/spec/) on and off on the same engine
(the scheduler's SpecDecoder swapped in and out; same weights, same KV pool), interleaved
(on, off, on, off, ...) so machine drift hits both alike; the median of --repeats is reported:
  copy     bench/datasets.py's "copy" prompts (a passage, asked back verbatim), greedy, one
           request at a time (concurrency 1): target TPOT >= 1.8x lower with speculation
  random   random-token prompts (--input-len), --output-len tokens with EOS ignored, greedy,
           --concurrency requests in flight: target throughput / TPOT at most 5% worse
Requests are kept --concurrency in flight (a new one starts when one ends), as `bench serve
--max-concurrency` does, and timed per engine step: TTFT = first token, TPOT = (last token - first
token) / (tokens - 1) per request, averaged; throughput = output tokens / wall time. A step that
yields several tokens (accepted drafts) stamps them all with its end time. Also reported: the
acceptance rate (accepted / proposed draft tokens), mean tokens per verification, and whether the
greedy outputs of both modes are token for token the same.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class RunResult:
    tpot_ms: float                  # mean over requests
    ttft_ms: float
    throughput: float               # output tokens / s (wall)
    outputs: list[list[int]] = field(default_factory=list)
    proposed: int = 0
    accepted: int = 0
    verifications: int = 0


def run(engine, prompts: list[list[int]], params, concurrency: int) -> RunResult:
    """Drive `engine` with `concurrency` requests in flight until every prompt is done."""
    spec = engine.scheduler.spec
    s0 = (spec.stats.proposed, spec.stats.accepted, spec.stats.steps) if spec else (0, 0, 0)
    pending = list(enumerate(prompts))
    live: dict[str, tuple[int, float]] = {}         # request id -> (prompt index, start time)
    first: dict[int, float] = {}                     # prompt index -> first token's time after its start
    starts: dict[int, float] = {}
    last: dict[int, float] = {}
    outs: dict[int, list[int]] = {}
    t0 = time.perf_counter()
    while pending or live:
        while pending and len(live) < concurrency:
            i, p = pending.pop(0)
            r = engine.add_request(p, params, detokenize=False)
            live[r.request_id] = (i, time.perf_counter())
            starts[i] = live[r.request_id][1]
        for o in engine.step():
            now = time.perf_counter()
            i, start = live[o.request.request_id]
            first.setdefault(i, now - start)
            last[i] = now
            outs.setdefault(i, []).extend(o.new_token_ids)
            if o.finished:
                del live[o.request.request_id]
    wall = time.perf_counter() - t0
    tpots, ttfts = [], []
    for i, ttft in first.items():
        n = len(outs[i])
        ttfts.append(ttft * 1e3)
        if n > 1:
            tpots.append((last[i] - (starts[i] + ttft)) / (n - 1) * 1e3)
    s1 = (spec.stats.proposed, spec.stats.accepted, spec.stats.steps) if spec else (0, 0, 0)
    return RunResult(statistics.mean(tpots), statistics.mean(ttfts), sum(map(len, outs.values())) / wall,
                     [outs[i] for i in range(len(prompts))], *(b - a for a, b in zip(s0, s1)))


def plot(rows: dict, path: str) -> None:
    import numpy as np
    from matplotlib.figure import Figure
    fig = Figure(figsize=(11, 4), layout="constrained")
    axes = fig.subplots(1, 3)
    names = list(rows)
    x = np.arange(len(names))
    for ax, key, title, unit in ((axes[0], "tpot_ms", "TPOT (lower is better)", "ms"),
                                 (axes[1], "throughput", "Output throughput", "tok/s"),
                                 (axes[2], "ttft_ms", "TTFT", "ms")):
        ax.bar(x - 0.2, [rows[n]["on"][key] for n in names], 0.4, label="ngram")
        ax.bar(x + 0.2, [rows[n]["off"][key] for n in names], 0.4, label="off")
        ax.set(title=title, ylabel=unit, xticks=x, xticklabels=names)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    from pdcluster.deploy.cli import HelpFormatter
    from pdcluster.bench.outputs import Listed
    ap = argparse.ArgumentParser(prog="python -m pdcluster.bench.spec_decode", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder or .gguf (default: embedded SmolLM2-135M)")
    ap.add_argument("--quantization", default="none", help="the engine's weight quantization")
    ap.add_argument("--spec-k", type=int, default=None, help="spec_ngram_k (default: EngineConfig's)")
    ap.add_argument("--spec-max-step-tokens", type=int, default=None,
                    help="spec_max_step_tokens: drafts only while a step has fewer rows (default: EngineConfig's)")
    ap.add_argument("--copy-prompts", type=int, default=6, help="copy-set prompts (concurrency 1)")
    ap.add_argument("--copy-output-len", type=int, default=128, help="copy-set max_tokens (EOS ends them)")
    ap.add_argument("--random-prompts", type=int, default=16, help="random-token prompts")
    ap.add_argument("--input-len", type=int, default=128, help="random prompts' tokens")
    ap.add_argument("--output-len", type=int, default=64, help="random prompts' output tokens (EOS ignored)")
    ap.add_argument("--concurrency", type=int, default=16, help="random-set requests in flight")
    ap.add_argument("--workloads", nargs="+", choices=("copy", "random"), default=Listed(["copy", "random"]),
                    help="which workloads to run")
    ap.add_argument("--repeats", type=int, default=2, help="on/off pairs per workload (median reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--cpu-compile", action="store_true",
                    help="decode and verify steps through the compiled layer (engine/cpu_compile.py)")
    ap.add_argument("--cpu-int8-rows", type=int, default=0,
                    help="int4 steps of >= this many rows on the linears' int8 copies (0 = off)")
    ap.add_argument("--out", default=None, help="write the results as JSON")
    ap.add_argument("--plot", default=None, help="write a PNG of the comparison")
    a = ap.parse_args(argv)

    import torch
    from tqdm import tqdm

    from pdcluster.bench.datasets import build_dataset
    from pdcluster.engine import LLM, SamplingParams
    if a.threads:
        torch.set_num_threads(a.threads)
    kw = {} if a.spec_k is None else {"spec_ngram_k": a.spec_k}
    if a.spec_max_step_tokens is not None:
        kw["spec_max_step_tokens"] = a.spec_max_step_tokens
    llm = LLM(a.model, quantization=a.quantization, speculative="ngram", kv_cache_memory=256 * 2**20,
              max_num_seqs=max(a.concurrency, 1), cpu_compile=a.cpu_compile, cpu_int8_rows=a.cpu_int8_rows, **kw)
    eng, tok = llm.engine, llm.tokenizer
    spec = eng.scheduler.spec
    copy = [tok.encode(r.prompt_text, add_special_tokens=False)
            for r in build_dataset({"dataset": "copy", "num_prompts": a.copy_prompts, "seed": 0}, 0)]
    rnd = [r.prompt_ids for r in build_dataset({"dataset": "random", "num_prompts": a.random_prompts,
                                                "input_len": a.input_len, "seed": 0}, eng.cfg.model.vocab_size)]
    workloads = {
        "copy c=1": (copy, SamplingParams(max_tokens=a.copy_output_len, temperature=0), 1),
        f"random c={a.concurrency}": (rnd, SamplingParams(max_tokens=a.output_len, temperature=0, ignore_eos=True),
                                      a.concurrency),
    }
    workloads = {n: w for n, w in workloads.items() if n.split()[0] in a.workloads}
    eng.warmup()
    raw = {name: {"on": [], "off": []} for name in workloads}
    bar = tqdm(total=len(workloads) * a.repeats * 2, desc="spec on/off", unit="run")
    for rep in range(a.repeats):
        for name, (prompts, params, conc) in workloads.items():
            for mode in ("on", "off") if rep % 2 == 0 else ("off", "on"):
                eng.scheduler.spec = spec if mode == "on" else None
                eng.kv.pool.reset_prefix_cache()         # no run reuses another's prompt KV
                raw[name][mode].append(run(eng, prompts, params, conc))
                bar.update(1)
    bar.close()
    eng.scheduler.spec = spec

    rows = {}
    print(f"\nmodel {eng.cfg.model.name}, quantization {a.quantization}, torch threads {torch.get_num_threads()}, "
          f"spec_ngram_k {eng.cfg.spec_ngram_k}, median of {a.repeats}")
    print(f"{'workload':<14} {'mode':<6} {'TPOT ms':>8} {'TTFT ms':>8} {'tok/s':>8} {'accept':>7} {'tok/verif':>9}")
    for name, modes in raw.items():
        rows[name] = {}
        for mode, rs in modes.items():
            med = {k: statistics.median(getattr(r, k) for r in rs) for k in ("tpot_ms", "ttft_ms", "throughput")}
            prop, acc, ver = (sum(getattr(r, k) for r in rs) for k in ("proposed", "accepted", "verifications"))
            med.update(acceptance=acc / prop if prop else 0.0, tokens_per_verification=(acc + ver) / ver if ver else 0.0,
                       runs=[vars(r) | {"outputs": None} for r in rs])
            rows[name][mode] = med
            print(f"{name:<14} {mode:<6} {med['tpot_ms']:>8.1f} {med['ttft_ms']:>8.1f} {med['throughput']:>8.1f} "
                  f"{med['acceptance']:>7.2f} {med['tokens_per_verification']:>9.2f}")
        on, off = rows[name]["on"], rows[name]["off"]
        same = all(x.outputs == y.outputs for x, y in zip(modes["on"], modes["off"]))
        rows[name]["tpot_off_over_on"] = off["tpot_ms"] / on["tpot_ms"]
        rows[name]["throughput_on_over_off"] = on["throughput"] / off["throughput"]
        rows[name]["same_outputs"] = same
        print(f"{name:<14} TPOT off/on {rows[name]['tpot_off_over_on']:.2f}x, throughput on/off "
              f"{rows[name]['throughput_on_over_off']:.2f}x, greedy outputs on == off: {same}")
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump(dict(args=vars(a), rows=rows), f, indent=1)
    if a.plot:
        plot({n: r for n, r in rows.items()}, a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
