"""Prefill rows of packed int4 CPU linears: pdcluster::q4x8_mm against dequantize + MKL's float32 GEMM, one thread.

The op rounds x to int8 per 32 (llama.cpp's Q8_1); the dense path dequantizes the weight to a transient float32
copy on every call and runs MKL with x unrounded.

    python -m pdcluster.bench.int4_prefill --out bench/int4-prefill.json --plot bench/int4-prefill.png

engine/quant/q4x8.py's Q4x8Linear takes the op below dense_min_rows() and the dequantize + MKL path from there:
DENSE_MIN_ROWS (64) with the AVX-512 library, never with the AVX2 one. This measures that choice on this host.

Linears part: the embedded GGUF's 120 fused layer linears as Q4x8Linear (as an int4 engine holds them); at each
--rows, ms per pass through the op, through Q4x8Linear.dense (dequantize + F.linear, what the engine runs past
the threshold) and through F.linear on weights dequantized beforehand (MKL alone: the floor of the dense path),
alternated, median of --repeats; ratio = dense's time / the op's.

Engine part (--repeats-engine > 0): one int4 engine on the embedded model (the file's Q4_1 blocks packed),
speculation off; cold prompts of each --lengths, every linear's threshold set in turn to DENSE_MIN_ROWS and to
None (the op at every row count), alternated; median ms per prompt, ratio = DENSE_MIN_ROWS's / the op's.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from pdcluster.bench import outputs


def _layer_linears(eng) -> list:
    from pdcluster.engine.quant.q4x8 import Q4x8Linear
    lins = [getattr(lin, "inner", lin) for L in eng.model.layers for lin in (L.qkv, L.o, L.gate_up, L.down)]
    return [lin for lin in lins if isinstance(lin, Q4x8Linear)]


def int4_engine():
    from pdcluster.engine.llm_engine import LLMEngine, build_config
    eng = LLMEngine(build_config(num_threads=1, speculative="off", quantization=None))
    eng.warmup()
    return eng


def linears_part(lins: list, rows: list[int], repeats: int) -> list[dict]:
    import torch.nn.functional as F
    floats = [lin.dequantize() for lin in lins]
    print(f"{'rows':>5} {'op ms':>9} {'dense ms':>9} {'MKL alone ms':>13} {'dense / op':>11} {'MKL / op':>9}")
    g = torch.Generator().manual_seed(0)
    out = []
    for m in rows:
        xs = {k: torch.randn(m, k, generator=g) for k in {lin.K for lin in lins}}
        sides = {"op": lambda i, x: lins[i].kernel(x), "dense": lambda i, x: lins[i].dense(x),
                 "mkl": lambda i, x: F.linear(x, floats[i])}
        times = {s: [] for s in sides}
        for rep in range(repeats):
            for s, op in list(sides.items())[::1 if rep % 2 == 0 else -1]:         # who goes first alternates
                t = time.perf_counter()
                for i, lin in enumerate(lins):
                    op(i, xs[lin.K])
                times[s].append((time.perf_counter() - t) * 1e3)
        med = {s: statistics.median(v) for s, v in times.items()}
        row = dict(rows=m, op_ms=med["op"], dense_ms=med["dense"], mkl_ms=med["mkl"],
                   ratio=med["dense"] / med["op"], mkl_ratio=med["mkl"] / med["op"])
        print(f"{m:>5} {med['op']:9.2f} {med['dense']:9.2f} {med['mkl']:13.2f} {row['ratio']:10.2f}x "
              f"{row['mkl_ratio']:8.2f}x")
        out.append(row)
    return out


def engine_part(eng, lins: list, lengths: list[int], repeats: int) -> dict:
    from pdcluster.bench.prefill_chunks import cold_prompts_by_side
    from pdcluster.engine.quant.cpu_linear import DENSE_MIN_ROWS
    sides = {f"dense from {DENSE_MIN_ROWS}": DENSE_MIN_ROWS, "op at every row count": None}
    return cold_prompts_by_side(eng, lins, "dense_from", sides, lengths, repeats, "engine, int4, cold prompts")


def plot(result: dict, path: str) -> None:
    """dense / op per pass against the rows, and the engine's ratios per prompt length."""
    from pdcluster.bench.plots import ratio_figure
    ratio_figure(result["linears"], "dequantize + MKL time / op time",
                 "SmolLM2-135M int4 (Q4_1): 30 layers' linears (1 thread)", result.get("engine"),
                 "engine, cold N-token prompts: dense / op", path)


def main(argv=None) -> int:
    from pdcluster.deploy.cli import HelpFormatter
    from pdcluster.bench.outputs import Listed
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=Listed([16, 64, 128, 256, 512, 1024, 2048]),
                    help="rows per linear call")
    ap.add_argument("--repeats", type=int, default=3, help="linears part: passes per side, alternated")
    ap.add_argument("--lengths", type=int, nargs="+", default=Listed([128, 408, 1024, 2040]),
                    help="engine part: prompt tokens")
    ap.add_argument("--repeats-engine", type=int, default=3, help="engine part: prompts per side and length (0: skip)")
    outputs.add_args(ap)
    a = ap.parse_args(argv)
    if outputs.replotted(a, plot, "bench/int4-prefill.png"):
        return 0
    torch.set_num_threads(1)
    from pdcluster.engine.quant import q4x8
    eng = int4_engine()
    lins = _layer_linears(eng)
    if not (q4x8.available() and lins):
        print("pdcluster::q4x8_mm is not built here, or the engine holds no Q4x8Linear: nothing to compare")
        return 1
    result = dict(threads=1, dense_min_rows=q4x8.dense_min_rows(), linears=linears_part(lins, a.rows, a.repeats))
    result["engine"] = engine_part(eng, lins, a.lengths, a.repeats_engine) if a.repeats_engine else None
    outputs.save(a, result, plot, draw=bool(result["linears"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
