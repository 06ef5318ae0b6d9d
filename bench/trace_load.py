"""A trace replay's time scale for an offered load: the busy share it asks of device-only's workers on this host.

    pdcluster bench scenario trace-replay --load 0.73

Why: the hosts lent to this project compute a prompt token in 1.3 to 4.5 ms (bench/RESULTS.md), so one time
scale is a light load on one and past capacity on another (trace-replay's x0.1: workers busy 0.28 on 12-07's
AVX-512 EPYC, past capacity on 12-08's AVX2 one), and the tiers' TTFT ratio depends on the load (RESULTS.md,
"what sets its ratio").

The load is device-only's workers' busy share (busy seconds over workers x replay seconds): offered req/s x busy
seconds per request / workers. It is what each run reports afterwards (`busy_share`), so a run says whether it
got the load it asked for. Past ~0.87 the replay is past what the workers serve (its requests do not split
evenly between them: 12-07's x0.045 was, at 0.87).

How: one engine with a scenario worker's settings (1 thread, the engine's defaults; no prefix cache) computes
PROBE_PROMPTS of the slice's prompts (its length quantiles) cold, best of two: p ms a prompt token. A device-only
worker replaying trace-replay's slice is busy about WORKER_S_PER_PROBE_MS x p seconds a request (fitted where both
were measured: below), so the slice's N requests over T trace seconds ask `load` of W workers at time scale
N x WORKER_S_PER_PROBE_MS x p / (T x load x W). The fit is one host's; others differ in more than one rate.
"""
from __future__ import annotations

import sys

# Device-only worker busy seconds per request of trace-replay's slice, per probe ms a token. Fitted 2026-12-08 on
# an AMD EPYC without AVX-512 (2 vCPU): 382.6 busy s for 237 requests at x0.1 (bench/RESULTS.md), against the
# probe on the same host, quiet: 2.99, 3.32, 3.28 ms a token.
WORKER_S_PER_PROBE_MS = 1.614 / 3.2
PROBE_PROMPTS = (0.2, 0.4, 0.6, 0.8)        # quantiles of the slice's prompt lengths


def probe_prompts(requests: list, quantiles=PROBE_PROMPTS) -> list[list[int]]:
    """The slice's prompts at these quantiles of prompt length."""
    by_len = sorted((r.prompt_ids for r in requests), key=len)
    return [by_len[min(len(by_len) - 1, int(q * len(by_len)))] for q in quantiles]


def probe_ms_per_token(prompts: list[list[int]], repeats: int = 2) -> float:
    """ms a prompt token on one engine as a scenario worker runs (1 thread, defaults, nothing cached): the
    prompts' summed best-of-`repeats` time over their summed tokens."""
    import torch

    from pdcluster.bench.prefill_position import first_token_ms
    from pdcluster.engine.llm_engine import LLMEngine, build_config
    from pdcluster.engine.sampling_params import SamplingParams
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        longest = max(len(p) for p in prompts)
        eng = LLMEngine(build_config(num_threads=1, speculative="off", enable_prefix_caching=False,
                                     kv_cache_memory=longest * kv_bytes_per_token() * 2 + (16 << 20)))
        eng.warmup()
        sp = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        ms = sum(min(first_token_ms(eng, p, sp) for _ in range(repeats)) for p in prompts)
    finally:
        torch.set_num_threads(threads)
    return ms / sum(len(p) for p in prompts)


def kv_bytes_per_token() -> int:
    """float32 K and V of one token over every layer of the embedded model."""
    from pdcluster.engine.loader import load_model_config
    m = load_model_config(None)
    return 2 * m.num_layers * m.num_kv_heads * m.head_dim * 4


def time_scale_for(load: float, requests: list, workers: int, ms_per_token: float) -> float:
    """The time scale at which `requests` (arrival_s at time scale 1) keep `workers` device-only workers busy a
    `load` share of the time, workers that compute a prompt token in ms_per_token (the probe's)."""
    if not 0 < load <= 10:
        raise ValueError(f"load must be in (0, 10] (device-only's workers' busy share), got {load}")
    arrivals = [r.arrival_s for r in requests]
    span = max(arrivals) - min(arrivals)
    if len(requests) < 2 or span <= 0:
        raise ValueError("a load needs a replay of 2 or more requests over some time")
    return len(requests) * WORKER_S_PER_PROBE_MS * ms_per_token / (span * load * workers)


def busy_share(workers: list[dict], durations: list[float]) -> float | None:
    """A side's workers' busy seconds over (workers x run duration), every run pooled (run_once's worker
    figures and the runs' durations); None without the figures."""
    busy = total = 0.0
    for run, d in zip(workers, durations):
        figs = [w.get("busy_s") for w in run.values()]
        if not figs or None in figs or not d:
            return None
        busy, total = busy + sum(figs), total + len(figs) * d
    return busy / total if total else None



def at_load(sc, load: float, seed: int) -> tuple:
    """(Scenario sc replayed at the time scale that keeps its baseline's workers busy a `load` share here, what
    set it)."""
    from pdcluster.bench.scenario import scenario_requests, trace_override
    if not str(sc.dataset["dataset"]).startswith("mooncake:"):
        raise ValueError(f"--load applies to a trace replay; {sc.name} replays none")
    requests, _ = scenario_requests(trace_override(sc, "time_scale", 1.0), seed)
    workers = sc.baseline.workers("prefill") + sc.baseline.workers("decode")
    print(f"probing this host's prefill speed for a load of {load:g} ...", file=sys.stderr, flush=True)
    ms = probe_ms_per_token(probe_prompts(requests))
    scale = time_scale_for(load, requests, workers, ms)
    print(f"probe: {ms:.3f} ms a prompt token -> time scale x{scale:.4f}", file=sys.stderr, flush=True)
    return trace_override(sc, "time_scale", scale), dict(load=load, probe_ms_per_token=round(ms, 4),
                                                          time_scale=round(scale, 5))
