"""float32 linears on CPU: MKL's F.linear against pdcluster::f32_mm on weights packed at load, side by side.

    python -m pdcluster.bench.f32_linears --threads 1 2 --out bench/f32-linears.json --plot bench/f32-linears.png

Two parts, both alternating the sides round by round in this one process (a shared host: read the ratios):
  linears  per thread count and row count M: SmolLM2-135M's four layer shapes (qkv 960x576, o 576x576, gate_up
           3072x576, down 576x1536), --layers distinct weights each (as a step's 30 layers: read from memory,
           not from a cache one hot weight would sit in); the median ms for all of them, and MKL / f32_mm.
  engine   the embedded model (float32, the default engine) on one LLMEngine whose layers' linears are swapped
           between the two sides (the same weights; on the embedded Q4_1 file the op side holds them as codes,
           kernels/q4f32_mm.py): a cold --prompt-len prefill, a prefix hit (--prompt-len -
           --tail-len tokens cached, --tail-len computed) and a pure decode step at --batch rows; median ms.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch
import torch.nn.functional as F

from pdcluster.bench import outputs

SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))
SIDES = ("mkl", "f32mm")


def bench_linears(rows: list[int], threads: list[int], layers: int, rounds: int) -> list[dict]:
    from pdcluster.kernels.f32_mm import f32_mm, pack
    g = torch.Generator().manual_seed(0)
    ws = {s: [torch.randn(*s, generator=g) * 0.05 for _ in range(layers)] for s in SHAPES}
    packed = {s: [pack(w) for w in ws[s]] for s in SHAPES}
    calls = {"mkl": lambda x, s, i: F.linear(x, ws[s][i]), "f32mm": lambda x, s, i: f32_mm(x, packed[s][i])}
    out = []
    for t in threads:
        torch.set_num_threads(t)
        for m in rows:
            xs = {s: torch.randn(m, s[1], generator=g) for s in SHAPES}
            times = {side: [] for side in SIDES}
            for r in range(rounds + 1):                              # round 0 warms up, unrecorded
                for side in (SIDES if r % 2 == 0 else SIDES[::-1]):
                    t0 = time.perf_counter()
                    for s in SHAPES:
                        for i in range(layers):
                            calls[side](xs[s], s, i)
                    if r:
                        times[side].append((time.perf_counter() - t0) * 1e3)
            med = {side: statistics.median(v) for side, v in times.items()}
            row = dict(threads=t, rows=m, **{f"{s}_ms": med[s] for s in SIDES}, ratio=med["mkl"] / med["f32mm"])
            print(f"threads {t} rows {m:4d}: mkl {med['mkl']:8.2f} ms  f32_mm {med['f32mm']:8.2f} ms  "
                  f"mkl / f32_mm {row['ratio']:.2f}x", flush=True)
            out.append(row)
    return out


def bench_engine(a) -> dict:
    from pdcluster.engine.llama import Linear
    from pdcluster.engine.llm_engine import LLMEngine, build_config
    from pdcluster.engine.sampling_params import SamplingParams
    from pdcluster.kernels import f32_mm, q4f32_mm
    torch.set_num_threads(a.engine_threads)
    eng = LLMEngine(build_config(num_threads=a.engine_threads, speculative="off", max_num_batched_tokens=4096))
    eng.warmup()
    m = eng.model
    names = ("qkv", "o", "gate_up", "down")
    packed = [[getattr(L, n) for n in names] for L in m.layers]
    if any(lin.packed is None for lins in packed for lin in lins):
        raise SystemExit("the engine's linears are not packed (pdcluster's CPU ops did not build here)")
    form = lambda q: q4f32_mm if isinstance(q, q4f32_mm.Q4F32Weight) else f32_mm      # noqa: E731 (codes: Q4_1 file)
    plain = [[Linear(form(lin.packed).unpack_into(lin.packed, {}), lin.bias, split=False) for lin in lins]
             for lins in packed]
    sides = {"f32mm": packed, "mkl": plain}

    def use(side: str) -> None:
        for L, lins in zip(m.layers, sides[side]):
            for n, lin in zip(names, lins):
                setattr(L, n, lin)

    rng = random.Random(0)
    vocab = eng.cfg.model.vocab_size
    tok = lambda n: [rng.randrange(100, vocab) for _ in range(n)]          # noqa: E731
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    def run(prompt, params=one) -> tuple[float, list[float]]:
        t0 = time.perf_counter()
        eng.add_request(prompt, params)
        steps = []
        while eng.has_work():
            s = time.perf_counter()
            eng.step()
            steps.append((time.perf_counter() - s) * 1e3)
        return (time.perf_counter() - t0) * 1e3, steps

    res = {side: {"cold_ms": [], "hit_ms": [], "decode_step_ms": []} for side in SIDES}
    for r in range(a.repeats):
        for side in (SIDES if r % 2 == 0 else SIDES[::-1]):
            use(side)
            eng.kv.pool.reset_prefix_cache()
            prefix = tok(a.prompt_len - a.tail_len)
            res[side]["cold_ms"].append(run(prefix + tok(a.tail_len))[0])
            res[side]["hit_ms"].append(run(prefix + tok(a.tail_len))[0])
            for _ in range(a.batch):
                eng.add_request(tok(16), SamplingParams(max_tokens=a.decode_steps + 1, temperature=0.0,
                                                        ignore_eos=True))
            eng.step()                                                      # the batch's prefill
            steps = []
            while eng.has_work():
                s = time.perf_counter()
                eng.step()
                steps.append((time.perf_counter() - s) * 1e3)
            res[side]["decode_step_ms"].append(statistics.median(steps))
        print(f"  repeat {r}: " + " | ".join(
            f"{s}: cold {res[s]['cold_ms'][-1]:.1f} hit {res[s]['hit_ms'][-1]:.1f} "
            f"decode step {res[s]['decode_step_ms'][-1]:.1f}" for s in SIDES), flush=True)
    use("f32mm")
    med = {s: {k: statistics.median(v) for k, v in res[s].items()} for s in SIDES}
    ratio = {k: med["mkl"][k] / med["f32mm"][k] for k in med["mkl"]}
    print(f"\nengine, {a.engine_threads} thread(s), median of {a.repeats} (ms):")
    print(f"{'':8} {'cold ' + str(a.prompt_len):>10} {'hit +' + str(a.tail_len):>10} {'decode x' + str(a.batch):>10}")
    for s in SIDES:
        print(f"{s:8} {med[s]['cold_ms']:10.1f} {med[s]['hit_ms']:10.1f} {med[s]['decode_step_ms']:10.1f}")
    print(f"{'ratio':8} {ratio['cold_ms']:9.2f}x {ratio['hit_ms']:9.2f}x {ratio['decode_step_ms']:9.2f}x  "
          "(mkl / f32_mm)")
    return dict(runs=res, median=med, ratio=ratio)


def plot(result: dict, path: str) -> None:
    """MKL / f32_mm per row count, one line per thread count, and the engine's three ratios."""
    from matplotlib.figure import Figure

    from pdcluster.bench.plots import ratio_bars
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    ax, ax2 = fig.subplots(1, 2, width_ratios=(2, 1))
    for t in sorted({r["threads"] for r in result["linears"]}):
        rs = [r for r in result["linears"] if r["threads"] == t]
        ax.plot([r["rows"] for r in rs], [r["ratio"] for r in rs], marker="o", label=f"{t} thread(s)")
    ax.axhline(1.0, color="grey", lw=1)
    ax.set(xscale="log", xlabel="rows of x (M)", ylabel="MKL time / f32_mm time",
           title="30 layers' float32 linears (SmolLM2-135M shapes)")
    ax.legend()
    ax.grid(alpha=0.3)
    if result.get("engine"):
        ratio_bars(ax2, result["engine"]["ratio"], "engine (float32): MKL / f32_mm")
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    from pdcluster.deploy.cli import HelpFormatter
    from pdcluster.bench.outputs import Listed
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=Listed([1, 2, 4, 8, 16, 24, 32, 64, 128, 408]),
                    help="row counts M of x")
    ap.add_argument("--threads", type=int, nargs="+", default=Listed([1, 2]), help="torch thread counts (linears part)")
    ap.add_argument("--layers", type=int, default=30, help="distinct weights per shape")
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds per (threads, rows), sides alternating")
    ap.add_argument("--engine-threads", type=int, default=1, help="torch threads of the engine part")
    ap.add_argument("--repeats", type=int, default=5, help="engine part: repeats, sides alternating (0: skip it)")
    ap.add_argument("--prompt-len", type=int, default=408, help="engine part: prompt tokens")
    ap.add_argument("--tail-len", type=int, default=24, help="engine part: tokens computed after a cached prefix")
    ap.add_argument("--batch", type=int, default=8, help="engine part: rows of the decode step")
    ap.add_argument("--decode-steps", type=int, default=16, help="engine part: decode steps per repeat")
    outputs.add_args(ap, "bench/f32-linears.json")
    a = ap.parse_args(argv)
    if outputs.replotted(a, plot, "bench/f32-linears.png"):
        return 0
    if a.tail_len <= 0 or a.tail_len >= a.prompt_len:
        raise ValueError("--tail-len must be in 1 .. --prompt-len - 1")
    from pdcluster.kernels.f32_mm import available
    if not available():
        raise SystemExit("pdcluster::f32_mm is not available on this host (no AVX-512 or AVX2, or the build failed)")
    result = dict(args=vars(a), load_before=list(os.getloadavg()),
                  linears=bench_linears(a.rows, a.threads, a.layers, a.rounds))
    result["engine"] = bench_engine(a) if a.repeats else None
    result["load_after"] = list(os.getloadavg())
    outputs.save(a, result, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
