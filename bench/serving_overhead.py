"""What the serving path adds to the engine's own decode step: TPOT of `pdcluster serve` against the step.

    python -m pdcluster.bench.serving_overhead [--setups disagg local] [--concurrency 1 4 16]
        [--variant old=/tmp/pkg-old --variant new=] [--rounds 3] [--out result.json]

Per setup, every variant gets its `pdcluster serve` (disagg: 1 prefill + 1 decode worker, 1 thread
each; local: one worker, --local-prefill --threads-per-worker 2) and an engine process (LLMEngine
alone, the decode worker's torch threads). Then, per concurrency level and round, variant after
variant: one engine probe (batch 1, a 128-token prompt, 64 tokens; --probe worker: the engine as a
worker runs it, on its own thread with OpenMP threads sleeping at barriers; --probe bench: as
bench/engine.py runs it, on the main thread with libgomp's spinning default: ms per decode step,
the floor for TPOT at concurrency 1) and one batch of
the issue's workload through the server (128 random prompt tokens, 64 output tokens, greedy, EOS
ignored, streamed; --num-prompts per batch, at least the concurrency). Alternating this finely puts
the host's drift (other jobs) on every side alike; only one of them runs at a time.

Columns: `engine` the probe's ms/step; `worker` the serving decode worker's busy ms per engine step
over the batch (the router's /metrics; the local setup's prefill steps included); TPOT (vLLM's:
(e2e - ttft) / (tokens - 1)); TPOT/engine; out tok/s; CPU ms per output token of the server by
process kind (the router, the decode and prefill worker actors, Ray's other processes) and of
this client. A variant is a directory put first on PYTHONPATH (holding a `pdcluster` package, e.g.
an older revision's tree; empty: the installed one). The summary gives medians over rounds and
each variant against the first.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass

SETUPS = {  # serve flags, and the decode worker's torch threads
    "disagg": (["--prefill-workers", "1", "--decode-workers", "1", "--threads-per-worker", "1"], 1),
    "local": (["--local-prefill", "--decode-workers", "1", "--threads-per-worker", "2"], 2),
}
KV_MIB = 128            # KV cache per worker: the workload needs a few MiB, the host's memory is shared
SERVE_START_S = 900.0   # a loaded 2-core host takes minutes to load two workers
CLK = os.sysconf("SC_CLK_TCK")
CPU_KINDS = ("router", "decode", "prefill", "ray")


@dataclass
class Row:
    setup: str
    variant: str
    concurrency: int
    round: int
    engine_ms: float            # the engine probe: ms per decode step, batch 1, the worker's threads
    worker_ms: float            # the serving decode worker's busy ms per step during the batch
    mean_tpot_ms: float
    median_tpot_ms: float
    cpu_ms_per_tok: dict[str, float]    # CPU ms per output token: router, decode, prefill, ray, client
    output_tok_s: float
    failed: int

    @property
    def tpot_over_engine(self) -> float:
        return self.mean_tpot_ms / self.engine_ms


# the engine probe (its own process: its own torch threads, the variant's code)
PROBES = {   # how the engine probe runs: where its torch work runs, and OpenMP's wait policy
    "worker": ("thread", {"OMP_WAIT_POLICY": "PASSIVE"}),  # as a worker runs its engine (pdcluster/worker_actor.py)
    "bench": ("main", {}),                                 # as bench/engine.py does: libgomp's default, spinning
}


def engine_probe_loop(threads: int, prompt_len: int, output_len: int, mode: str = "main") -> None:
    """Per line on stdin, one request alone in a fresh LLMEngine; prints `STEP_MS <mean decode step>`.
    mode "main": all on the main thread, as bench/engine.py does; "thread": built, warmed up and
    stepped on one other thread, as a worker's engine thread does (engine/engine_thread.py)."""
    import random
    import threading

    import torch

    from pdcluster.engine.llm_engine import LLMEngine, build_config
    from pdcluster.engine.sampling_params import SamplingParams

    def probes() -> None:
        torch.set_num_threads(threads)
        engine = LLMEngine(build_config(num_threads=threads, enable_prefix_caching=False,
                                        kv_cache_memory=KV_MIB * 2**20))
        engine.warmup()
        rng = random.Random(0)
        print("READY", flush=True)
        for _ in sys.stdin:
            engine.add_request([rng.randrange(engine.cfg.model.vocab_size) for _ in range(prompt_len)],
                               SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True),
                               detokenize=False)
            steps = []
            while engine.has_work():
                t = time.perf_counter()
                engine.step()
                steps.append(time.perf_counter() - t)
            print(f"STEP_MS {statistics.mean(steps[1:]) * 1e3}", flush=True)     # steps[0] is the prefill
    if mode == "thread":
        t = threading.Thread(target=probes, name="engine")
        t.start()
        t.join()
    else:
        probes()


def _env(variant_dir: str) -> dict:
    env = dict(os.environ)
    if variant_dir:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (variant_dir, env.get("PYTHONPATH")) if p)
    return env


class EngineProbe:
    def __init__(self, variant_dir: str, threads: int, a: argparse.Namespace):
        mode, omp = PROBES[a.probe]
        code = (f"from pdcluster.bench.serving_overhead import engine_probe_loop; "
                f"engine_probe_loop({threads}, {a.input_len}, {a.output_len}, {mode!r})")
        self.proc = subprocess.Popen([sys.executable, "-c", code], env=_env(variant_dir) | omp, cwd=tempfile.gettempdir(),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._expect("READY")

    def _expect(self, word: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(word):
                return line
        raise RuntimeError(f"engine probe exited ({self.proc.wait()})")

    def step_ms(self) -> float:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return float(self._expect("STEP_MS").split()[1])

    def stop(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree_cpu_s(root: int) -> dict[str, float]:
    """User + system CPU seconds of `root` (the router: `serve` runs it) and its live descendants,
    by kind: router, decode / prefill worker actors, ray (its daemons and idle workers)."""
    parent, cpu, kind = {}, {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read(64)
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        pid = int(d)
        parent[pid] = int(fields[1])
        cpu[pid] = (int(fields[11]) + int(fields[12])) / CLK
        kind[pid] = ("decode" if cmd.startswith(b"ray::DecodeActor") else
                     "prefill" if cmd.startswith(b"ray::PrefillActor") else "ray")
    kind[root] = "router"
    out = dict.fromkeys(CPU_KINDS, 0.0)
    todo = [root]
    while todo:
        p = todo.pop()
        out[kind.get(p, "ray")] += cpu.get(p, 0.0)
        todo += [c for c, pp in parent.items() if pp == p]
    return out


class Server:
    """`pdcluster serve` of a variant in its own session, on free ports; stopped with SIGINT."""

    def __init__(self, variant_dir: str, flags: list[str], log_path: str):
        self.port, self.metrics_port = _free_port(), _free_port()
        exe = os.path.join(os.path.dirname(sys.executable), "pdcluster")
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([exe, "serve", "--port", str(self.port), "--metrics-port", str(self.metrics_port),
                                      "--http-port", "0", "--kv-cache-memory", str(KV_MIB), *flags],
                                     env=_env(variant_dir), cwd=tempfile.gettempdir(), stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.log_path = log_path
        self.addr = f"127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + SERVE_START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited ({self.proc.returncode}); see {self.log_path}")
            with open(self.log_path) as f:
                if "pdcluster serving on" in f.read():
                    return
            time.sleep(1.0)
        raise RuntimeError(f"serve not ready in {SERVE_START_S:.0f}s; see {self.log_path}")

    def busy_and_steps(self, pool: str = "decode") -> tuple[float, int]:
        """The pool's workers' summed busy seconds and steps, as of the router's last status poll."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        pick = lambda name: sum(float(v) for v in re.findall(  # noqa: E731
            rf'{name}{{worker="{pool}-[^"]*"}} (\S+)', text))
        return pick("pdcluster_worker_busy_seconds_total"), int(pick("pdcluster_worker_steps_total"))

    def cpu_s(self) -> dict[str, float]:
        return _tree_cpu_s(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def _dataset(a: argparse.Namespace, seed: int, n: int, vocab: int):
    from pdcluster.bench.datasets import build_dataset
    return build_dataset(dict(dataset="random", num_prompts=n, input_len=a.input_len, output_len=a.output_len,
                              range_ratio=0.0, seed=seed, ignore_eos=True), vocab)


def serve_batch(server: Server, reqs, concurrency: int) -> dict:
    """One batch through the server: bench serve's result plus worker ms/step and CPU per token."""
    from pdcluster.bench.serve import run_benchmark
    time.sleep(1.1)                     # the router polls status every 0.5 s: let the counters settle
    busy0, steps0 = server.busy_and_steps()
    cpu0, mine0 = server.cpu_s(), time.process_time()
    res = asyncio.run(run_benchmark(server.addr, reqs, float("inf"), 1.0, concurrency, 0, None, progress=False))
    cpu1, mine1 = server.cpu_s(), time.process_time()
    time.sleep(1.1)
    busy1, steps1 = server.busy_and_steps()
    toks = max(res["total_output_tokens"], 1)
    cpu = {k: (cpu1[k] - cpu0[k]) / toks * 1e3 for k in CPU_KINDS} | {"client": (mine1 - mine0) / toks * 1e3}
    res.update(worker_ms=(busy1 - busy0) / max(steps1 - steps0, 1) * 1e3, cpu_ms_per_tok=cpu)
    return res


def measure_setup(setup: str, variants: dict[str, str], a: argparse.Namespace) -> list[Row]:
    from pdcluster.bench.serve import get_model_info
    flags, threads = SETUPS[setup]
    servers, probes, rows = {}, {}, []
    try:
        for name, path in variants.items():     # one at a time: loading is the heaviest part
            servers[name] = Server(path, flags, os.path.join(a.logs, f"serving-overhead-{setup}-{name}.log"))
            servers[name].wait_ready()
            probes[name] = EngineProbe(path, threads, a)
        vocab = asyncio.run(get_model_info(next(iter(servers.values())).addr)).vocab_size
        for name, s in servers.items():         # warm-up: connections, the first transfer
            serve_batch(s, _dataset(a, 10_000, 1, vocab), 1)
        for c in a.concurrency:
            for rnd in range(a.rounds):
                reqs = _dataset(a, a.seed + 1000 * c + rnd, max(a.num_prompts, c), vocab)  # new prompts: no hits
                for name in variants:
                    step = probes[name].step_ms()
                    res = serve_batch(servers[name], reqs, c)
                    rows.append(Row(setup, name, c, rnd, step, res["worker_ms"], res["mean_tpot_ms"],
                                    res["median_tpot_ms"], res["cpu_ms_per_tok"], res["output_throughput"],
                                    res["failed"]))
                    print_rows(rows[-1:], header=len(rows) == 1)
    finally:
        for p in probes.values():
            p.stop()
        for s in servers.values():
            s.stop()
    return rows


def _cpu(cpu: dict[str, float]) -> str:
    return " ".join(f"{cpu[k]:>6.2f}" for k in (*CPU_KINDS, "client"))


CPU_HEAD = " ".join(f"{k:>6}" for k in (*CPU_KINDS, "client"))


def print_rows(rows: list[Row], header: bool = True) -> None:
    if header:
        print(f"{'setup':<7} {'variant':<8} {'conc':>4} {'rnd':>3} {'engine':>7} {'worker':>7} {'TPOT':>7} "
              f"{'p50TPOT':>7} {'TPOT/engine':>11} {'tok/s':>6} {'fail':>4}  CPU ms/token: {CPU_HEAD}", flush=True)
    for r in rows:
        print(f"{r.setup:<7} {r.variant:<8} {r.concurrency:>4} {r.round:>3} {r.engine_ms:>7.1f} {r.worker_ms:>7.1f} "
              f"{r.mean_tpot_ms:>7.1f} {r.median_tpot_ms:>7.1f} {r.tpot_over_engine:>10.2f}x {r.output_tok_s:>6.1f} "
              f"{r.failed:>4}                {_cpu(r.cpu_ms_per_tok)}", flush=True)


def print_summary(rows: list[Row], variants: list[str]) -> None:
    """Per setup, concurrency and variant: medians over rounds; `vs` = this variant / the first."""
    base = variants[0]
    print(f"\nmedians over rounds (ms); vs = variant / {base}")
    print(f"{'setup':<7} {'conc':>4} {'variant':<8} {'engine':>7} {'worker':>7} {'TPOT':>7} {'vs':>6} "
          f"{'TPOT/engine':>11} {'tok/s':>6} {'vs':>6}  CPU ms/token: {CPU_HEAD}")
    for setup, c in sorted({(r.setup, r.concurrency) for r in rows}):
        med = {}
        for v in variants:
            rs = [r for r in rows if (r.setup, r.concurrency, r.variant) == (setup, c, v)]
            if rs:
                m = lambda f: statistics.median(f(r) for r in rs)  # noqa: E731
                med[v] = (m(lambda r: r.engine_ms), m(lambda r: r.worker_ms), m(lambda r: r.mean_tpot_ms),
                          m(lambda r: r.tpot_over_engine), m(lambda r: r.output_tok_s),
                          {k: m(lambda r: r.cpu_ms_per_tok[k]) for k in (*CPU_KINDS, "client")})
        b = med.get(base)
        for v, (eng, wrk, tpot, over, tps, cpu) in med.items():
            print(f"{setup:<7} {c:>4} {v:<8} {eng:>7.1f} {wrk:>7.1f} {tpot:>7.1f} {tpot / b[2]:>5.2f}x "
                  f"{over:>10.2f}x {tps:>6.1f} {tps / b[4]:>5.2f}x                {_cpu(cpu)}")


def main(argv: list[str] | None = None) -> int:
    from pdcluster.deploy.cli import HelpFormatter
    from pdcluster.bench.outputs import Listed
    p = argparse.ArgumentParser(prog="python -m pdcluster.bench.serving_overhead", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--setups", nargs="+", default=Listed(SETUPS), choices=list(SETUPS), help="clusters to measure")
    p.add_argument("--variant", action="append", default=None, metavar="NAME=DIR",
                   help="a code version: DIR first on PYTHONPATH (empty: the installed pdcluster); repeatable")
    p.add_argument("--probe", default="worker", choices=list(PROBES),
                   help="the engine probe runs as a worker runs its engine (its own thread, OpenMP threads "
                        "sleeping at barriers) or as bench/engine.py does (main thread, OpenMP threads spinning)")
    p.add_argument("--concurrency", type=int, nargs="+", default=Listed([1, 4, 16]), help="max requests in flight")
    p.add_argument("--rounds", type=int, default=3, help="batches per (concurrency, variant), alternating")
    p.add_argument("--num-prompts", type=int, default=4, help="requests per batch (at least the concurrency)")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (random ids)")
    p.add_argument("--output-len", type=int, default=64, help="output tokens (EOS ignored)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed")
    p.add_argument("--logs", default=tempfile.gettempdir(), help="folder for each serve's log")
    p.add_argument("--out", default=None, help="write every row as JSON")
    a = p.parse_args(argv)
    variants = dict(v.split("=", 1) for v in (a.variant or ["current="]))
    rows: list[Row] = []
    for setup in a.setups:
        rows += measure_setup(setup, variants, a)
        if a.out:
            with open(a.out, "w", encoding="utf-8") as f:
                json.dump([asdict(r) | {"tpot_over_engine": r.tpot_over_engine} for r in rows], f, indent=1)
    print_summary(rows, list(variants))
    return 0


if __name__ == "__main__":
    sys.exit(main())
