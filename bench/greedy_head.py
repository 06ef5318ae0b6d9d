"""A greedy row's token from the LM head on CPU: pdcluster::greedy_head (kernels/greedy_head.cpp, an int8 screen and
float32 scores of the few rows it keeps) against the full float32 head it replaces (F.linear, then argmax), in the
same process, alternated.

    python -m pdcluster.bench.greedy_head --rows 1 2 4 8 16

Per call: the embedded model's head (SmolLM2-135M: the tied 49,152 x 576 embedding, float32) on real hidden rows,
those the engine sampled from while greedy-decoding a few prompts. Prints microseconds per call (best of --repeats
runs of --calls calls), their ratio (> 1: the screen is faster), how many rows' tokens agree and how many head rows
the screen scored in float32 (mean per hidden row).

The engine part (--repeats-engine > 0): two float32 LLMEngines, 1 thread, speculative decoding off, one with the
screen and one without (EngineConfig.greedy_head), repeats alternating: a cold --prompt-len-token prompt, a hit (its
first prompt_len - tail_len tokens cached) and --decode-tokens greedy tokens after a hit (ms per decode step).

    python -m pdcluster.bench.greedy_head --out bench/greedy-head.json --plot bench/greedy-head.png
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from pdcluster.bench import outputs
from pdcluster.bench.cpu_attention import _best

PROMPTS = ("The capital of France is", "def quicksort(xs):", "Once upon a time, in a small village,",
           "List three uses of copper.", "1, 1, 2, 3, 5, 8,")


def engine(screen: bool, **options):
    """A float32 engine on one thread, speculation off; options: other EngineConfig fields (weight_codes)."""
    from pdcluster.engine.llm_engine import LLMEngine, build_config
    eng = LLMEngine(dataclasses.replace(build_config(num_threads=1, speculative="off"), greedy_head=screen, **options))
    eng.warmup()
    return eng


def run(eng, ids: list[int], n: int = 1) -> float:
    from pdcluster.engine.sampling_params import SamplingParams
    t = time.perf_counter()
    eng.add_request(ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    while eng.has_work():
        eng.step()
    return (time.perf_counter() - t) * 1e3


def hidden_rows(eng, tokens: int) -> torch.Tensor:
    """The final-norm rows the engine's sampler saw while greedy-decoding PROMPTS (the screen off: all reach
    logits())."""
    rows, orig = [], eng.model.logits
    eng.model.logits = lambda h: (rows.append(h.clone()), orig(h))[1]
    try:
        for p in PROMPTS:
            run(eng, eng.tokenizer.encode(p), tokens)
    finally:
        eng.model.logits = orig
    return torch.cat(rows)


def calls_part(eng, screen, rows: list[int], calls: int, repeats: int, tokens: int) -> list[dict]:
    from pdcluster.kernels.greedy_head import candidates_ref
    h_all = hidden_rows(eng, tokens)
    print(f"head {tuple(screen.w.shape)} float32, {h_all.shape[0]} hidden rows from {len(PROMPTS)} prompts, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"{'rows':>5} {'full us':>10} {'screen us':>10} {'ratio':>7} {'agree':>7} {'scored/row':>11}")
    out = []
    for n in rows:
        h = h_all[:n].contiguous()
        full = lambda: F.linear(h, screen.w).max(-1).indices                                # noqa: E731
        op = lambda: screen.tokens(h)                                                     # noqa: E731
        agree = int((full() == op()).sum())
        t_full, t_op = [], []
        for _ in range(repeats):
            t_full.append(_best(full, calls, 1))
            t_op.append(_best(op, calls, 1))
        f, o = min(t_full), min(t_op)
        kept = float(candidates_ref(h_all, screen.q, screen.scale, screen.slack).sum(1).double().mean())
        print(f"{n:>5} {f:>10.1f} {o:>10.1f} {f / o:>6.2f}x {agree:>3}/{n:<3} {kept:>11.1f}")
        out.append(dict(rows=n, full_us=f, screen_us=o, ratio=f / o, agree=agree, scored_per_row=kept))
    return out


def engine_timings(eng, prefix: list[int], fresh, prompt_len: int, tail_len: int, decode_tokens: int) -> dict:
    """One repeat on eng (prefix cached): ms of a cold prompt_len-token prompt, of a prefix hit (tail_len
    computed), and per decode step over decode_tokens greedy tokens after a hit."""
    cold = run(eng, fresh(prompt_len))
    hit = run(eng, prefix + fresh(tail_len))
    decode = (run(eng, prefix + fresh(tail_len), decode_tokens + 1) - hit) / decode_tokens
    return dict(cold_ms=cold, hit_ms=hit, decode_step_ms=decode)


def engine_part(engines: dict, prompt_len: int, tail_len: int, decode_tokens: int, repeats: int) -> dict:
    """Median ms of a cold prompt, a prefix hit and a decode step, each engine in turn; ratio: the first engine's
    time over the second's."""
    rng = random.Random(0)
    fresh = lambda n: [rng.randrange(1000, 40000) for _ in range(n)]                   # noqa: E731
    prefix = fresh(prompt_len - tail_len)
    for eng in engines.values():
        run(eng, prefix + fresh(tail_len))                              # caches the prefix
    keys = ("cold_ms", "hit_ms", "decode_step_ms")
    times = {s: {k: [] for k in keys} for s in engines}
    for _ in range(repeats):
        for side, eng in engines.items():
            for k, v in engine_timings(eng, prefix, fresh, prompt_len, tail_len, decode_tokens).items():
                times[side][k].append(v)
    med = {s: {k: statistics.median(v) for k, v in t.items()} for s, t in times.items()}
    base, cand = list(engines)
    ratio = {k: med[base][k] / med[cand][k] for k in keys}
    print(f"engine, {prompt_len}-token prompts (hit: {tail_len} computed), {decode_tokens} decode steps after a hit, "
          f"median of {repeats}:")
    for side in engines:
        print(f"{side:10} cold {med[side]['cold_ms']:8.1f} ms  hit {med[side]['hit_ms']:7.1f} ms  "
              f"decode step {med[side]['decode_step_ms']:6.1f} ms")
    print(f"ratio      cold {ratio['cold_ms']:7.3f}x     hit {ratio['hit_ms']:6.3f}x     "
          f"decode step {ratio['decode_step_ms']:5.3f}x  ({base} / {cand})")
    return dict(runs=times, median=med, ratio=ratio)


def plot(result: dict, path: str) -> None:
    """full / screen per call against the rows, and the engine's three ratios."""
    from pdcluster.bench.plots import ratio_figure
    ratio_figure(result["calls"], "full head time / screen time",
                 "greedy token from the LM head (SmolLM2-135M, float32, 1 thread)", result.get("engine"),
                 "engine: full head / screen", path, xlabel="greedy rows in the call")


def main(argv=None) -> int:
    from pdcluster.deploy.cli import HelpFormatter
    from pdcluster.bench.outputs import Listed
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=Listed([1, 2, 4, 8, 16]), help="hidden rows per call")
    ap.add_argument("--calls", type=int, default=20, help="calls per timed run")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per side (best taken)")
    ap.add_argument("--tokens", type=int, default=24, help="greedy tokens per prompt for the hidden rows")
    ap.add_argument("--repeats-engine", type=int, default=8, help="engine part: repeats, sides alternating (0: skip)")
    ap.add_argument("--prompt-len", type=int, default=408, help="engine part: prompt tokens")
    ap.add_argument("--tail-len", type=int, default=24, help="engine part: tokens computed after a cached prefix")
    ap.add_argument("--decode-tokens", type=int, default=32, help="engine part: decode steps timed after a hit")
    outputs.add_args(ap)
    a = ap.parse_args(argv)
    if outputs.replotted(a, plot, "bench/greedy-head.png"):
        return 0
    torch.set_num_threads(1)
    engines = {"full head": engine(False), "screen": engine(True)}
    screen = engines["screen"].model.greedy
    if screen is None:
        print("no greedy screen here: pdcluster's CPU ops are not built (engine/cpu_ext.py) or the head is not "
              "float32 on CPU", file=sys.stderr)
        return 1
    result = dict(threads=1, calls=calls_part(engines["full head"], screen, a.rows, a.calls, a.repeats, a.tokens))
    result["engine"] = (engine_part(engines, a.prompt_len, a.tail_len, a.decode_tokens, a.repeats_engine)
                        if a.repeats_engine else None)
    outputs.save(a, result, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
