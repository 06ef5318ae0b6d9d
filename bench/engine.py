"""Engine speed vs transformers, side by side in one run, against this machine's physical limits.

    python -m pdcluster.bench.engine [--repeats 3] [--batches 1 8 32] [--out bench/engine.json]

Measures (float32 by default, same weights for both engines):
  decode   output tokens/s at each batch size (128-token prompts, 128 new tokens, EOS ignored),
           ours (LLM.generate) vs transformers' generate(do_sample=False)
  prefill  prompt tokens/s (8 prompts x 512 tokens, 1 new token) for both
  limits   decode: the workload's ceiling on this machine: its prompts' prefill at the matmul limit,
           then each step at max(weight bytes / measured read bandwidth,
           2 x params x batch / measured matmul FLOP rate);
           prefill: 2 x params x tokens / measured matmul FLOP rate.
           limit/hf is the most any engine could beat transformers by in this run.
Runs are interleaved (ours, theirs, ours, ...) and the median of --repeats is reported, so machine
drift hits both sides alike; only the ratios are meant to be compared across runs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def copy_bandwidth(nbytes: int = 256 * 2**20, reps: int = 5) -> float:
    """Bytes/s moved by a large tensor copy (read + write counted)."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def read_bandwidth(nbytes: int = 512 * 2**20, reps: int = 5) -> float:
    """Bytes/s read by a reduction over a large tensor (what a decode step does to the weights)."""
    x = torch.ones(nbytes // 4)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def matmul_flops(m: int = 2048, k: int = 576, n: int = 3072, reps: int = 5) -> float:
    """FLOP/s of a prefill-shaped fp32 matmul ([m, k] x [k, n])."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best


def build_hf(llm, dtype):
    """transformers' LlamaForCausalLM holding exactly our weights (no second GGUF dequantization)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pdcluster.engine.loader import load_weights
    c = llm.engine.cfg.model
    hc = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                     num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                     num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
                     rope_theta=c.rope_theta, max_position_embeddings=c.max_position_embeddings,
                     tie_word_embeddings=c.tie_word_embeddings, attention_bias=c.attention_bias,
                     bos_token_id=c.bos_token_id, eos_token_id=list(c.eos_token_ids) or None)
    hf = LlamaForCausalLM(hc).to(dtype).eval()
    hf.load_state_dict(load_weights(c, dtype), strict=False)
    if c.tie_word_embeddings:
        hf.tie_weights()
    return hf


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder or .gguf (default: embedded SmolLM2-135M)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prefill-seqs", type=int, default=8)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default=None, help="write the results as JSON")
    a = ap.parse_args(argv)

    from pdcluster.engine import LLM, SamplingParams
    if a.threads:
        torch.set_num_threads(a.threads)
    dt = getattr(torch, a.dtype)
    llm = LLM(a.model, dtype=a.dtype, max_num_seqs=max(a.batches + [a.prefill_seqs]),
              max_num_batched_tokens=max(2048, a.prefill_seqs * a.prefill_len), enable_prefix_caching=False)
    hf = build_hf(llm, dt)
    c = llm.engine.cfg.model
    V = c.vocab_size
    layer_params = sum(t.numel() for L in llm.engine.model.layers
                       for t in (L.qkv.weight, L.o.weight, L.gate_up.weight, L.down.weight))
    head_params = llm.engine.model.lm_head.weight.numel()
    weight_bytes = (layer_params + head_params) * dt.itemsize      # read once per decode step
    bw, rbw, flops = copy_bandwidth(), read_bandwidth(), matmul_flops()
    g = torch.Generator().manual_seed(0)

    def prompts(n, length):
        return torch.randint(100, V - 100, (n, length), generator=g).tolist()

    def ours_decode(b):
        ps = prompts(b, a.prompt_len)
        t = time.perf_counter()
        outs = llm.generate(ps, SamplingParams(max_tokens=a.new_tokens, temperature=0, ignore_eos=True))
        dt_ = time.perf_counter() - t
        return sum(len(o.token_ids) for o in outs) / dt_

    @torch.inference_mode()
    def hf_decode(b):
        ids = torch.tensor(prompts(b, a.prompt_len))
        t = time.perf_counter()
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.new_tokens,
                          min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0)
        dt_ = time.perf_counter() - t
        return (out.shape[1] - ids.shape[1]) * b / dt_

    def ours_prefill():
        ps = prompts(a.prefill_seqs, a.prefill_len)
        t = time.perf_counter()
        llm.generate(ps, SamplingParams(max_tokens=1, temperature=0))
        return a.prefill_seqs * a.prefill_len / (time.perf_counter() - t)

    @torch.inference_mode()
    def hf_prefill():
        ids = torch.tensor(prompts(a.prefill_seqs, a.prefill_len))
        t = time.perf_counter()
        hf(ids, logits_to_keep=1)
        return ids.numel() / (time.perf_counter() - t)

    rows = []
    ours_decode(1), hf_decode(1)      # warm-up both
    for b in a.batches:
        o, h = [], []
        for _ in range(a.repeats):
            o.append(ours_decode(b))
            h.append(hf_decode(b))
        # tokens/s ceiling: prefill the b prompts at the matmul rate, then each step reads every
        # weight once and does its FLOPs at the matmul rate, whichever takes longer
        prefill_s = b * a.prompt_len * 2 * layer_params / flops
        step_s = max(weight_bytes / rbw, 2 * (layer_params + head_params) * b / flops)
        limit = b * a.new_tokens / (prefill_s + a.new_tokens * step_s)
        rows.append(dict(kind=f"decode b={b}", ours=statistics.median(o), hf=statistics.median(h), limit=limit))
    o, h = [], []
    for _ in range(a.repeats):
        o.append(ours_prefill())
        h.append(hf_prefill())
    rows.append(dict(kind=f"prefill {a.prefill_seqs}x{a.prefill_len}", ours=statistics.median(o),
                     hf=statistics.median(h), limit=flops / (2 * layer_params)))

    print(f"\nmachine: {torch.get_num_threads()} torch threads, copy bandwidth {bw / 1e9:.1f} GB/s, "
          f"read bandwidth {rbw / 1e9:.1f} GB/s, "
          f"matmul {flops / 1e9:.1f} GFLOP/s; {a.dtype}; weights {weight_bytes / 2**20:.0f} MiB/step")
    print(f"{'workload':<18}{'ours tok/s':>12}{'hf tok/s':>12}{'ours/hf':>10}{'limit tok/s':>13}{'ours/limit':>12}"
          f"{'limit/hf':>10}")
    for r in rows:
        r["ratio"] = r["ours"] / r["hf"]
        r["of_limit"] = r["ours"] / r["limit"]
        print(f"{r['kind']:<18}{r['ours']:>12.1f}{r['hf']:>12.1f}{r['ratio']:>9.2f}x{r['limit']:>13.1f}"
              f"{r['of_limit']:>11.0%}{r['limit'] / r['hf']:>9.2f}x")
    if a.out:
        Path(a.out).write_text(json.dumps(dict(copy_bandwidth=bw, read_bandwidth=rbw, matmul_flops=flops,
                                               dtype=a.dtype,
                                               rows=rows), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
