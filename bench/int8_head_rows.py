"""Several rows through an int8 CPU linear on a host without VNNI or AMX: torch._int_mm, fbgemm row by row, int8_mm.

    python -m pdcluster.bench.int8_head_rows --out bench/int8-head-rows.json --plot bench/int8-head-rows.png

engine/quant/cpu_linear.py's Dyn8Linear runs 2-63 rows (the LM head's speculative verification rows, an int8
model's small batches) as int8_rows: each row of x on its own symmetric 8-bit scale, exact int32 sums, rescaled.
Where oneDNN's sums are not exact (no VNNI / AMX: AVX2 hosts such as AMD Zen 2/3) those sums ran on torch._int_mm,
a slow generic loop there. They now run on pdcluster::int8_mm (engine/quant/int8_mm_avx2.cpp, the same sums); where
that op does not build, on fbgemm's dynamic linear one row at a time (each row's batch-1 result, other rounding).

Per-call part: the embedded model's LM head shape (49152 x 576, random int8 weights), one thread; at each --rows, ms
per call of the three, alternated, median of --repeats; ratio = _int_mm's time / int8_mm's (the plot's line).

Engine part (--repeats-engine > 0): one engine as `bench scenario peers`' int4 sides build it (--quantization int4,
--cpu-compile, n-gram speculation, one thread), a random 128-token prompt then 64 greedy tokens; ms for the 64
tokens with the head's rows on _int_mm (the code before), row by row, on int8_mm (now), and with speculation off,
alternated, median of --repeats-engine.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import torch

from pdcluster.bench import outputs

HEAD = (49152, 576)


def _ms(fn, calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls * 1e3


def calls_part(rows: list[int], repeats: int, calls: int) -> list[dict]:
    from pdcluster.engine.quant.cpu_linear import Dyn8Linear, int8_rows
    from pdcluster.engine.quant.packed import quantize
    g = torch.Generator().manual_seed(0)
    lin = Dyn8Linear(quantize(torch.randn(*HEAD, generator=g) * 0.05, "int8"), None)
    from pdcluster.engine import cpu_ext
    if not cpu_ext.has("int8_mm"):
        raise SystemExit("pdcluster::int8_mm is not built on this host (it is the AVX2 library's): nothing to compare")
    sides = {"_int_mm": lambda x: torch._int_mm(x, lin.q.t()),
             "fbgemm by row": lambda x: torch.cat([lin.kernel(xf[i:i + 1]) for i in range(x.shape[0])]),
             "int8_mm": lambda x: torch.ops.pdcluster.int8_mm(x, lin.q)}
    print(f"{'rows':>5} {'_int_mm ms':>11} {'fbgemm by row ms':>17} {'int8_mm ms':>11} {'_int_mm / int8_mm':>18}")
    out = []
    for m in rows:
        xf = torch.randn(m, HEAD[1], generator=g)
        x = torch.randint(-127, 128, (m, HEAD[1]), generator=g, dtype=torch.int8)      # x's codes (int8_rows')
        for f in sides.values():
            f(x)                                                          # warm
        times = {s: [] for s in sides}
        for rep in range(repeats):
            for s, f in list(sides.items())[::1 if rep % 2 == 0 else -1]:     # who goes first alternates
                times[s].append(_ms(lambda: f(x), calls))
        a, b, c = (statistics.median(times[s]) for s in sides)
        print(f"{m:>5} {a:>11.1f} {b:>17.1f} {c:>11.1f} {a / c:>17.2f}x")
        out.append(dict(rows=m, int_mm_ms=a, by_row_ms=b, int8_mm_ms=c, ratio=a / c))
    return out


def engine_part(repeats: int) -> dict:
    from pdcluster.engine.llm_engine import LLMEngine, build_config
    from pdcluster.engine.quant import cpu_linear
    from pdcluster.engine.sampling_params import SamplingParams
    engines = {s: LLMEngine(build_config(num_threads=1, quantization="int4", cpu_compile=True, speculative=s))
               for s in ("ngram", "off")}
    for e in engines.values():
        e.warmup()
    from pdcluster.engine import cpu_ext
    has = cpu_ext.has
    # rows() and int8_rows read cpu_ext.has("int8_mm") and onednn_int8_usable(): each side sets what they see
    no_op = lambda op: op != "int8_mm" and has(op)                                 # noqa: E731
    sides = {"ngram, _int_mm rows": ("ngram", no_op, True), "ngram, fbgemm by row": ("ngram", no_op, False),
             "ngram, int8_mm rows": ("ngram", has, False), "spec off": ("off", has, False)}
    real = cpu_linear.onednn_int8_usable
    rng = random.Random(0)
    times = {s: [] for s in sides}
    try:
        for rep in range(repeats):
            ids = [rng.randrange(1000, 40000) for _ in range(128)]
            for s, (mode, has_op, usable) in list(sides.items())[::1 if rep % 2 == 0 else -1]:
                eng = engines[mode]
                cpu_ext.has = has_op
                cpu_linear.onednn_int8_usable = (lambda: True) if usable else real
                eng.add_request(list(ids), SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
                eng.step()                                                # the prompt
                t = time.perf_counter()
                while eng.has_work():
                    eng.step()
                times[s].append((time.perf_counter() - t) * 1e3)
    finally:
        cpu_linear.onednn_int8_usable, cpu_ext.has = real, has
    med = {s: statistics.median(v) for s, v in times.items()}
    print(f"engine, 64 greedy tokens after a 128-token prompt, median of {repeats}:")
    for s, v in med.items():
        print(f"  {s:22} {v:8.1f} ms  ({v / 64:.1f} ms a token)")
    now = med["ngram, int8_mm rows"]
    ratio = {"_int_mm": med["ngram, _int_mm rows"] / now, "by row": med["ngram, fbgemm by row"] / now,
             "spec off": med["spec off"] / now}                    # each side's time / int8_mm rows
    print("  time / int8_mm rows': " + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items()))
    return dict(runs=times, median=med, ratio=ratio)


def plot(result: dict, path: str) -> None:
    from pdcluster.bench.plots import ratio_figure
    ratio_figure(result["calls"], "_int_mm time / int8_mm's", f"LM head {HEAD[0]} x {HEAD[1]} int8, 1 thread",
                 result.get("engine"), "engine, 64 tokens: each / int8_mm rows", path)


def main(argv=None) -> int:
    from pdcluster.deploy.cli import HelpFormatter
    from pdcluster.bench.outputs import Listed
    ap = argparse.ArgumentParser(prog="python -m pdcluster.bench.int8_head_rows", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=Listed([1, 2, 5, 8, 16]), help="rows of x per call")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each path per row count, alternated")
    ap.add_argument("--calls", type=int, default=3, help="calls per timed run")
    ap.add_argument("--repeats-engine", type=int, default=3, help="engine generations per side (0: skip)")
    outputs.add_args(ap, plot_help="PNG: the per-call ratio against rows, and the engine's ratios")
    a = ap.parse_args(argv)
    if outputs.replotted(a, plot, "int8-head-rows.png"):
        return 0
    torch.set_num_threads(1)
    result = dict(calls=calls_part(a.rows, a.repeats, a.calls))
    if a.repeats_engine > 0:
        result["engine"] = engine_part(a.repeats_engine)
    outputs.save(a, result, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
