"""The compiled CPU decode layer with inductor's own kernels parallel or serial, against eager, in one process.

    OMP_WAIT_POLICY=PASSIVE python -m pdcluster.bench.compiled_threads --threads 2 --batch 1

engine/cpu_compile.py generates the layer's inductor kernels (norms, rotary, KV store and gather, silu * mul,
residuals) serial (KERNEL_THREADS = 1): each is an OpenMP region otherwise, a barrier per kernel. This
builds one engine (the embedded GGUF, int4 linears), compiles the layer with parallel kernels too (kept in
PDCLUSTER_AOTI_CACHE as compiled_threads_par_T<threads>.pt2), and alternates eager, `par` and `ser`
run by run: median decode-step wall ms per run, and par / ser per round (> 1: serial is faster).
Set OMP_WAIT_POLICY=PASSIVE to step as the workers do (pdcluster/worker_actor.py).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def main(argv=None) -> int:
    from pdcluster.deploy.cli import HelpFormatter
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--batch", type=int, default=1, help="decode rows per step")
    ap.add_argument("--prompt-len", type=int, default=128, help="tokens per prompt")
    ap.add_argument("--steps", type=int, default=24, help="decode steps timed per run")
    ap.add_argument("--runs", type=int, default=5, help="runs per side (alternated)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from pdcluster.engine import LLM, SamplingParams
    from pdcluster.engine import cpu_compile as cc

    llm = LLM(None, max_num_seqs=max(64, a.batch), enable_prefix_caching=False, speculative="off", cpu_compile=True)
    eng, model = llm.engine, llm.engine.model
    built = model.compiled
    if built is None:
        print("the compiled layer was not built: nothing to compare")
        return 1
    c, L0 = model.cfg, model.layers[0]
    got = [cc.linear_spec(lin) for lin in (L0.qkv, L0.o, L0.gate_up, L0.down)]
    layer = cc.DecodeLayer(tuple(g[0] for g in got), tuple(len(g[1]) for g in got), c.num_heads, c.num_kv_heads,
                           c.head_dim, c.rms_norm_eps, model.scale)
    path = os.path.join(cc.cache_dir(), f"compiled_threads_par_T{a.threads}.pt2")
    if not os.path.exists(path):                           # the engine's own package is the serial one
        t, saved = time.perf_counter(), cc.KERNEL_THREADS
        cc.KERNEL_THREADS = -1                             # inductor: torch's threads
        try:
            cc._compile(layer, model, eng.runner.k_caches[0], built.layer_args[0], built.block_size, path)
        finally:
            cc.KERNEL_THREADS = saved
        print(f"compiled the parallel-kernel layer in {time.perf_counter() - t:.1f} s")
    sides = {"eager": None, "par": cc.CompiledDecode(cc._load(path), built.layer_args, built.block_size), "ser": built}

    g, V = torch.Generator().manual_seed(0), eng.cfg.model.vocab_size

    def once(steps: int) -> float:
        for p in torch.randint(100, V - 100, (a.batch, a.prompt_len), generator=g).tolist():
            eng.add_request(p, SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True))
        eng.step()                                          # the prefill
        wall = []
        while eng.has_work():
            t = time.perf_counter()
            eng.step()
            wall.append(time.perf_counter() - t)
        return statistics.median(wall) * 1e3

    once(4)                                                 # warm-up
    res = {k: [] for k in sides}
    for r in range(a.runs):
        for k, comp in sides.items():
            model.compiled = comp
            res[k].append(once(a.steps))
        print(f"run {r}: " + "  ".join(f"{k} {v[-1]:.2f} ms" for k, v in res.items())
              + f"  (load average {os.getloadavg()[0]:.1f})")
    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"threads={a.threads} batch={a.batch} prompt={a.prompt_len}: median step "
          + "  ".join(f"{k} {v:.2f} ms" for k, v in med.items())
          + "; par / ser per round " + " ".join(f"{p / s:.2f}x" for p, s in zip(res["par"], res["ser"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
