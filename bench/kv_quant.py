"""Quantized KV cache and quantized weights, side by side in one run (issue 18 points 1-2).

    python -m pdcluster.bench.kv_quant [--weights none int8 int4] [--kv auto int8] [--batches 1 32]
                                       [--prompt-len 128] [--new-tokens 64] [--repeats 3] [--out F.json]

One engine per (--weights, --kv) pair (EngineConfig.quantization, kv_cache_dtype), all built up front;
each round runs every engine once per batch size (interleaved, so machine drift hits all alike) and the
median of --repeats rounds is reported:
  step ms   mean decode step (the engine's own StepStats: steps with one new token per sequence)
  tok/s     output tokens / wall seconds of LLM.generate (prefill of the prompts included)
  vs base   tok/s over the first pair's (--weights[0], --kv[0]) at the same batch size
Also printed: KV capacity, blocks (and tokens) per GiB for each --kv at the model's dtype (and
bfloat16), from ModelConfig.kv_bytes_per_block: what EngineConfig's budget turns into blocks.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def capacity_rows(model_cfg, kv_dtypes, block_size: int) -> list[dict]:
    """Blocks and tokens per GiB of KV budget, per KV dtype, for float32 and bfloat16 models."""
    rows = []
    for model_dtype, nbytes in (("float32", 4), ("bfloat16", 2)):
        base = model_cfg.kv_bytes_per_block("auto", nbytes, block_size)
        for kv in kv_dtypes:
            per = model_cfg.kv_bytes_per_block(kv, nbytes, block_size)
            rows.append(dict(model_dtype=model_dtype, kv=kv, bytes_per_block=per, blocks_per_gib=2**30 // per,
                             tokens_per_gib=2**30 // per * block_size, vs_auto=base / per))
    return rows


def main(argv=None) -> int:
    from pdcluster.deploy.cli import HelpFormatter
    from pdcluster.bench.outputs import Listed
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder or .gguf (default: embedded SmolLM2-135M)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="activation dtype")
    ap.add_argument("--weights", nargs="+", default=Listed(["none", "int8", "int4"]), choices=["none", "int8", "int4"],
                    help="weight quantization (engine/quant/), one engine each")
    ap.add_argument("--kv", nargs="+", default=Listed(["auto", "int8"]), choices=["auto", "int8", "fp8"],
                    help="KV cache dtype (engine/kv_quant.py), one engine each")
    ap.add_argument("--batches", type=int, nargs="+", default=Listed([1, 32]), help="decode batch sizes, one row each")
    ap.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (random ids)")
    ap.add_argument("--new-tokens", type=int, default=64, help="output tokens per request (EOS ignored)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per (engine, batch) pair (median reported)")
    ap.add_argument("--kv-mib", type=int, default=256, help="KV cache budget per engine, MiB")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default=None, help="write the results as JSON here (default: not written)")
    a = ap.parse_args(argv)

    from tqdm import tqdm

    from pdcluster.engine import LLM, SamplingParams
    if a.threads:
        torch.set_num_threads(a.threads)
    pairs = list(itertools.product(a.weights, a.kv))
    llms = {}
    for w, kv in tqdm(pairs, desc="loading engines"):
        llms[w, kv] = LLM(a.model, dtype=a.dtype, quantization=w, kv_cache_dtype=kv, kv_cache_memory=a.kv_mib * 2**20,
                          max_num_seqs=max(a.batches), max_num_batched_tokens=max(2048, a.prompt_len * max(a.batches)),
                          enable_prefix_caching=False)
    first = llms[pairs[0]]
    V = first.engine.cfg.model.vocab_size
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=a.new_tokens, temperature=0, ignore_eos=True)

    def run(llm, b, sp=params) -> tuple[float, float]:
        """(mean decode step seconds, output tok/s) of b random prompts."""
        ps = torch.randint(100, V - 100, (b, a.prompt_len), generator=g).tolist()
        st = llm.engine.stats
        s0, n0 = st.decode_s, st.decode_steps
        t = time.perf_counter()
        outs = llm.generate(ps, sp)
        wall = time.perf_counter() - t
        return (st.decode_s - s0) / max(1, st.decode_steps - n0), sum(len(o.token_ids) for o in outs) / wall

    for llm in llms.values():            # warm-up
        run(llm, 1, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    samples = {(p, b): [] for p in pairs for b in a.batches}
    with tqdm(total=a.repeats * len(a.batches) * len(pairs), desc="runs") as bar:
        for _ in range(a.repeats):
            for b in a.batches:
                for p in pairs:
                    samples[p, b].append(run(llms[p], b))
                    bar.update(1)
                    bar.write(f"  sample: batch {b} weights {p[0]} kv {p[1]}: step "
                              f"{1e3 * samples[p, b][-1][0]:.1f} ms, {samples[p, b][-1][1]:.1f} tok/s")
    rows = []
    for b in a.batches:
        base = statistics.median(s[1] for s in samples[pairs[0], b])
        for (w, kv) in pairs:
            s = samples[(w, kv), b]
            tps = statistics.median(x[1] for x in s)
            e = llms[w, kv].engine
            rows.append(dict(batch=b, weights=w, kv=kv, step_ms=1e3 * statistics.median(x[0] for x in s),
                             tok_s=tps, vs_base=tps / base, kv_blocks=e.kv.num_blocks,
                             kv_mib=e.runner.kv_cache_bytes() / 2**20))
    cap = capacity_rows(first.engine.cfg.model, a.kv, first.engine.cfg.cache.block_size)

    print(f"\n{torch.get_num_threads()} torch threads; {a.dtype} activations; prompts {a.prompt_len} tokens, "
          f"{a.new_tokens} new, median of {a.repeats}; KV budget {a.kv_mib} MiB per engine")
    print(f"{'batch':>5} {'weights':>8} {'kv':>5} {'step ms':>9} {'tok/s':>9} {'vs base':>8} {'KV blocks':>10}")
    for r in rows:
        print(f"{r['batch']:>5} {r['weights']:>8} {r['kv']:>5} {r['step_ms']:>9.1f} {r['tok_s']:>9.1f} "
              f"{r['vs_base']:>7.2f}x {r['kv_blocks']:>10}")
    print(f"\nKV capacity (block size {first.engine.cfg.cache.block_size}, scales included)")
    print(f"{'model dtype':>11} {'kv':>5} {'bytes/block':>12} {'blocks/GiB':>11} {'tokens/GiB':>11} {'vs auto':>8}")
    for r in cap:
        print(f"{r['model_dtype']:>11} {r['kv']:>5} {r['bytes_per_block']:>12} {r['blocks_per_gib']:>11} "
              f"{r['tokens_per_gib']:>11} {r['vs_auto']:>7.2f}x")
    if a.out:
        Path(a.out).write_text(json.dumps(dict(args=vars(a), rows=rows, capacity=cap), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
