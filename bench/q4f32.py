"""float32 linears read as Q4_1 codes (kernels/q4f32_mm.py) against the same linears as float32 blocks
(kernels/f32_mm.py), on CPU, one thread.

    python -m pdcluster.bench.q4f32 --out bench/q4f32.json --plot bench/q4f32.png

Linears part: the embedded SmolLM2-135M Q4_1 GGUF loaded as float32 (as a default engine loads it), its 30 layers'
fused linears (qkv, o, gate_up, down) in both forms in one process, passes alternated: ms per pass over the 120
linears at each --rows, and whether the two forms gave the same bits.

Engine part (--repeats-engine > 0): two float32 engines on the embedded model, weight_codes on and off, speculative
decoding off, alternated: bench/greedy_head.py's engine_part (a cold 408-token prompt, a prefix hit of 384 cached
+ 24 computed, a decode step after a hit), and the greedy tokens of both on the same prompts.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from pdcluster.bench import outputs


def model_linears():
    """(float32 blocks, codes) of the embedded model's fused layer linears, as engine/llama.py's Layer holds them."""
    from pdcluster.engine.llama import Layer
    from pdcluster.engine.loader import load_model_config, load_weights
    from pdcluster.kernels import q4f32_mm
    cfg = load_model_config(None)
    sd = load_weights(cfg, torch.float32, "none")
    blocks, codes = [], []
    for i in range(cfg.num_layers):
        for out, c in ((blocks, False), (codes, True)):
            L = Layer(sd, f"model.layers.{i}", cfg.attention_bias, "cpu", split=False, codes=c)
            out += [lin.packed for lin in (L.qkv, L.o, L.gate_up, L.down)]
    if not all(isinstance(q, q4f32_mm.Q4F32Weight) for q in codes):
        raise SystemExit("the embedded model's linears are not all Q4_1 values: nothing to compare")
    return blocks, codes


def linears_part(rows: list[int], repeats: int) -> list[dict]:
    from pdcluster.engine import cpu_ext
    from pdcluster.kernels import f32_mm, q4f32_mm
    if not cpu_ext.has("q4f32_mm"):
        print("pdcluster's CPU ops are not built here: no f32_mm / q4f32_mm", file=sys.stderr)
        return []
    blocks, codes = model_linears()
    print(f"{len(blocks)} linears: float32 blocks {sum(q.nbytes for q in blocks) / 1e6:.0f} MB, codes "
          f"{sum(q.nbytes for q in codes) / 1e6:.0f} MB")
    print(f"{'rows':>5} {'float32 ms':>11} {'codes ms':>9} {'ratio':>7}  same bits")
    g = torch.Generator().manual_seed(0)
    out = []
    for m in rows:
        xs = {k: torch.randn(m, k, generator=g) for k in {q.shape[1] for q in blocks}}
        same = all(torch.equal(f32_mm.f32_mm(xs[a.shape[1]], a), q4f32_mm.q4f32_mm(xs[b.shape[1]], b))
                   for a, b in zip(blocks, codes))

        def sweep(ws, op):
            t = time.perf_counter()
            for q in ws:
                op(xs[q.shape[1]], q)
            return (time.perf_counter() - t) * 1e3
        t_f, t_q = [], []
        for _ in range(repeats):
            t_f.append(sweep(blocks, f32_mm.f32_mm))
            t_q.append(sweep(codes, q4f32_mm.q4f32_mm))
        f, q = statistics.median(t_f), statistics.median(t_q)
        print(f"{m:>5} {f:>11.1f} {q:>9.1f} {f / q:>6.2f}x  {same}")
        out.append(dict(rows=m, float32_ms=f, codes_ms=q, ratio=f / q, same_bits=same))
    return out


def tokens(eng, n: int) -> list[list[int]]:
    from pdcluster.bench.greedy_head import PROMPTS
    from pdcluster.engine.sampling_params import SamplingParams
    outs = []
    for p in PROMPTS:
        req = eng.add_request(eng.tokenizer.encode(p), SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        while eng.has_work():
            eng.step()
        outs.append(list(req.output_token_ids))
    return outs


def engine_part(repeats: int, decode_tokens: int) -> dict:
    from pdcluster.bench.greedy_head import engine, engine_part as timings
    engines = {"float32": engine(True, weight_codes=False), "codes": engine(True, weight_codes=True)}
    same = tokens(engines["float32"], 32) == tokens(engines["codes"], 32)
    print(f"greedy tokens of both engines on bench/greedy_head.py's prompts (32 each): same = {same}")
    return dict(timings(engines, 408, 24, decode_tokens, repeats), same_tokens=same)


def plot(result: dict, path: str) -> None:
    """float32 / codes per pass against the rows, and the engine's three ratios."""
    from pdcluster.bench.plots import ratio_figure
    ratio_figure(result["linears"], "float32 blocks time / codes time",
                 "SmolLM2-135M Q4_1 as float32: 30 layers' linears (1 thread)", result.get("engine"),
                 "engine: float32 blocks / codes", path)


def main(argv=None) -> int:
    from pdcluster.deploy.cli import HelpFormatter
    from pdcluster.bench.outputs import Listed
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=Listed([1, 4, 24, 96, 408]), help="rows per linear call")
    ap.add_argument("--repeats", type=int, default=7, help="linears part: passes per side, alternated")
    ap.add_argument("--repeats-engine", type=int, default=8, help="engine part: repeats per engine (0: skip)")
    ap.add_argument("--decode-tokens", type=int, default=32, help="engine part: decode steps timed after a hit")
    outputs.add_args(ap)
    a = ap.parse_args(argv)
    if outputs.replotted(a, plot, "bench/q4f32.png"):
        return 0
    torch.set_num_threads(1)
    result = dict(threads=1, linears=linears_part(a.rows, a.repeats))
    result["engine"] = engine_part(a.repeats_engine, a.decode_tokens) if a.repeats_engine else None
    outputs.save(a, result, plot, draw=bool(result["linears"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
