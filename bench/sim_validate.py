"""The simulator against the real cluster on this machine (issue 20 point 2; `pdcluster plan --validate`).

    python -m pdcluster.bench.sim_validate [--cases disagg-trace colocated prefix-routing] [--out F.json]

One run, in this order:
  1. probe: one engine in this process at a worker's thread count (--threads, default the cases'
     threads_per_worker) times prefill steps (--probe-prefill tokens) and decode steps (batches
     --probe-batches over ~--probe-ctx-token prompts); sim/validate.py fits this machine's profile
     (compute rate, read bandwidth, per-step and per-sequence overheads) to those steps only;
  2. per case: start the case's cluster here (real Ray workers, the real model, the real router),
     warm it up, send the workload (bench/serve.py's client: the same seeded prompts and send
     times as `bench scenario`), stop it; then simulate the same requests (token-level prefix
     structure, send times, output lengths) on the case's pools, policy, step budget and KV pool
     sizes with the fitted profile; compare mean and p90 TTFT and TPOT.
Cases (clusters of bench/scenarios.py, each with --speculative off: the simulator steps one token
per request; see RESULTS.md):
  disagg-trace    colocated-vs-disagg's disagg side (1 prefill + 1 decode worker, least-loaded,
                  every prompt prefilled remotely) on a slice of the Mooncake conversation trace
                  (1 conversation in 40, token_scale 1: prompts /32, outputs alike), at its own times
  colocated       colocated-vs-disagg's colocated side (2 workers that prefill and decode), its mixed
                  workload at its rate
  prefix-routing  prefix-routing's cost-model side (2 local-prefill workers of 112-block pools), its
                  shared-prefix workload (fewer prompts per group) at its rate
The load average is printed beside every run: the host is shared.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace

from pdcluster.bench.scenario import SCENARIOS, Scenario, run_once, scenario_requests
from pdcluster.bench.scenarios import PREFIX_ROUTING, trace_path
from pdcluster.sim import validate as V

COLO = SCENARIOS["colocated-vs-disagg"]


@dataclass(frozen=True)
class Case:
    name: str
    summary: str
    scenario: Scenario                  # its baseline is the cluster run; dataset, rate, warm-up


def _case(name: str, summary: str, cfg, dataset: dict, rate: float) -> Case:
    cfg = replace(cfg, engine=replace(cfg.engine, speculative="off"))
    return Case(name, summary, Scenario(name=name, summary=summary, baseline=cfg, candidate=cfg, dataset=dataset,
                                        request_rate=rate, goodput={}, metrics=()))


def cases(trace: str | None = None, max_requests: int | None = None, time_scale: float = 0.25,
          prefix_prompts: int = 6) -> dict[str, Case]:
    """The validation cases (module doc). max_requests: the trace slice's requests (default 24)."""
    trace = trace or trace_path()
    return {c.name: c for c in (
        _case("disagg-trace", "1 prefill + 1 decode worker, least-loaded, Mooncake trace slice", COLO.candidate,
              {"dataset": f"mooncake:{trace}", "token_scale": 1, "time_scale": time_scale, "start": 0,
               "max_requests": max_requests or 24, "conversation_sample": 40, "ignore_eos": True},
              float("inf")),
        _case("colocated", "2 colocated workers, least-loaded, mixed prompts 64/384 tokens", COLO.baseline,
              COLO.dataset, COLO.request_rate),
        _case("prefix-routing", "2 local-prefill workers x 112 blocks, cost-model, 8 shared prefixes",
              PREFIX_ROUTING.candidate, dict(PREFIX_ROUTING.dataset, prompts_per_group=prefix_prompts),
              PREFIX_ROUTING.request_rate),
    )}


# 1. the probe
def probe_steps(threads: int, prefill_lens=(32, 128, 384), batches=(1, 2, 4, 8), ctx: int = 96,
                decode_steps: int = 6, reps: int = 3) -> V.StepProbe:
    """Times engine.step() (scheduling, the model, sampling) on one engine of the embedded model at
    `threads` torch threads: the median of `reps` prefill steps of each length (fresh random tokens,
    no prefix hits), and the median decode step of each batch after its prompts are in."""
    import random

    import torch

    from pdcluster.engine.llm_engine import LLMEngine, build_config
    from pdcluster.engine.sampling_params import SamplingParams
    old = torch.get_num_threads()
    eng = LLMEngine(build_config(None, num_threads=threads, speculative="off", kv_cache_memory=256 * 2**20,
                                 max_num_seqs=64))
    eng.warmup()
    rng = random.Random(0)
    vocab = eng.cfg.model.vocab_size
    ids = lambda n: [rng.randrange(100, vocab - 100) for _ in range(n)]     # noqa: E731
    n_req = iter(range(10**9))

    def add(n: int, out: int):
        return eng.add_request(ids(n), SamplingParams(max_tokens=out, temperature=0.0, ignore_eos=True),
                               request_id=f"probe-{next(n_req)}", detokenize=False)

    def timed_step() -> float:
        t = time.perf_counter()
        eng.step()
        return time.perf_counter() - t
    try:
        prefill = []
        for n in prefill_lens:
            ts = []
            for _ in range(reps):
                r = add(n, 1)
                ts.append(timed_step())
                while not r.is_finished:
                    eng.step()
            prefill.append((n, statistics.median(ts)))
        decode = []
        for b in batches:
            reqs = [add(ctx, decode_steps + 2) for _ in range(b)]
            while any(r.num_output_tokens < 1 for r in reqs):
                eng.step()
            ts = [timed_step() for _ in range(decode_steps)]
            kv = sum(r.num_tokens for r in reqs)
            while not all(r.is_finished for r in reqs):
                eng.step()
            decode.append((b, kv, statistics.median(ts)))
    finally:
        del eng
        torch.set_num_threads(old)
    return V.StepProbe(threads, tuple(prefill), tuple(decode))


# 2. a case
def _arrivals(sc: Scenario, requests, seed: int) -> list[float]:
    from pdcluster.bench.serve import arrival_offsets, trace_offsets
    t = trace_offsets(requests)
    if t is None:
        t = arrival_offsets(len(requests), sc.request_rate, sc.burstiness, seed)
    return [float(x) for x in t]


def simulate(case: Case, requests, arrivals: list[float], probe: V.StepProbe):
    """The simulator's result for the case's workload on its cluster with the probe's fitted profile."""
    from pdcluster.bench.scenarios import KV_BYTES_PER_TOKEN
    from pdcluster.sim.cluster import Simulator
    cfg = case.scenario.baseline
    bs = cfg.engine.cache.block_size
    prof = V.fit_profile(probe, kv_blocks=V.kv_blocks_of(cfg, bs * KV_BYTES_PER_TOKEN), block_size=bs)
    reqs = V.sim_requests([r.prompt_ids for r in requests], [r.output_len for r in requests], arrivals, bs)
    return Simulator(V.sim_config(cfg, prof), reqs).run()


async def _measure(case: Case, requests, seed: int, vocab: int, progress: bool) -> tuple[dict, dict]:
    return await run_once(case.scenario.baseline, case.scenario, requests, seed, vocab, None, progress)


def run_case(case: Case, probe: V.StepProbe, seed: int = 0, progress: bool = False) -> tuple[V.Comparison, dict]:
    """Real run, then the simulation of the same requests: (comparison, the real run's result)."""
    sc = case.scenario
    requests, vocab = scenario_requests(sc, seed)
    arrivals = _arrivals(sc, requests, seed)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    result, workers = asyncio.run(_measure(case, requests, seed, vocab, progress))
    wall = time.perf_counter() - t0
    load1 = os.getloadavg()[0]
    if result["failed"]:
        raise RuntimeError(f"{case.name}: {result['failed']} requests failed on the real cluster: {result['errors']}")
    sim = simulate(case, requests, arrivals, probe)
    recs = sim.records
    s = sim.summary()
    cmp = V.compare(case.name, [x / 1e3 for x in result["ttfts"]], [x / 1e3 for x in result["tpots"]],
                    [r.ttft_s for r in recs if r.ttft_s is not None],
                    [r.tpot_s for r in recs if r.tpot_s is not None],
                    requests=len(requests), load_avg_before=round(load0, 2), load_avg_after=round(load1, 2),
                    run_wall_s=round(wall, 1), measured_cache_hit=result.get("prefix_cache_hit_rate"),
                    predicted_cache_hit=round(s["cache_hit"], 4),
                    measured_remote=result.get("remote_prefill_fraction"),
                    predicted_remote=round(1 - s["local_share"], 4), sim_finished=s["finished"],
                    workers={w: round(d["busy_fraction"], 3) for w, d in workers.items()})
    return cmp, result


def format_probe(probe: V.StepProbe, hw) -> str:
    lines = [f"probe ({probe.threads} thread(s)) and the fitted profile: compute {hw.peak_flops / 1e9:.1f} GFLOP/s, "
             f"read {hw.mem_bw / 1e9:.1f} GB/s, step overhead {hw.step_overhead_s * 1e3:.2f} ms, "
             f"per sequence {hw.per_seq_overhead_s * 1e3:.2f} ms"]
    for name, meas, fit in V.fit_report(probe, hw):
        lines.append(f"  {name:<32} measured {meas * 1e3:8.1f} ms   fitted {fit * 1e3:8.1f} ms   "
                     f"({(fit - meas) / meas:+.0%})")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The validation flags; `prefix` ("validate-") when they sit beside `pdcluster plan`'s own."""
    names = list(cases())
    p.add_argument(f"--{prefix}cases", nargs="+", choices=names, default=names if not prefix else ["disagg-trace"],
                   help="cases to run (module doc of bench/sim_validate.py)")
    if not prefix:
        p.add_argument("--trace", default=None, help="Mooncake trace for disagg-trace (default: $PDCLUSTER_TRACE "
                                                     "or ../shared/traces/conversation_trace.jsonl)")
    p.add_argument(f"--{prefix}max-requests", type=int, default=24, help="disagg-trace: requests of the trace slice")
    p.add_argument(f"--{prefix}time-scale", type=float, default=0.25,
                   help="disagg-trace: replay seconds per trace second")
    p.add_argument(f"--{prefix}prefix-prompts", type=int, default=6, help="prefix-routing: prompts per prefix group")
    p.add_argument(f"--{prefix}threads", type=int, default=None,
                   help="probe threads (default: the cases' threads_per_worker)")
    p.add_argument(f"--{prefix}json", default=None, help="write the comparisons and the probe here")


def validate(names: list[str], trace: str | None, max_requests: int, time_scale: float, prefix_prompts: int,
             threads: int | None, out: str | None, seed: int = 0, progress: bool = True) -> int:
    """Probe, run every case, print the table; 0 when every mean is within the tolerance, 1 otherwise."""
    if max_requests < 1 or prefix_prompts < 1 or not time_scale > 0:
        print("error: --max-requests and --prefix-prompts must be >= 1, --time-scale > 0", file=sys.stderr)
        return 2
    try:
        table = cases(trace, max_requests, time_scale, prefix_prompts)
        todo = [table[n] for n in names]
        if any(c.name == "disagg-trace" for c in todo):
            path = todo[0].scenario.dataset["dataset"] if todo[0].name == "disagg-trace" else \
                table["disagg-trace"].scenario.dataset["dataset"]
            if not os.path.exists(path.removeprefix("mooncake:")):
                raise ValueError(f"trace {path.removeprefix('mooncake:')} not found (--trace / $PDCLUSTER_TRACE)")
    except (KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    threads = threads or todo[0].scenario.baseline.engine.threads_per_worker
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; probing engine steps ...", flush=True)
    probe = probe_steps(threads)
    hw = V.fit_profile(probe)
    print(format_probe(probe, hw), flush=True)
    rows, results = [], {}
    for c in todo:
        print(f"\ncase {c.name}: {c.summary}; real cluster, then the simulator ...", flush=True)
        cmp, res = run_case(c, probe, seed, progress)
        rows.append(cmp)
        results[c.name] = {k: res.get(k) for k in ("ttfts", "tpots", "input_lens", "output_lens", "cached_lens",
                                                   "duration", "completed")}
        print(V.format_table([cmp]))
        print("  " + ", ".join(f"{k} {v}" for k, v in cmp.notes.items()), flush=True)
    print("\n" + V.format_table(rows))
    if out:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(dict(probe=dict(threads=probe.threads, prefill=probe.prefill, decode=probe.decode),
                           profile=dict(peak_flops=hw.peak_flops, mem_bw=hw.mem_bw, step_overhead_s=hw.step_overhead_s,
                                        per_seq_overhead_s=hw.per_seq_overhead_s),
                           comparisons=[r.as_dict() for r in rows], measured=results), f, indent=1)
        print(f"wrote {out}")
    return 0 if all(r.within(k) for r in rows for k in ("ttft_mean", "tpot_mean")) else 1


def main(a: argparse.Namespace) -> int:
    return validate(a.cases, a.trace, a.max_requests, a.time_scale, a.prefix_prompts, a.threads, a.json)


if __name__ == "__main__":
    from pdcluster.deploy.cli import HelpFormatter
    cli = argparse.ArgumentParser(prog="python -m pdcluster.bench.sim_validate", description=__doc__.split("\n\n")[0],
                                  formatter_class=HelpFormatter)
    add_arguments(cli)
    sys.exit(main(cli.parse_args()))
