"""The engine's own decode step on CPU, per step, without transformers or the serving path.

    python -m pdcluster.bench.decode_step --mode gguf --threads 1 --batch 1

Builds one engine (speculation off, no prefix cache), prefills --batch random 128-token prompts, then
times each decode step (--steps of them) and reports the median over steps, best of --runs runs:
  CPU    the stepping thread's CPU time (time.thread_time): robust to other processes on a shared
         host when --threads is 1 (all of torch's work runs on that thread); with more threads it
         counts the stepping thread only
  wall   wall-clock time per step
To compare two revisions, run each from its own package (PYTHONPATH) alternately (bench/RESULTS.md,
"Decode step on CPU"). --profile adds a torch.profiler table over 10 decode steps.
--cpu-compile builds the engine with engine/cpu_compile.py's compiled decode layer and alternates, run by
run in this process, eager steps and compiled ones (the same engine, the layer switched off and on),
printing each side and their ratio (eager / compiled per pair of runs; > 1: compiled is faster).
--int8-rows N builds a second engine with cpu_int8_rows=N and alternates runs of the two: the packed
kernels at every row count against the linears' int8 copies from N rows on (engine/quant/int8_rows.py),
each with or without --cpu-compile.
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
    ap.add_argument("--model", default=None, help="HF folder or .gguf (default: embedded SmolLM2-135M)")
    ap.add_argument("--mode", default="gguf", choices=["gguf", "none", "int8", "int4"],
                    help="--quantization; gguf = unset (a GGUF file's own blocks stay packed)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="activations and float weights (bfloat16 runs oneDNN's AMX/AVX-512 bf16 GEMMs where the CPU has them)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--batch", type=int, default=1, help="decode rows per step (128-token prompts)")
    ap.add_argument("--steps", type=int, default=48, help="decode steps timed per run (median)")
    ap.add_argument("--runs", type=int, default=3, help="runs (best reported; A/B sides alternate)")
    ap.add_argument("--profile", action="store_true", help="a torch.profiler table over 10 decode steps")
    ap.add_argument("--cpu-compile", action="store_true", help="A/B: eager vs the compiled decode layer")
    ap.add_argument("--int8-rows", type=int, default=0,
                    help="A/B: packed kernels vs the linears' int8 copies from this many rows (a second engine "
                         "with cpu_int8_rows; 0 = no A/B)")
    a = ap.parse_args(argv)
    from pdcluster.engine import LLM, SamplingParams

    torch.set_num_threads(a.threads)
    t = time.perf_counter()
    llm = LLM(a.model, quantization=None if a.mode == "gguf" else a.mode, max_num_seqs=max(64, a.batch),
              enable_prefix_caching=False, speculative="off", cpu_compile=a.cpu_compile, dtype=a.dtype)
    model = llm.engine.model
    if a.cpu_compile:
        print(f"engine start with the compiled layer: {time.perf_counter() - t:.1f} s "
              f"({'built' if model.compiled is not None else 'NOT built: eager only'})")
    eng, g = llm.engine, torch.Generator().manual_seed(0)
    V = eng.cfg.model.vocab_size

    def once(steps, prof=None) -> tuple[float, float]:
        for p in torch.randint(100, V - 100, (a.batch, 128), generator=g).tolist():
            eng.add_request(p, SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True))
        eng.step()                                          # the prefill
        cpu, wall = [], []
        while eng.has_work():
            c, w = time.thread_time(), time.perf_counter()
            eng.step()
            cpu.append(time.thread_time() - c)
            wall.append(time.perf_counter() - w)
            if prof is not None:
                prof.step()
        return statistics.median(cpu), statistics.median(wall)

    def report(label, res):
        print(f"{a.mode} {a.dtype} threads={a.threads} batch={a.batch}{label}: step CPU {min(r[0] for r in res) * 1e3:.2f} ms, "
              f"wall {min(r[1] for r in res) * 1e3:.2f} ms (median over {a.steps} steps, best of {a.runs} runs; "
              f"load average {os.getloadavg()[0]:.2f})")

    def alternate(a_name, b_name, switch):
        """Runs alternated between two setups (switch(name) selects one); each side and their ratio."""
        sides = {a_name: [], b_name: []}
        for _ in range(a.runs):
            for side in sides:
                switch(side)
                sides[side].append(once(a.steps))
        for side, res in sides.items():
            report(f" {side}", res)
        pairs = [(x[0] / y[0], x[1] / y[1]) for x, y in zip(sides[a_name], sides[b_name])]
        print(f"{a_name} / {b_name} per run pair: CPU " + " ".join(f"{p[0]:.2f}x" for p in pairs)
              + ", wall " + " ".join(f"{p[1]:.2f}x" for p in pairs))

    compiled = model.compiled
    once(8)                                                 # warm-up
    if a.int8_rows:
        wide = LLM(a.model, quantization=None if a.mode == "gguf" else a.mode, max_num_seqs=max(64, a.batch),
                   enable_prefix_caching=False, speculative="off", cpu_compile=a.cpu_compile, dtype=a.dtype,
                   cpu_int8_rows=a.int8_rows)
        engines = {"packed": eng, "int8": wide.engine}
        eng = wide.engine
        once(8)                                             # its warm-up

        def use(side):
            nonlocal eng
            eng = engines[side]
        alternate("packed", "int8", use)
    elif compiled is None:
        report("", [once(a.steps) for _ in range(a.runs)])
    else:
        alternate("eager", "compiled", lambda side: setattr(model, "compiled", compiled if side == "compiled" else None))
    if a.profile:
        from torch.profiler import ProfilerActivity, profile, schedule
        with profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=2, warmup=2, active=10, repeat=1)) as p:
            once(16, p)
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return 0


if __name__ == "__main__":
    sys.exit(main())
