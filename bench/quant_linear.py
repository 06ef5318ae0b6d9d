"""CPU micro-benchmark of packed linears: one decode step's 120 layer matmuls (+ the LM head).

    python -m pdcluster.bench.quant_linear [--threads 2] [--rows 1 4 16 32 48 64 128 512] [--head]

Weights are SmolLM2-135M-shaped and random (30 layers x qkv [960x576], o [576x576], gate_up
[3072x576], down [576x1536]); each timed pass runs all 120 in turn, so they stream from memory as in a
real step instead of sitting in cache. Columns, ms per pass (median of --repeats, interleaved):
  f32        the engine's dense float32 Linear (engine/llama.py: split-bmm / oneDNN / MKL by rows)
  i4 / i8    torch's int4pack / int8pack kernels with bfloat16 activations (engine/quant/cpu_linear.py)
  i4-f32     the same int4 kernel fed float32 activations (a scalar loop; rows <= 4 only: slow)
  i4-dq/i8-dq  dequantize each weight to float32, then MKL's GEMM (the large-M path)
  w8a8       fbgemm's dynamic int8 linear, the engine's int8 decode kernel where torch has it
             (engine/quant/cpu_linear.Dyn8Linear: activations quantized per tensor at run time,
             integer dot products), which changes the activations' numerics as llama.cpp's Q8 does
and each over f32 (< 1: faster than float32). The row count where `dq` beats the kernel sets
engine/quant/cpu_linear.DENSE_MIN_ROWS.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from pdcluster.deploy.cli import HelpFormatter  # noqa: E402
from pdcluster.bench.outputs import Listed  # noqa: E402

SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))
LAYERS = 30


def _time(fn, x_by_k, weights) -> float:
    t = time.perf_counter()
    for w in weights:
        fn(w, x_by_k[w[1]])
    return time.perf_counter() - t


def _w8a8(w: torch.Tensor):
    from pdcluster.engine.quant.cpu_linear import Dyn8Linear
    from pdcluster.engine.quant.packed import quantize_int8

    return Dyn8Linear(quantize_int8(w), None).kernel


def main(argv=None) -> int:
    from pdcluster.engine.llama import Linear
    from pdcluster.engine.quant.cpu_linear import Int4Linear, Int8Linear
    from pdcluster.engine.quant.packed import GROUP, quantize_int4, quantize_int8

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--rows", type=int, nargs="+", default=Listed([1, 4, 16, 32, 48, 64, 128, 512]),
                    help="rows of x per call")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per variant and row count (median)")
    ap.add_argument("--head", action="store_true", help="also time the 49152x576 LM head (f32, i4, i8)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    shapes = [s for _ in range(LAYERS) for s in SHAPES]
    if a.head:
        shapes.append((49152, 576))
    print(f"building {len(shapes)} weights ...", flush=True)
    ws = []
    for N, K in shapes:
        w = torch.randn(N, K, generator=g) * 0.05
        ws.append((w.shape[0], K, Linear(w, None, split=False), Int4Linear(quantize_int4(w), None),
                   Int8Linear(quantize_int8(w), None), _w8a8(w)))
    modes = {
        "f32": lambda w, x: w[2](x),
        "i4": lambda w, x: w[3].kernel(x),
        "i4-f32": lambda w, x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w[3].packed, GROUP, w[3].sz.float()),
        "i4-dq": lambda w, x: w[3].dense(x),
        "i8": lambda w, x: w[4].kernel(x),
        "i8-dq": lambda w, x: w[4].dense(x),
        "w8a8": lambda w, x: w[5](x),
    }
    print(f"{torch.get_num_threads()} threads; ms per pass over {len(ws)} matmuls")
    print(f"{'rows':>5}" + "".join(f"{m:>9}" for m in modes) + "".join(f"{m + '/f32':>11}" for m in modes if m != "f32"))
    for M in a.rows:
        xs = {K: torch.randn(M, K, generator=g) for K in {s[1] for s in shapes}}
        use = {m: f for m, f in modes.items() if m != "i4-f32" or M <= 4}
        with torch.inference_mode():
            for f in use.values():
                _time(f, xs, ws[:8])
            times = {m: [] for m in use}
            for _ in range(a.repeats):
                for m, f in use.items():
                    times[m].append(_time(f, xs, ws))
        med = {m: statistics.median(v) * 1e3 for m, v in times.items()}
        line = f"{M:>5}" + "".join(f"{med[m]:>9.1f}" if m in med else f"{'-':>9}" for m in modes)
        line += "".join(f"{med[m] / med['f32']:>10.2f}x" if m in med else f"{'-':>11}" for m in modes if m != "f32")
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
