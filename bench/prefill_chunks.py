"""Long prefill chunks on Q4_1 codes: pdcluster::q4f32_mm against expanding the codes to a float32 copy for MKL, on
CPU, one thread.

    python -m pdcluster.bench.prefill_chunks --out bench/prefill-chunks.json --plot bench/prefill-chunks.png

engine/llama.py's Linear runs MKL on a transient float32 copy of a packed weight from the form's MKL_MIN_ROWS rows:
768 for f32_mm's float32 blocks, 4,096 for Q4_1 codes with the AVX-512 library and 1,024 with the AVX2 one
(kernels/q4f32_mm.py mkl_min_rows). This measures that choice for codes.

Linears part: the embedded model's 120 fused layer linears as codes (as a default engine holds them); at each --rows,
ms per pass through the op and through unpack_into + F.linear (what Linear runs past the threshold), alternated,
median of --repeats; ratio = MKL's time / the op's.

Engine part (--repeats-engine > 0): one float32 engine on the embedded model, speculation off; cold prompts of each
--lengths, every Linear's threshold set in turn to f32_mm's (768: chunks of 768+ rows on MKL, as before 12-06) and
to the codes' own (the op up to 4,095 rows; 1,023 with the AVX2 library), alternated; median ms per prompt,
ratio = 768's / the codes'.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import torch

from pdcluster.bench import outputs


def linears_part(rows: list[int], repeats: int) -> list[dict]:
    import torch.nn.functional as F

    from pdcluster.bench.q4f32 import model_linears
    from pdcluster.engine import cpu_ext
    from pdcluster.engine.llama import _scratch
    from pdcluster.kernels import q4f32_mm
    if not cpu_ext.has("q4f32_mm"):
        print("pdcluster's CPU ops are not built here: no q4f32_mm", file=sys.stderr)
        return []
    _, codes = model_linears()
    print(f"{'rows':>5} {'op ms':>9} {'expand+MKL ms':>14} {'MKL / op':>9}")
    g = torch.Generator().manual_seed(0)
    out = []
    for m in rows:
        xs = {k: torch.randn(m, k, generator=g) for k in {q.shape[1] for q in codes}}
        sides = {"op": lambda x, q: q4f32_mm.q4f32_mm(x, q),
                 "mkl": lambda x, q: F.linear(x, q4f32_mm.unpack_into(q, _scratch()))}
        times = {s: [] for s in sides}
        for rep in range(repeats):
            for s, op in list(sides.items())[::1 if rep % 2 == 0 else -1]:         # who goes first alternates
                t = time.perf_counter()
                for q in codes:
                    op(xs[q.shape[1]], q)
                times[s].append((time.perf_counter() - t) * 1e3)
        op_ms, mkl_ms = statistics.median(times["op"]), statistics.median(times["mkl"])
        print(f"{m:>5} {op_ms:>9.1f} {mkl_ms:>14.1f} {mkl_ms / op_ms:>8.2f}x")
        out.append(dict(rows=m, op_ms=op_ms, mkl_ms=mkl_ms, ratio=mkl_ms / op_ms))
    return out


def cold_prompts_by_side(eng, lins: list, attr: str, sides: dict, lengths: list[int], repeats: int,
                         title: str) -> dict:
    """Median ms of cold random prompts of each length on eng with every linear's `attr` set to each side's value
    in turn (who goes first alternates; the linears' own values restored after), printed under `title`; ratio =
    the first side's time / the second's. Also bench/int4_prefill.py's engine part."""
    from pdcluster.bench.greedy_head import run
    saved = [getattr(lin, attr) for lin in lins]
    rng = random.Random(0)
    times = {s: {n: [] for n in lengths} for s in sides}
    try:
        for rep in range(repeats):
            for n in lengths:
                for side, value in list(sides.items())[::1 if rep % 2 == 0 else -1]:
                    for lin in lins:
                        setattr(lin, attr, value)
                    times[side][n].append(run(eng, [rng.randrange(1000, 40000) for _ in range(n)]))
    finally:
        for lin, value in zip(lins, saved):
            setattr(lin, attr, value)
    med = {s: {n: statistics.median(v) for n, v in t.items()} for s, t in times.items()}
    before, now = list(sides)
    ratio = {str(n): med[before][n] / med[now][n] for n in lengths}          # by prompt tokens
    print(f"{title}, median of {repeats}:")
    for n in lengths:
        print(f"{n:>5} tokens: {before} {med[before][n]:8.1f} ms   {now} {med[now][n]:8.1f} ms   "
              f"{ratio[str(n)]:.3f}x")
    return dict(runs=times, median=med, ratio=ratio)


def engine_part(lengths: list[int], repeats: int) -> dict:
    from pdcluster.bench.greedy_head import engine
    from pdcluster.kernels import f32_mm, q4f32_mm
    eng = engine(True)
    lins = [lin for L in eng.model.layers for lin in (L.qkv, L.o, L.gate_up, L.down)]
    if not all(isinstance(lin.packed, q4f32_mm.Q4F32Weight) for lin in lins):
        raise SystemExit("the engine does not hold Q4_1 codes here: nothing to compare")
    budget = eng.cfg.sched.max_num_batched_tokens
    sides = {f"MKL from {f32_mm.MKL_MIN_ROWS}": f32_mm.MKL_MIN_ROWS, f"op to {q4f32_mm.mkl_min_rows() - 1}":
             q4f32_mm.mkl_min_rows()}
    res = cold_prompts_by_side(eng, lins, "mkl_min_rows", sides, lengths, repeats,
                               f"engine, cold prompts (step budget {budget} tokens)")
    return dict(res, step_budget=budget)


def plot(result: dict, path: str) -> None:
    """MKL / op per pass against the rows, and the engine's ratios per prompt length."""
    from pdcluster.bench.plots import ratio_figure
    ratio_figure(result["linears"], "expand + MKL time / op time",
                 "SmolLM2-135M Q4_1 codes: 30 layers' linears (1 thread)", result.get("engine"),
                 "engine, cold prompts of N tokens: MKL from 768 / op", path)


def main(argv=None) -> int:
    from pdcluster.deploy.cli import HelpFormatter
    from pdcluster.bench.outputs import Listed
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=Listed([512, 768, 1024, 2048, 4096]),
                    help="rows per linear call")
    ap.add_argument("--repeats", type=int, default=3, help="linears part: passes per side, alternated")
    ap.add_argument("--lengths", type=int, nargs="+", default=Listed([776, 1024, 1536, 2040]),
                    help="engine part: prompt tokens")
    ap.add_argument("--repeats-engine", type=int, default=3, help="engine part: prompts per side and length (0: skip)")
    outputs.add_args(ap)
    a = ap.parse_args(argv)
    if outputs.replotted(a, plot, "bench/prefill-chunks.png"):
        return 0
    torch.set_num_threads(1)
    result = dict(threads=1, linears=linears_part(a.rows, a.repeats))
    result["engine"] = engine_part(a.lengths, a.repeats_engine) if a.repeats_engine else None
    outputs.save(a, result, plot, draw=bool(result["linears"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
