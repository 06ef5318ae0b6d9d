"""Engine speed vs transformers, side by side in one run, against this machine's physical limits.

    python -m pdcluster.bench.engine [--repeats 3] [--batches 1 8 32] [--modes none int4 int8]
                                     [--out bench/engine.json]

Measures (float32 activations by default; transformers runs the checkpoint's float weights, as
dequantized by our loader; ours once per --modes entry: "none" the same float weights, "int4" /
"int8" weight-only packed linears and an int8 head, engine/quant/):
  decode   output tokens/s at each batch size (128-token prompts, 128 new tokens, EOS ignored),
           ours (LLM.generate) vs transformers' generate(do_sample=False); with --hf-prompt-lookup N,
           transformers drafts by prompt lookup at batch 1 (row "decode b=1 hf-pld"): compare with ours
           under --speculative ngram, both speculating from n-grams of the text so far
  prefill  prompt tokens/s (8 prompts x 512 tokens, 1 new token) for both
  limits   decode: the workload's ceiling on this machine: its prompts' prefill at the matmul limit,
           then each step at max(weight bytes read in the mode's form / measured read bandwidth,
           2 x params x batch / measured float32 matmul FLOP rate);
           prefill: 2 x params x tokens / measured matmul FLOP rate.
           limit/hf is the most any engine could beat transformers by in this run.
Also printed per mode: weight bytes read per decode step and resident (every copy), load time, and
the error the Q8_0 -> per-row int8 requantization adds to a GGUF's Q8_0 tensors.
Runs are interleaved (each mode of ours, then theirs, ...) and the median of --repeats is reported,
so machine drift hits both sides alike; only the ratios are meant to be compared across runs.
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
from pdcluster.deploy.cli import HelpFormatter  # noqa: E402
from pdcluster.bench.outputs import Listed  # noqa: E402


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


def step_bytes(model) -> tuple[int, int]:
    """(weight bytes one decode step reads, parameters of the linears and head): one copy of each
    weight in the form its kernel reads."""
    from pdcluster.engine.llama import Linear
    from pdcluster.engine.quant.cpu_linear import Dyn8Linear

    read = params = 0
    for lin in [x for L in model.layers for x in (L.qkv, L.o, L.gate_up, L.down)] + [model.lm_head]:
        lin = getattr(lin, "inner", lin)         # an int8 copy's (int8_rows.py): batch 1 reads the packed one
        if isinstance(lin, Linear):
            read += lin.weight.numel() * lin.weight.element_size()
            params += lin.weight.numel()
        elif isinstance(lin, Dyn8Linear):        # its codes are held 2-3 times (fbgemm's, oneDNN's); a step reads one
            read += lin.N * lin.K + 4 * lin.scale.numel()
            params += lin.N * lin.K
        else:
            read += lin.nbytes
            params += lin.N * lin.K if hasattr(lin, "N") else lin.q.numel()
    return read, params


def q8_0_requant_error(path: str | None) -> str:
    """The Q8_0 -> per-row int8 requantization's error on the file's Q8_0 tensors (engine/quant/gguf_blocks.py)."""
    from gguf import GGMLQuantizationType

    from pdcluster.engine.gguf_loader import _reader
    from pdcluster.engine.loader import embedded_model_path
    from pdcluster.engine.quant.gguf_blocks import dequantize_tensor, to_packed
    from pdcluster.engine.quant.packed import dequantize

    path = path or embedded_model_path()
    if not path.endswith(".gguf"):
        return ""
    out = []
    for t in _reader(path).tensors:
        if t.tensor_type == GGMLQuantizationType.Q8_0:
            shape = tuple(reversed(t.shape.tolist()))
            exact = dequantize_tensor(t.data, t.tensor_type, shape).double()
            err = dequantize(to_packed(t.data, t.tensor_type, shape, "int8")).double() - exact
            out.append(f"{t.name}: Q8_0 -> per-row int8 adds relative RMS error {err.norm() / exact.norm():.2e}, "
                       f"max |error| {err.abs().max():.2e} (max |w| {exact.abs().max():.2f})")
    return "\n".join(out)


MODES = {"none": "f32", "int4": "int4", "int8": "int8"}   # --quantization -> row label


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder or .gguf (default: embedded SmolLM2-135M)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="activations (both engines)")
    ap.add_argument("--modes", nargs="+", default=Listed(["none", "int4", "int8"]), choices=list(MODES),
                    help="our engine's --quantization, one row each (GGUF int4: its Q4 weights as they are)")
    ap.add_argument("--batches", type=int, nargs="+", default=Listed([1, 8, 32]),
                    help="decode batch sizes, one row each")
    ap.add_argument("--prompt-len", type=int, default=128, help="decode rows' prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=128, help="decode rows' output tokens (EOS ignored)")
    ap.add_argument("--prefill-seqs", type=int, default=8, help="prompts in the prefill row")
    ap.add_argument("--prefill-len", type=int, default=512, help="tokens per prefill-row prompt")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs per row (median reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--cpu-compile", action="store_true",
                    help="our decode steps through the compiled layer (engine/cpu_compile.py; a first start compiles)")
    ap.add_argument("--cpu-int8-rows", type=int, default=0,
                    help="our int4 steps of >= this many rows on the linears' int8 copies (engine/quant/int8_rows.py); "
                         "0 = off")
    ap.add_argument("--speculative", default=None, choices=["ngram", "off"],
                    help="our speculative decoding (default: the engine's; n-gram drafts can accept many tokens "
                         "on the repetitive greedy outputs of random prompts)")
    ap.add_argument("--hf-prompt-lookup", type=int, default=0,
                    help="transformers' own n-gram speculation at batch 1 (generate's prompt_lookup_num_tokens, "
                         "drafts of up to this many tokens; it supports batch 1 only): the like-for-like side for "
                         "--speculative ngram; 0 = off")
    ap.add_argument("--out", default=None, help="write the results as JSON")
    a = ap.parse_args(argv)

    from pdcluster.engine import LLM, SamplingParams
    if a.threads:
        torch.set_num_threads(a.threads)
    dt = getattr(torch, a.dtype)
    llms, info = {}, {}
    for mode in a.modes:
        t = time.perf_counter()
        extra = {} if a.speculative is None else {"speculative": a.speculative}
        llms[mode] = LLM(a.model, dtype=a.dtype, quantization=mode, max_num_seqs=max(a.batches + [a.prefill_seqs]),
                         max_num_batched_tokens=max(2048, a.prefill_seqs * a.prefill_len), enable_prefix_caching=False,
                         cpu_compile=a.cpu_compile, cpu_int8_rows=a.cpu_int8_rows, **extra)
        m = llms[mode].engine.model
        read, params = step_bytes(m)
        info[mode] = dict(load_s=time.perf_counter() - t, resident=m.weight_bytes(), read=read, params=params)
    first = llms[a.modes[0]]
    hf = build_hf(first, dt)          # transformers in --dtype on the checkpoint's float weights
    c = first.engine.cfg.model
    V = c.vocab_size
    bw, rbw, flops = copy_bandwidth(), read_bandwidth(), matmul_flops()
    g = torch.Generator().manual_seed(0)

    def prompts(n, length):
        return torch.randint(100, V - 100, (n, length), generator=g).tolist()

    def ours_decode(llm, b):
        ps = prompts(b, a.prompt_len)
        t = time.perf_counter()
        outs = llm.generate(ps, SamplingParams(max_tokens=a.new_tokens, temperature=0, ignore_eos=True))
        dt_ = time.perf_counter() - t
        return sum(len(o.token_ids) for o in outs) / dt_

    @torch.inference_mode()
    def hf_decode(b):
        ids = torch.tensor(prompts(b, a.prompt_len))
        t = time.perf_counter()
        lookup = {"prompt_lookup_num_tokens": a.hf_prompt_lookup} if a.hf_prompt_lookup and b == 1 else {}
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.new_tokens,
                          min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0, **lookup)
        dt_ = time.perf_counter() - t
        return (out.shape[1] - ids.shape[1]) * b / dt_

    def ours_prefill(llm):
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

    def measure(kind, ours_fn, hf_fn, limit_fn):
        """Interleaved: every mode, then transformers, --repeats times; medians."""
        o, h = {m: [] for m in a.modes}, []
        for _ in range(a.repeats):
            for m in a.modes:
                o[m].append(ours_fn(llms[m]))
            h.append(hf_fn())
        hm = statistics.median(h)
        return [dict(kind=kind, mode=MODES[m], ours=statistics.median(o[m]), hf=hm, limit=limit_fn(m)) for m in a.modes]

    def decode_limit(b):
        # tokens/s ceiling: prefill the b prompts at the matmul rate, then each step reads every weight
        # once (in its mode's form) and does its FLOPs at the float32 matmul rate, whichever is longer
        def f(m):
            layer_params = info[m]["params"] - V * c.hidden_size
            prefill_s = b * a.prompt_len * 2 * layer_params / flops
            step_s = max(info[m]["read"] / rbw, 2 * info[m]["params"] * b / flops)
            return b * a.new_tokens / (prefill_s + a.new_tokens * step_s)
        return f

    rows = []
    for m in a.modes:                 # warm-up every engine and transformers
        ours_decode(llms[m], 1)
    hf_decode(1)
    for b in a.batches:
        kind = f"decode b={b}" + (" hf-pld" if a.hf_prompt_lookup and b == 1 else "")
        rows += measure(kind, lambda llm, b=b: ours_decode(llm, b), lambda b=b: hf_decode(b), decode_limit(b))
    rows += measure(f"prefill {a.prefill_seqs}x{a.prefill_len}", ours_prefill, hf_prefill,
                    lambda m: flops / (2 * (info[m]["params"] - V * c.hidden_size)))

    print(f"\nmachine: {torch.get_num_threads()} torch threads, copy bandwidth {bw / 1e9:.1f} GB/s, "
          f"read bandwidth {rbw / 1e9:.1f} GB/s, matmul {flops / 1e9:.1f} GFLOP/s; {a.dtype} activations; "
          f"transformers in {a.dtype}")
    for m in a.modes:
        r = info[m]["resident"]
        print(f"  {MODES[m]:<5} weights read per decode step {info[m]['read'] / 2**20:6.1f} MiB; resident "
              f"{sum(r.values()) / 2**20:7.1f} MiB (linears {r['linears'] / 2**20:.1f}, head {r['head'] / 2**20:.1f}, "
              f"norms {r['other'] / 2**20:.1f}); load {info[m]['load_s']:.1f} s")
    err = q8_0_requant_error(a.model) if "none" not in a.modes or len(a.modes) > 1 else ""
    if err:
        print("  " + err.replace("\n", "\n  "))
    print(f"{'workload':<18}{'mode':<6}{'ours tok/s':>12}{'hf tok/s':>12}{'ours/hf':>10}{'limit tok/s':>13}"
          f"{'ours/limit':>12}{'limit/hf':>10}")
    for r in rows:
        r["ratio"] = r["ours"] / r["hf"]
        r["of_limit"] = r["ours"] / r["limit"]
        print(f"{r['kind']:<18}{r['mode']:<6}{r['ours']:>12.1f}{r['hf']:>12.1f}{r['ratio']:>9.2f}x{r['limit']:>13.1f}"
              f"{r['of_limit']:>11.0%}{r['limit'] / r['hf']:>9.2f}x")
    if a.out:
        Path(a.out).write_text(json.dumps(dict(copy_bandwidth=bw, read_bandwidth=rbw, matmul_flops=flops,
                                               dtype=a.dtype, modes={MODES[m]: info[m] for m in a.modes},
                                               rows=rows), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
