"""The simulator against the real cluster on this machine (issue 20 point 2; `pdcluster plan --validate`).

    python -m pdcluster.bench.sim_validate [--cases disagg-trace colocated prefix-routing] [--out F.json]

One run, in this order:
  1. probe (before every case: the host's load drifts within minutes): one engine in this process, on a thread at Ray's worker niceness and a worker's
     thread count (--threads, default the cases' threads_per_worker), times prefill steps of 32,
     128, 384 and 1,024 tokens and decode steps at batch 1, 2, 4 and 8 (96-token prompts), in
     interleaved rounds; sim/validate.py fits this machine's profile (compute rate, the prompt
     attention's own rate, read bandwidth, per-step and per-sequence overheads) to those steps only;
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
Per case two predictions: the probe's profile, and (`@run-steps`, a diagnostic) that profile with
each pool's step times scaled by the CPU share its workers got during the run (their own forward-
step counters against the probe's forward-only fit). The load average is printed beside every
run: the host is shared.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
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


def cases(trace: str | None = None, max_requests: int | None = None, time_scale: float = 0.4,
          prefix_prompts: int = 6) -> dict[str, Case]:
    """The validation cases (module doc). max_requests: the trace slice's requests (default 16)."""
    trace = trace or trace_path()
    return {c.name: c for c in (
        _case("disagg-trace", "1 prefill + 1 decode worker, least-loaded, Mooncake trace slice", COLO.candidate,
              {"dataset": f"mooncake:{trace}", "token_scale": 1, "time_scale": time_scale, "start": 0,
               "max_requests": max_requests or 16, "conversation_sample": 40, "ignore_eos": True},
              float("inf")),
        _case("colocated", "2 colocated workers, least-loaded, mixed prompts 64/384 tokens", COLO.baseline,
              COLO.dataset, COLO.request_rate),
        _case("prefix-routing", "2 local-prefill workers x 112 blocks, cost-model, 8 shared prefixes",
              PREFIX_ROUTING.candidate, dict(PREFIX_ROUTING.dataset, prompts_per_group=prefix_prompts),
              PREFIX_ROUTING.request_rate),
    )}


# 1. the probe
def worker_niceness() -> int:
    """The niceness Ray starts worker processes at (its raylet's worker_niceness, 15 unless
    $RAY_worker_niceness says otherwise): the probe runs at it too, so that it meets the other
    processes of a shared host as the workers do."""
    try:
        return int(os.environ.get("RAY_worker_niceness", "15"))
    except ValueError:
        return 15


def _burn(threads: int, nice: int, ready, stop) -> None:
    """A second engine stepping without pause (prompts of 128 tokens, 8 outputs, 4 in flight), at the
    workers' niceness: the probe's other busy worker on the host."""
    with contextlib.suppress(OSError):
        os.nice(nice)
    from pdcluster.engine.llm_engine import LLMEngine, build_config
    from pdcluster.engine.sampling_params import SamplingParams
    eng = LLMEngine(build_config(None, num_threads=threads, speculative="off", kv_cache_memory=128 * 2**20))
    eng.warmup()
    ready.set()
    i = 0
    while not stop.is_set():
        while len(eng.scheduler.running) + len(eng.scheduler.waiting) < 4:
            eng.add_request([(7919 * (i * 131 + k)) % 40000 + 100 for k in range(128)],
                            SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), request_id=f"burn-{i}",
                            detokenize=False)
            i += 1
        eng.step()


def probe_steps(threads: int, prefill_lens=(32, 128, 384, 1024), batches=(1, 2, 4, 8), ctx: int = 96,
                decode_steps: int = 4, reps: int = 3, nice: int | None = None,
                contend: bool = True) -> tuple[V.StepProbe, V.StepProbe]:
    """Times engine.step() on one engine of the embedded model at `threads` torch threads, on a
    thread at the workers' niceness: `reps` rounds, each one prefill step of every length (fresh
    random tokens: no prefix hits) and, per batch, the median of `decode_steps` decode steps once
    its prompts are in; the median over rounds of each (interleaved, so drift on a shared host hits
    every point alike). contend: then a 128-token prefill and a batch-4 decode step again, `reps`
    times each, while a second engine (another process at the same niceness) steps without pause:
    host_slowdown = median(contended / alone) - 1, what one more busy worker costs each step here.
    Returns (whole steps: scheduling, model, sampling; the model's forward alone, as the engine's
    own step counters time it)."""
    import random
    import threading

    import torch

    from pdcluster.engine.llm_engine import LLMEngine, build_config
    from pdcluster.engine.sampling_params import SamplingParams
    box: dict = {}

    def work() -> None:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), worker_niceness() if nice is None else nice)
        torch.set_num_threads(threads)
        eng = LLMEngine(build_config(None, num_threads=threads, speculative="off", kv_cache_memory=256 * 2**20,
                                     max_num_seqs=64))
        eng.warmup()
        rng = random.Random(0)
        vocab = eng.cfg.model.vocab_size
        n_req = iter(range(10**9))

        def add(n: int, out: int):
            return eng.add_request([rng.randrange(100, vocab - 100) for _ in range(n)],
                                   SamplingParams(max_tokens=out, temperature=0.0, ignore_eos=True),
                                   request_id=f"probe-{next(n_req)}", detokenize=False)

        def timed_step() -> tuple[float, float]:
            b0, t = eng.stats.busy_s, time.perf_counter()
            eng.step()
            return time.perf_counter() - t, eng.stats.busy_s - b0

        x = torch.ones(256 * 2**20 // 4)          # 256 MiB, read as a decode step reads the weights
        bws = []
        for _ in range(5):
            t = time.perf_counter()
            x.sum()
            bws.append(x.numel() * 4 / (time.perf_counter() - t))
        del x
        pre = {n: [] for n in prefill_lens}
        dec = {b: [] for b in batches}
        kv = {}
        for _ in range(reps):
            for n in prefill_lens:
                r = add(n, 1)
                pre[n].append(timed_step())
                while not r.is_finished:
                    eng.step()
            for b in batches:
                reqs = [add(ctx, decode_steps + 2) for _ in range(b)]
                while any(r.num_output_tokens < 1 for r in reqs):
                    eng.step()
                kv[b] = sum(r.num_tokens for r in reqs)
                ts = [timed_step() for _ in range(decode_steps)]
                dec[b].append(tuple(statistics.median(x[i] for x in ts) for i in (0, 1)))
                while not all(r.is_finished for r in reqs):
                    eng.step()
        slow = None
        if contend:                 # the same steps again while a second engine steps on the host
            import multiprocessing as mp
            ctx_mp = mp.get_context("spawn")
            ready, stop = ctx_mp.Event(), ctx_mp.Event()
            burner = ctx_mp.Process(target=_burn, args=(threads, worker_niceness() if nice is None else nice,
                                                        ready, stop), daemon=True)
            burner.start()
            try:
                if ready.wait(300):
                    ratios = []
                    for _ in range(reps):
                        for n in prefill_lens[1:2]:
                            r = add(n, 1)
                            ratios.append(timed_step()[0] / statistics.median(x[0] for x in pre[n]))
                            while not r.is_finished:
                                eng.step()
                        for b in batches[2:3]:
                            reqs = [add(ctx, decode_steps + 2) for _ in range(b)]
                            while any(r.num_output_tokens < 1 for r in reqs):
                                eng.step()
                            ts = [timed_step()[0] for _ in range(decode_steps)]
                            ratios.append(statistics.median(ts) / statistics.median(x[0] for x in dec[b]))
                            while not all(r.is_finished for r in reqs):
                                eng.step()
                    slow = max(0.0, statistics.median(ratios) - 1.0)
            finally:
                stop.set()
                burner.join(30)
                if burner.is_alive():
                    burner.kill()
        box["out"] = tuple(V.StepProbe(threads, tuple((n, statistics.median(x[i] for x in pre[n])) for n in prefill_lens),
                                       tuple((b, kv[b], statistics.median(x[i] for x in dec[b])) for b in batches),
                                       statistics.median(bws), slow)
                           for i in (0, 1))

    th = threading.Thread(target=work, name="probe")     # its own thread: the niceness stays with it
    th.start()
    th.join()
    if "out" not in box:
        raise RuntimeError("the engine probe failed (see the traceback above)")
    return box["out"]


# 2. a case
def _arrivals(sc: Scenario, requests, seed: int) -> list[float]:
    from pdcluster.bench.serve import arrival_offsets, trace_offsets
    t = trace_offsets(requests)
    if t is None:
        t = arrival_offsets(len(requests), sc.request_rate, sc.burstiness, seed)
    return [float(x) for x in t]


def simulate(case: Case, requests, arrivals: list[float], profile, prefill_profile=None, host_slowdown: float = 0.0):
    """The simulator's result for the case's workload on its cluster, its workers on `profile`
    (the prefill pool on `prefill_profile` when given), the KV pools sized as the case's."""
    from pdcluster.bench.scenarios import KV_BYTES_PER_TOKEN
    from pdcluster.sim.cluster import Simulator
    cfg = case.scenario.baseline
    bs = cfg.engine.cache.block_size
    blocks = V.kv_blocks_of(cfg, bs * KV_BYTES_PER_TOKEN)

    def sized(hw):
        return None if hw is None else V.with_kv_pool(hw, blocks, bs)
    reqs = V.sim_requests([r.prompt_ids for r in requests], [r.output_len for r in requests], arrivals, bs)
    return Simulator(V.sim_config(cfg, sized(profile), sized(prefill_profile), host_slowdown), reqs).run()


async def _measure(case: Case, requests, seed: int, vocab: int, progress: bool) -> tuple[dict, dict]:
    return await run_once(case.scenario.baseline, case.scenario, requests, seed, vocab, None, progress)


def step_ms(workers: dict) -> dict:
    """Per worker, its forward steps during the run: mean decode step ms and mean batch, prefill
    tokens per second of prefill-step time (what the TPOT and TTFT it served are made of)."""
    out = {}
    for wid, w in workers.items():
        e = w["engine"]
        out[wid] = dict(decode_ms=round(e["decode_s"] / e["decode_steps"] * 1e3, 1) if e["decode_steps"] else None,
                        batch=round(e["decode_seqs"] / e["decode_steps"], 2) if e["decode_steps"] else None,
                        prefill_tok_s=round(e["prefill_tokens"] / e["prefill_s"], 1) if e["prefill_s"] else None)
    return out


def run_shares(forward, counters: dict) -> dict:
    """{"<pool>.<step kind>": the run's step share} from the workers' step counters (wid -> counters
    with "role") against the probe's forward-only profile; None where the pool ran no such steps."""
    return {f"{role}.{kind}": V.step_share(forward, [c for c in counters.values() if c["role"] == role], kind=kind)
            for role in ("prefill", "decode") for kind in ("prefill", "decode")}


def predict(case: Case, requests, arrivals: list[float], whole, shares: dict, ttfts_ms, tpots_ms,
            notes: dict, host_slowdown: float = 0.0) -> list[V.Comparison]:
    """The two comparisons of run_case for measured TTFT / TPOT samples (ms): the probe's profile
    `whole`, and it scaled per pool by `shares` (role -> the run's step share, or None)."""
    out = []
    def pool(role: str):
        p, d = shares.get(f"{role}.prefill"), shares.get(f"{role}.decode")
        if p is None and d is None:
            return None
        return V.scaled(whole, p or d, d or p)
    for label, prof, pprof, slow in ((case.name, whole, None, host_slowdown),      # the run's shares hold it
                                     (f"{case.name} @run-steps", pool("decode") or whole, pool("prefill"), 0.0)):
        sim = simulate(case, requests, arrivals, prof, pprof, slow)
        s = sim.summary()
        out.append(V.compare(label, [x / 1e3 for x in ttfts_ms], [x / 1e3 for x in tpots_ms],
                             [r.ttft_s for r in sim.records if r.ttft_s is not None],
                             [r.tpot_s for r in sim.records if r.tpot_s is not None],
                             **notes, predicted_cache_hit=round(s["cache_hit"], 4),
                             predicted_remote=round(1 - s["local_share"], 4), sim_finished=s["finished"]))
    return out


def resimulate(path: str, trace: str | None = None) -> list[V.Comparison]:
    """The comparisons of a saved --json result, predicted again by this build's simulator from the
    file's probes and step shares (the measured samples stay the file's): how a change to sim/
    moves the predictions against the same measurements, without running a cluster."""
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    st = d.get("settings", {})
    table = cases(trace or st.get("trace"), st.get("max_requests", 16), st.get("time_scale", 0.4),
                  st.get("prefix_prompts", 6))
    rows = []
    for comp in d["comparisons"]:
        name = comp["case"]
        if "@" in name:
            continue
        steps = d["probes"][name]["steps"][0] if "probes" in d else d["probe"][0]
        probe = V.StepProbe(steps["threads"], tuple(map(tuple, steps["prefill"])), tuple(map(tuple, steps["decode"])),
                            steps.get("read_bw"), steps.get("host_slowdown"))
        c = table[name]
        requests, _ = scenario_requests(c.scenario, st.get("seed", 0))
        arrivals = _arrivals(c.scenario, requests, st.get("seed", 0))
        m = d["measured"][name]
        notes = {k: v for k, v in comp["notes"].items() if not k.startswith("predicted_") and k != "sim_finished"}
        if "counters" in notes:
            fw = d["probes"][name]["steps"][1] if "probes" in d else d["probe"][1]
            forward = V.fit_profile(V.StepProbe(fw["threads"], tuple(map(tuple, fw["prefill"])),
                                                tuple(map(tuple, fw["decode"])), fw.get("read_bw")))
            shares = run_shares(forward, notes["counters"])
        else:                   # files before the per-kind shares: one share per pool
            shares = {f"{role}.{kind}": v for role, v in notes["step_share"].items() for kind in ("prefill", "decode")}
        rows += predict(c, requests, arrivals, V.fit_profile(probe), shares, m["ttfts"], m["tpots"], notes,
                        probe.host_slowdown or 0.0)
    return rows


def run_case(case: Case, probes: tuple[V.StepProbe, V.StepProbe], seed: int = 0,
             progress: bool = False) -> tuple[list[V.Comparison], dict]:
    """Real run, then the simulation of the same requests: (comparisons, the real run's result).
    Comparison 1: the probe's profile (whole steps). Comparison 2 ("<case> @run-steps", a
    diagnostic): that profile with each pool's steps scaled by the share of the CPU its workers got
    in this run (their own forward-step counters against the probe's forward-only profile)."""
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
    counters = {wid: dict(w["engine"], role=w["role"]) for wid, w in workers.items()}
    shares = run_shares(V.fit_profile(probes[1]), counters)
    notes = dict(requests=len(requests), load_avg_before=round(load0, 2), load_avg_after=round(load1, 2),
                 run_wall_s=round(wall, 1), measured_cache_hit=result.get("prefix_cache_hit_rate"),
                 measured_remote=result.get("remote_prefill_fraction"),
                 workers={w: round(d["busy_fraction"], 3) for w, d in workers.items()},
                 step_share={k: None if v is None else round(v, 3) for k, v in shares.items()},
                 step_ms=step_ms(workers), counters=counters)
    out = predict(case, requests, arrivals, V.fit_profile(probes[0]), shares, result["ttfts"], result["tpots"], notes,
                  probes[0].host_slowdown or 0.0)
    return out, result


def format_probe(probe: V.StepProbe, hw) -> str:
    attn = "as compute" if hw.attn_flops is None else f"{hw.attn_flops / 1e9:.1f} GFLOP/s"
    lines = [f"probe ({probe.threads} thread(s)) and the fitted profile: compute {hw.peak_flops / 1e9:.1f} GFLOP/s, "
             f"prompt attention {attn}, "
             f"read {hw.mem_bw / 1e9:.1f} GB/s (measured: {probe.read_bw and probe.read_bw / 1e9 or 0:.1f}), "
             f"step overhead {hw.step_overhead_s * 1e3:.2f} ms, prefill step +{hw.prefill_overhead_s * 1e3:.2f} ms, "
             f"per sequence {hw.per_seq_overhead_s * 1e3:.2f} ms; one more busy engine on the host: "
             + ("not measured" if probe.host_slowdown is None else f"steps +{probe.host_slowdown:.0%}")]
    for name, meas, fit in V.fit_report(probe, hw):
        lines.append(f"  {name:<32} measured {meas * 1e3:8.1f} ms   fitted {fit * 1e3:8.1f} ms   "
                     f"({(fit - meas) / meas:+.0%})")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cases", nargs="+", choices=V.CASES, default=list(V.CASES),
                   help="cases to run (module doc)")
    p.add_argument("--trace", default=None, help="Mooncake trace for disagg-trace (default: $PDCLUSTER_TRACE "
                                                 "or ../shared/traces/conversation_trace.jsonl)")
    p.add_argument("--max-requests", type=int, default=16, help="disagg-trace: requests of the trace slice")
    p.add_argument("--time-scale", type=float, default=0.4, help="disagg-trace: replay seconds per trace second")
    p.add_argument("--prefix-prompts", type=int, default=6, help="prefix-routing: prompts per prefix group")
    p.add_argument("--threads", type=int, default=None, help="probe threads (default: the cases' threads_per_worker)")
    p.add_argument("--json", default=None, help="write the comparisons and the probe here")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bars")
    p.add_argument("--resim", default=None, metavar="RESULT.json",
                   help="no cluster: predict a saved --json result's cases again with this build's simulator")


def validate(names: list[str], trace: str | None, max_requests: int, time_scale: float, prefix_prompts: int,
             threads: int | None, out: str | None, seed: int = 0, progress: bool = True) -> int:
    """Probe, run every case, print the table; 0 when every mean is within the tolerance, 1 otherwise."""
    if max_requests < 1 or prefix_prompts < 1 or not time_scale > 0:
        print("error: --max-requests and --prefix-prompts must be >= 1, --time-scale > 0", file=sys.stderr)
        return 2
    try:
        table = cases(trace, max_requests, time_scale, prefix_prompts)
        todo = [table[n] for n in names]
        if "disagg-trace" in names:
            path = table["disagg-trace"].scenario.dataset["dataset"].removeprefix("mooncake:")
            if not os.path.isfile(path):
                raise ValueError(f"trace {path} not found (--trace, or $PDCLUSTER_TRACE)")
        if not todo:
            raise ValueError("no cases to run")
    except KeyError as e:
        print(f"error: unknown case {e}; choose from {', '.join(V.CASES)}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    threads = threads or todo[0].scenario.baseline.engine.threads_per_worker
    print(f"{os.cpu_count()} cores", flush=True)
    rows, results, probed = [], {}, []
    for c in todo:
        print(f"probing engine steps (load average {os.getloadavg()[0]:.2f}) ...", flush=True)
        probes = probe_steps(threads)              # before every case: the host's load drifts within minutes
        hw = V.fit_profile(probes[0])
        probed.append((c.name, probes, hw))
        print(format_probe(probes[0], hw), flush=True)
        print(f"\ncase {c.name}: {c.summary}; real cluster, then the simulator ...", flush=True)
        cmps, res = run_case(c, probes, seed, progress)
        rows += cmps
        results[c.name] = {k: res.get(k) for k in ("ttfts", "tpots", "input_lens", "output_lens", "cached_lens",
                                                   "duration", "completed")}
        print(V.format_table(cmps))
        print("  " + ", ".join(f"{k} {v}" for k, v in cmps[0].notes.items()), flush=True)
    print("\n" + V.format_table(rows))
    if out:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(dict(probes={name: dict(
                               steps=[dict(threads=p.threads, prefill=p.prefill, decode=p.decode, read_bw=p.read_bw,
                                           host_slowdown=p.host_slowdown) for p in probes],
                               profile=dict(peak_flops=hw.peak_flops, attn_flops=hw.attn_flops, mem_bw=hw.mem_bw,
                                            step_overhead_s=hw.step_overhead_s,
                                            prefill_overhead_s=hw.prefill_overhead_s,
                                            per_seq_overhead_s=hw.per_seq_overhead_s))
                               for name, probes, hw in probed},
                           comparisons=[r.as_dict() for r in rows], measured=results,
                           settings=dict(trace=trace, max_requests=max_requests, time_scale=time_scale,
                                         prefix_prompts=prefix_prompts, seed=seed)), f, indent=1)
        print(f"wrote {out}")
    return 0 if all(r.within(k) for r in rows if "@" not in r.case for k in ("ttft_mean", "tpot_mean")) else 1


def main(a: argparse.Namespace) -> int:
    if a.resim:
        rows = resimulate(a.resim, a.trace)
        print(V.format_table(rows))
        return 0
    return validate(a.cases, a.trace, a.max_requests, a.time_scale, a.prefix_prompts, a.threads, a.json,
                    progress=not a.disable_tqdm)


if __name__ == "__main__":
    from pdcluster.deploy.cli import HelpFormatter
    cli = argparse.ArgumentParser(prog="python -m pdcluster.bench.sim_validate", description=__doc__.split("\n\n")[0],
                                  formatter_class=HelpFormatter)
    add_arguments(cli)
    sys.exit(main(cli.parse_args()))
