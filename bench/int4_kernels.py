"""CPU linear kernels at decode row counts for the GGUF int4 decode step, per shape, side by side.

    python -m pdcluster.bench.int4_kernels --rows 1 8 --threads 1 2

For each thread count, row count M and weight shape [N, K] (default: SmolLM2-135M's qkv, o, gate_up,
down), every variant gets --layers distinct weights (as a decode step's 30 layers: the weights are read
from memory, not from a cache that one hot weight would sit in) and runs them all once per repeat;
variants alternate round by round in this process, and the table prints the median us per call and
aten's time over the variant's (> 1: faster than the engine's kernel called eagerly; compare the template
with aten-compiled). Variants:
  aten      aten._weight_int4pack_mm_for_cpu, bfloat16 x: torch's int4 kernel (Int4Linear, the engine's fallback)
  q4x8      pdcluster::q4x8_mm (engine/quant/q4x8.py): the same Q4_1 values, x rounded to int8 per block of
            32, integer sums on VNNI: the engine's int4 kernel where it builds
  aten-compiled  the same aten calls from one torch.compile'd graph of them all (weights frozen as
            constants, no per-call Python): the baseline the template replaces inside a compiled step
  template  inductor's WOQ int4 C++ GEMM template (CppWoqInt4GemmTemplate): the same graph compiled with
            max_autotune on the CPP backend only, which is when inductor picks it; "equal" says whether
            it gives aten's bits
  fbgemm8   fbgemm's dynamic int8 linear on a per-row int8 requantization (x rounded to 8 bits per call)
  int8pack  aten._weight_int8pack_mm on the same per-row int8 codes
  intmm     the engine's Dyn8Linear.rows on the same codes: x rounded to int8 per row, torch._int_mm
            (the int8 head's and int8 linears' path at 2-63 rows)
  onednn    the same arithmetic on oneDNN's prepacked int8 weight (cpu_linear.OneDNNRows: no per-call
            weight reorder): the head's 2+ rows and the int4 linears' int8 copies from 64 rows (where exact)
  fbgemm16  fbgemm's fp16-weight linear
  bf16      F.linear with bfloat16 weights (oneDNN)
Only aten, q4x8 and template carry a Q4_1 weight's exact values; the others are what the weight would cost in
their formats. Timings are wall clock: on a shared host compare the ratios, and read the load average.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

GROUP = 32
BF16 = torch.bfloat16
SHAPES = ("960x576", "576x576", "3072x576", "576x1536")
VARIANTS = ("aten", "q4x8", "aten-compiled", "template", "fbgemm8", "int8pack", "intmm", "onednn", "fbgemm16", "bf16")


class Int4Mms(torch.nn.Module):
    """forward(x [M, K] bf16) -> L outputs [M, N]: one int4pack mm per weight (weights as buffers, so a
    compile with freezing holds them as constants)."""

    def __init__(self, ws: list[tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        for i, (packed, sz) in enumerate(ws):
            self.register_buffer(f"w{i}", packed)
            self.register_buffer(f"sz{i}", sz)
        self.n = len(ws)

    def forward(self, x):
        return [torch.ops.aten._weight_int4pack_mm_for_cpu(x, getattr(self, f"w{i}"), GROUP, getattr(self, f"sz{i}"))
                for i in range(self.n)]


def q4_weight(N: int, K: int, g: torch.Generator):
    """Random Q4_1-like weight: codes [N, K] 0..15, scale d and min m per group of 32; float32 [N, K] values."""
    codes = torch.randint(0, 16, (N, K), dtype=torch.int32, generator=g)
    d = torch.rand(N, K // GROUP, generator=g) * 0.02
    m = -8 * d + torch.randn(N, K // GROUP, generator=g) * 1e-3
    w = (codes.view(N, -1, GROUP).float() * d[..., None] + m[..., None]).view(N, K)
    return codes, d, m, w


def make_calls(name: str, weights: list, M: int, K: int):
    """One callable per weight taking x float32 [M, K] (or, for "template", one callable for all)."""
    if name in ("aten", "aten-compiled", "template"):
        packed = [(torch.ops.aten._convert_weight_to_int4pack_for_cpu(c, 1),
                   torch.stack([d.t(), (m + 8 * d).t()], -1).to(BF16).contiguous()) for c, d, m, _ in weights]
        if name == "aten":
            return [lambda x, p=p, s=s: torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(BF16), p, GROUP, s)
                    for p, s in packed]
        mod = Int4Mms(packed).eval()
        import torch._inductor.config as ic
        torch._dynamo.reset()
        tune = {"max_autotune": True, "max_autotune_gemm_backends": "CPP"} if name == "template" else {}
        with torch.no_grad(), ic.patch(freezing=True, fx_graph_cache=False, **tune):   # freezing: inference only
            f = torch.compile(mod, dynamic=False, fullgraph=True)
            x0 = torch.randn(M, K).to(BF16)
            t = time.perf_counter()
            got = f(x0)
            compile_s = time.perf_counter() - t
        equal = all(torch.equal(a, b) for a, b in zip(got, mod(x0)))
        return [lambda x: f(x.to(BF16))], {"compile_s": compile_s, "equal": equal}
    if name == "q4x8":
        from pdcluster.engine.quant import q4x8
        from pdcluster.engine.quant.packed import Int4Weight, pack_codes
        if not q4x8.available():
            raise RuntimeError("q4x8 is not available on this host (see the log)")
        qs = [q4x8.pack(Int4Weight(pack_codes(c), d, m + 8 * d)) for c, d, m, _ in weights]
        return [lambda x, q=q: q4x8.q4x8_mm(x, q) for q in qs]
    calls = []
    for _, _, _, w in weights:
        N = w.shape[0]
        if name in ("fbgemm8", "int8pack", "intmm", "onednn"):
            s = w.abs().amax(1).clamp_min(1e-12) / 127
            q = torch.round(w / s[:, None]).to(torch.int8)
            if name == "onednn":
                from pdcluster.engine.quant.cpu_linear import OneDNNRows
                calls.append(OneDNNRows(q, s))
                continue
            if name == "intmm":
                from pdcluster.engine.quant.cpu_linear import Dyn8Linear
                from pdcluster.engine.quant.packed import Int8Weight
                calls.append(Dyn8Linear(Int8Weight(q, s), None).rows)
                continue
            if name == "int8pack":
                calls.append(lambda x, q=q, s=s.to(BF16): torch.ops.aten._weight_int8pack_mm(x.to(BF16), q, s))
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                wq = torch._make_per_channel_quantized_tensor(q, s.double(), torch.zeros(N, dtype=torch.long), 0)
            p = torch.ops.quantized.linear_prepack(wq, None)
            calls.append(lambda x, p=p: torch.ops.quantized.linear_dynamic(x, p, True))
        elif name == "fbgemm16":
            p = torch.ops.quantized.linear_prepack_fp16(w, None)
            calls.append(lambda x, p=p: torch.ops.quantized.linear_dynamic_fp16(x, p))
        elif name == "bf16":
            calls.append(lambda x, wb=w.to(BF16): F.linear(x.to(BF16), wb))
        else:
            raise ValueError(f"unknown variant {name!r}")
    return calls


def run_shape(variants, N: int, K: int, M: int, layers: int, reps: int, rounds: int) -> str:
    g = torch.Generator().manual_seed(0)
    weights = [q4_weight(N, K, g) for _ in range(layers)]
    calls, notes = {}, {}
    for v in variants:
        got = make_calls(v, weights, M, K)
        calls[v], notes[v] = got if isinstance(got, tuple) else (got, {})
    per_call = {v: layers / len(c) for v, c in calls.items()}     # the template runs all weights in one call
    x = torch.randn(M, K, generator=g)
    times = {v: [] for v in calls}
    load0 = os.getloadavg()[0]
    with torch.no_grad():
        for _ in range(rounds):
            for v, cs in calls.items():
                for c in cs:
                    c(x)
                t = time.perf_counter()
                for _ in range(reps):
                    for c in cs:
                        c(x)
                times[v].append((time.perf_counter() - t) / reps / len(cs) / per_call[v] * 1e6)
    med = {v: statistics.median(t) for v, t in times.items()}
    base = med.get("aten")
    cells = []
    for v, t in med.items():
        cell = f"{v} {t:.1f}" + (f" ({base / t:.2f}x)" if base and v != "aten" else "")
        if "equal" in notes[v]:
            cell += f" [equal {notes[v]['equal']}, compile {notes[v]['compile_s']:.0f} s]"
        cells.append(cell)
    return (f"| {torch.get_num_threads()} | {M} | {N}x{K} | " + " | ".join(cells)
            + f" | {load0:.1f}-{os.getloadavg()[0]:.1f} |")


def main(argv=None) -> int:
    from pdcluster.deploy.cli import HelpFormatter
    from pdcluster.bench.outputs import Listed
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=Listed([1, 8]), help="M: decode rows per call")
    ap.add_argument("--threads", type=int, nargs="+", default=Listed([1, 2]),
                    help="torch thread counts, one table block each")
    ap.add_argument("--shapes", nargs="+", default=Listed(SHAPES), help="weight shapes NxK (out x in features)")
    ap.add_argument("--variants", nargs="+", default=Listed(VARIANTS), choices=VARIANTS,
                    help="kernels to time (module doc), alternated within each round")
    ap.add_argument("--layers", type=int, default=30, help="distinct weights per shape and variant")
    ap.add_argument("--reps", type=int, default=20, help="passes over the weights per timed round")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (variants alternate within each)")
    a = ap.parse_args(argv)
    print("| threads | M | shape | us per call (aten / variant) ... | load average |")
    for threads in a.threads:
        torch.set_num_threads(threads)
        for M in a.rows:
            for shape in a.shapes:
                N, K = (int(v) for v in shape.split("x"))
                print(run_shape(a.variants, N, K, M, a.layers, a.reps, a.rounds), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
