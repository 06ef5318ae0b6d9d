"""Weights in huge pages (engine/hugepages.py) against the same weights on 4 KiB pages, on CPU, one thread.

    python -m pdcluster.bench.hugepages --out bench/hugepages.json --plot bench/hugepages.png

Linears part: SmolLM2-135M's 30 layers of packed float32 linears (kernels/f32_mm.py; random weights, 425 MB, so
every call streams its weight from DRAM as a step does), one copy of all of them in the arena and one on torch's
allocator, in the same process, runs alternated: ms per pass over the 120 linears at each --rows.

Engine part (--repeats-engine > 0): the float32 engine in a fresh process per run, PDCLUSTER_HUGEPAGES=1 and =0
alternated (speculative decoding off): bench/greedy_head.py's engine_timings ENGINE_REPEATS times (a cold 408-token
prompt, a prefix hit of 384 cached + 24 computed, a decode step after a hit), their medians, and the process's
AnonHugePages.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from pdcluster.bench import outputs

SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))      # qkv, o, gate_up, down: [N, K]
LAYERS = 30

ENGINE_RUN = r"""
import json, random, statistics, torch
from pdcluster.bench.greedy_head import engine, engine_timings, run
torch.set_num_threads(1)
eng = engine(True)
rng = random.Random(0)
fresh = lambda n: [rng.randrange(1000, 40000) for _ in range(n)]
prefix = fresh(384)
run(eng, prefix + fresh(24))
reps = [engine_timings(eng, prefix, fresh, 408, 24, 32) for _ in range(REPEATS)]
huge = [int(l.split()[1]) for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages")]
out = {k: statistics.median(r[k] for r in reps) for k in reps[0]}
print(json.dumps(dict(out, anon_huge_kb=huge[0] if huge else None)))
"""
ENGINE_REPEATS = 5                  # engine_timings repeats per process


def linears_part(rows: list[int], repeats: int) -> list[dict]:
    from pdcluster.engine import cpu_ext, hugepages
    from pdcluster.kernels import f32_mm as f32
    if not cpu_ext.has("f32_mm"):
        print("pdcluster's CPU ops are not built here: no f32_mm", file=sys.stderr)
        return []
    g = torch.Generator().manual_seed(0)
    huge, plain = [], []
    for _ in range(LAYERS):
        for n, k in SHAPES:
            q = f32.pack(torch.randn(n, k, generator=g) * 0.02)          # in the arena (pack's own allocation)
            huge.append(q)
            plain.append(f32.F32Weight(torch.empty_like(q.w).copy_(q.w), q.n))
    print(f"{len(huge)} packed linears, {sum(q.nbytes for q in huge) / 1e6:.0f} MB per copy; arena advised "
          f"{hugepages._ARENA.huge_bytes / 1e6:.0f} MB")
    print(f"{'rows':>5} {'4 KiB pages ms':>15} {'huge pages ms':>14} {'ratio':>7}")
    out = []
    for m in rows:
        xs = {k: torch.randn(m, k, generator=g) for k in {k for _, k in SHAPES}}

        def sweep(ws):
            t = time.perf_counter()
            for q in ws:
                f32.f32_mm(xs[q.shape[1]], q)
            return (time.perf_counter() - t) * 1e3
        sweep(huge), sweep(plain)
        t_plain, t_huge = [], []
        for _ in range(repeats):
            t_plain.append(sweep(plain))
            t_huge.append(sweep(huge))
        p, h = statistics.median(t_plain), statistics.median(t_huge)
        print(f"{m:>5} {p:>15.1f} {h:>14.1f} {p / h:>6.2f}x")
        out.append(dict(rows=m, plain_ms=p, huge_ms=h, ratio=p / h))
    return out


def engine_part(repeats: int) -> dict:
    runs = {"4 KiB pages": [], "huge pages": []}
    for _ in range(repeats):
        for side, flag in (("4 KiB pages", "0"), ("huge pages", "1")):
            env = dict(os.environ, PDCLUSTER_HUGEPAGES=flag)
            code = ENGINE_RUN.replace("REPEATS", str(ENGINE_REPEATS))
            res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            runs[side].append(json.loads(res.stdout.strip().splitlines()[-1]))
    keys = ("hit_ms", "cold_ms", "decode_step_ms")
    med = {s: {k: statistics.median(r[k] for r in rs) for k in keys} for s, rs in runs.items()}
    ratio = {k: med["4 KiB pages"][k] / med["huge pages"][k] for k in keys}
    print(f"engine, a fresh process per run, median over {repeats} runs a side:")
    for side in runs:
        print(f"{side:12} hit {med[side]['hit_ms']:6.1f} ms  cold {med[side]['cold_ms']:6.1f} ms  decode step "
              f"{med[side]['decode_step_ms']:5.1f} ms  AnonHugePages {[r['anon_huge_kb'] for r in runs[side]]} kB")
    print(f"ratio        hit {ratio['hit_ms']:6.3f}x    cold {ratio['cold_ms']:6.3f}x    decode step "
          f"{ratio['decode_step_ms']:5.3f}x  (4 KiB / huge)")
    return dict(runs=runs, median=med, ratio=ratio)


def plot(result: dict, path: str) -> None:
    """4 KiB / huge per pass against the rows, and the engine's three ratios."""
    from pdcluster.bench.plots import ratio_figure
    ratio_figure(result["linears"], "4 KiB pages time / huge pages time",
                 "30 layers' float32 linears, weights streamed from DRAM (1 thread)", result.get("engine"),
                 "engine: 4 KiB / huge pages", path)


def main(argv=None) -> int:
    from pdcluster.deploy.cli import HelpFormatter
    from pdcluster.bench.outputs import Listed
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=Listed([1, 4, 24, 96]), help="rows per linear call")
    ap.add_argument("--repeats", type=int, default=9, help="linears part: passes per side, alternated")
    ap.add_argument("--repeats-engine", type=int, default=3, help="engine part: processes per side (0: skip)")
    outputs.add_args(ap)
    a = ap.parse_args(argv)
    if outputs.replotted(a, plot, "bench/hugepages.png"):
        return 0
    torch.set_num_threads(1)
    result = dict(threads=1, linears=linears_part(a.rows, a.repeats))
    result["engine"] = engine_part(a.repeats_engine) if a.repeats_engine else None
    outputs.save(a, result, plot, draw=bool(result["linears"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
