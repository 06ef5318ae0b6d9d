"""The engine on CUDA with its Triton kernels compiled: greedy tokens against Hugging Face transformers
on the same weights, per engine mode, and decode throughput beside transformers.

The embedded GGUF (98 MB) does not travel to a GPU host in the device tool's 64 MiB, so the model is
SmolLM2-135M's architecture with seeded random weights, its LM head scaled so that logits are peaked
(a flat random model would tie at every step and prove nothing), saved as a Hugging Face folder with
the SmolLM2 tokenizer (--tokenizer). Both engines load that folder.

Checks (each prints a row; any failure makes the exit status 1):
- float32 without speculation (decode steps replayed as CUDA graphs, the default), then each of: every
  step eager (--enforce-eager), int8 KV cache, int8 / int4 weights (Triton w8a16 / w4a16), n-gram
  speculation (on, the rest off):
  greedy tokens of 8 prompts (a shared prefix, one past a 2048-token chunk) under the top-5 rule
  against transformers in float32 (our token in its top-5 at every step where they differ, and the
  first divergence ends the comparison of that sequence; speculation and the eager run must equal the
  plain run);
- bfloat16 decode throughput at batch 1 and 32, with CUDA graphs and eager (speculation off in both),
  beside transformers' generate (same prompts, 128 new tokens, EOS ignored).

Needs an NVIDIA GPU. `python -m pdcluster.bench.gpu_engine --tokenizer DIR [--out result.json]`
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

DEV = "cuda"


def sync() -> None:
    import torch
    if DEV == "cuda":
        torch.cuda.synchronize()


SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
               rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


def make_model(path: str, tokenizer_dir: str, seed: int, logit_scale: float) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    m = LlamaForCausalLM(LlamaConfig(**SMOLLM2, torch_dtype="float32"))
    with torch.no_grad():
        m.model.embed_tokens.weight.mul_(logit_scale)     # tied: the head's logits scale with it
    m.save_pretrained(path, safe_serialization=True)
    for f in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, f), path)


def prompts(seed: int) -> list[list[int]]:
    import torch
    g = torch.Generator().manual_seed(seed)
    r = lambda n: torch.randint(100, 49000, (n,), generator=g).tolist()  # noqa: E731
    base = r(200)
    return [r(5), r(37), base + r(20), base + r(9), r(2100), r(300), r(64), base[:160] + r(3)]


def hf_reference(path: str, ps: list[list[int]], n: int):
    """Greedy tokens and each step's top-5, float32 on CUDA, one prompt at a time (no padding)."""
    import torch
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).to(DEV).eval()
    out = []
    for p in ps:
        with torch.no_grad():
            g = m.generate(torch.tensor([p], device=DEV), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                           output_scores=True, return_dict_in_generate=True, pad_token_id=0)
        toks = g.sequences[0, len(p):].tolist()
        top5 = [s[0].topk(5).indices.tolist() for s in g.scores]
        out.append((toks, top5))
    del m
    sync()
    return out


def top5_rule(ours: list[int], ref: tuple[list[int], list[list[int]]]) -> tuple[bool, int]:
    """(within the rule, exact-prefix length): equal tokens, or at the first difference ours is in
    the reference's top-5 there (after which the sequences condition on different text)."""
    toks, top5 = ref
    for i, (a, b) in enumerate(zip(ours, toks)):
        if a != b:
            return a in top5[i], i
    return len(ours) == len(toks), len(ours)


def run_ours(path: str, ps, n: int, **knobs):
    from pdcluster.engine import LLM, SamplingParams
    llm = LLM(path, device=DEV, max_model_len=4096, kv_cache_memory=2 * 2**30, **knobs)
    assert llm.engine.runner.model.triton or DEV == "cpu", "the engine did not select its Triton kernels on CUDA"
    outs = llm.generate(ps, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    return [o.token_ids for o in outs], llm


def ours_tok_s(path: str, ps: list[list[int]], n: int, graphs: bool) -> tuple[float, int]:
    """(output tokens/s of one generate call after a warm-up, steps replayed as graphs)."""
    from pdcluster.engine import LLM, SamplingParams
    llm = LLM(path, device=DEV, dtype="bfloat16", max_model_len=4096, kv_cache_memory=4 * 2**30,
              speculative="off", cuda_graphs=graphs)
    llm.generate(ps[:2], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    sync()
    t = time.perf_counter()
    llm.generate(ps, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    sync()
    tok_s = len(ps) * n / (time.perf_counter() - t)
    g = llm.engine.runner.graphs
    replays = g.replays if g is not None else 0
    del llm
    return tok_s, replays


def throughput(path: str, batch: int, n: int, seed: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(seed)
    ps = [torch.randint(100, 49000, (128,), generator=g).tolist() for _ in range(batch)]
    ours, replays = ours_tok_s(path, ps, n, graphs=DEV == "cuda")
    eager, _ = ours_tok_s(path, ps, n, graphs=False)
    m = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16).to(DEV).eval()
    ids = torch.tensor(ps, device=DEV)
    with torch.no_grad():
        m.generate(ids[:1], max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        sync()
        t = time.perf_counter()
        m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        sync()
    hf = batch * n / (time.perf_counter() - t)
    del m
    sync()
    return dict(batch=batch, ours_tok_s=round(ours, 1), graph_replays=replays, eager_tok_s=round(eager, 1),
                hf_tok_s=round(hf, 1), ratio=round(ours / hf, 2), graphs_vs_eager=round(ours / eager, 2))


def main(argv=None) -> int:
    from pdcluster.deploy.cli import HelpFormatter
    from pdcluster.bench.outputs import Listed
    ap = argparse.ArgumentParser(prog="python -m pdcluster.bench.gpu_engine", description=__doc__.split("\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="folder with SmolLM2's tokenizer.json and its config")
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy tokens compared per prompt")
    ap.add_argument("--seed", type=int, default=0, help="seeds the random model's weights and the prompts")
    ap.add_argument("--logit-scale", type=float, default=40.0, help="random embedding/head scale (peaked logits)")
    ap.add_argument("--modes", nargs="*",
                    default=Listed(["float32", "eager", "kv-int8", "w8a16", "w4a16", "spec-ngram"]),
                    help="engine configurations to run, one row each")
    ap.add_argument("--out", default=None, help="write the rows as JSON here too")
    ap.add_argument("--cpu-smoke", action="store_true", help="check the script's plumbing on CPU (torch path, "
                    "2 layers, short runs); its figures mean nothing")
    a = ap.parse_args(argv)
    import torch
    global DEV
    if a.cpu_smoke:
        DEV = "cpu"
        SMOLLM2["num_hidden_layers"] = 2
    elif not torch.cuda.is_available():
        print("pdcluster.bench.gpu_engine needs an NVIDIA GPU", file=sys.stderr)
        return 2
    rows, ok = [], True
    with tempfile.TemporaryDirectory() as path:
        make_model(path, a.tokenizer, a.seed, a.logit_scale)
        ps = prompts(a.seed + 1)
        ref = hf_reference(path, ps, a.new_tokens)
        off = dict(speculative="off")       # every mode but spec-ngram without drafts: one thing changes at a time
        knobs = {"float32": off, "eager": off | dict(cuda_graphs=False), "kv-int8": off | dict(kv_cache_dtype="int8"), "w8a16": off | dict(quantization="int8"),
                 "w4a16": off | dict(quantization="int4"), "spec-ngram": dict(speculative="ngram")}
        plain = None
        for mode in a.modes:
            try:
                toks, llm = run_ours(path, ps, a.new_tokens, **knobs[mode])
                g = llm.engine.runner.graphs
                replays = g.replays if g is not None else 0
                del llm, g
                sync()
            except Exception as e:          # a mode this build lacks, or a crash: a failed row
                rows.append(dict(mode=mode, ok=False, error=f"{type(e).__name__}: {e}"[:300]))
                ok = False
                print(rows[-1], flush=True)
                continue
            checks = [top5_rule(t, r) for t, r in zip(toks, ref)]
            exact = sum(p == a.new_tokens for _, p in checks)
            row = dict(mode=mode, ok=all(c for c, _ in checks), exact=f"{exact}/{len(ps)}",
                       first_divergence=[p for _, p in checks], graph_replays=replays)
            if mode == "float32" and DEV == "cuda" and not replays:
                row["ok"], row["error"] = False, "no decode step was replayed as a CUDA graph"

            if mode == "float32":
                plain = toks
            if mode in ("spec-ngram", "eager") and plain is not None:
                row["equals_plain"] = toks == plain
                row["ok"] = row["ok"] and row["equals_plain"]
            ok &= row["ok"]
            rows.append(row)
            print(row, flush=True)
        for b in ((1, 2) if a.cpu_smoke else (1, 32)):
            try:
                rows.append(dict(mode="bf16-throughput", **throughput(path, b, 4 if a.cpu_smoke else 128, a.seed + 2)))
            except Exception as e:
                rows.append(dict(mode="bf16-throughput", batch=b, ok=False, error=f"{type(e).__name__}: {e}"[:300]))
                ok = False
            print(rows[-1], flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu", torch=torch.__version__,
                           rows=rows), f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
