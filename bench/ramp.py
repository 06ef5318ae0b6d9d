"""Load ramp against an autoscaling cluster: the request rate steps up and down; records replicas per
pool and p90 TTFT/TPOT per time window; writes JSON + PNG.

Starts its own local Ray with room for each pool's max_replicas (pool resources `prefill_pool` /
`decode_pool`), a router and the initial workers (deploy.launch.Cluster), runs the pool autoscaler
(deploy/scaling.py) with the pools config below (or --pools FILE), and sends an open-loop Poisson
stream of random-token prompts (bench.datasets "random") over gRPC, the rate changing per step.

    python -m pdcluster.bench.ramp                             # default ramp, ~5 min on 2 CPU cores
    python -m pdcluster.bench.ramp --steps 1,4,8,4,1 --step-s 30 --out bench/ramp

Per window (--window-s): offered and finished requests, p90 TTFT and p90 TPOT of the requests sent in
it (ms), and the pools' replicas sampled every second (registered; draining ones still count until
removed). Requests that fail are counted per window, never dropped from the record.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np


from pdcluster.bench.datasets import build_dataset                          # noqa: E402
from pdcluster.bench.metrics import RequestOutput, StreamRecorder           # noqa: E402
from pdcluster.deploy.cli import HelpFormatter  # noqa: E402

POOLS_YAML = """\
# bench/ramp.py's default pools: short delays so a ~5 minute ramp shows both directions
autoscaler: {interval_s: 1}
prefill:
  min_replicas: 1
  max_replicas: 2
  resources: {cpus: 1, gpus: 0, threads: 1}
  autoscale: {signal: queued_prompt_tokens_per_replica, target: 1024, upscale_delay_s: 5,
              downscale_delay_s: 20, max_step: 1, cooldown_s: 10}
decode:
  min_replicas: 1
  max_replicas: 2
  resources: {cpus: 1, gpus: 0, threads: 1}
  autoscale: {signal: p90_tpot, tpot_slo_ms: 300, upscale_delay_s: 5, downscale_delay_s: 20,
              max_step: 1, cooldown_s: 10}
"""


def schedule(steps: list[float], step_s: float) -> list[tuple[float, float]]:
    """[(start s, rate req/s)] of each step."""
    return [(i * step_s, r) for i, r in enumerate(steps)]


def arrivals(sched: list[tuple[float, float]], step_s: float, seed: int) -> list[float]:
    """Send times (s from the start) of a Poisson process whose rate is piecewise constant."""
    rng, out = np.random.default_rng(seed), []
    for start, rate in sched:
        t = start
        while rate > 0:
            t += rng.exponential(1.0 / rate)
            if t >= start + step_s:
                break
            out.append(float(t))
    return out


def windows(records: list[dict], samples: list[dict], end_s: float, window_s: float) -> list[dict]:
    """Per window: offered/finished/failed requests, p90 TTFT/TPOT (ms) of the requests sent in it,
    and the most replicas per pool sampled in it."""
    out = []
    for w0 in np.arange(0.0, end_s, window_s):
        w1 = w0 + window_s
        sent = [r for r in records if w0 <= r["t_send"] < w1]
        ok = [r for r in sent if r["ok"]]
        ttft = [r["ttft_ms"] for r in ok]
        tpot = [r["tpot_ms"] for r in ok if r["tpot_ms"] is not None]
        reps = [s for s in samples if w0 <= s["t"] < w1] or [{"prefill": None, "decode": None}]
        errors = Counter(r["error"] for r in sent if not r["ok"])
        out.append(dict(t0=float(w0), t1=float(w1), sent=len(sent), ok=len(ok), failed=len(sent) - len(ok),
                        errors=dict(errors),
                        p90_ttft_ms=float(np.percentile(ttft, 90)) if ttft else None,
                        p90_tpot_ms=float(np.percentile(tpot, 90)) if tpot else None,
                        prefill_replicas=max((s["prefill"] or 0) for s in reps),
                        decode_replicas=max((s["decode"] or 0) for s in reps)))
    return out


async def _send(stub, pb, ids: list[int], max_tokens: int) -> RequestOutput:
    import grpc
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids),
                             sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    rec = StreamRecorder(time.perf_counter(), len(ids))
    try:
        async for msg in stub.Generate(req):
            rec.on_message(msg, time.perf_counter())
    except grpc.aio.AioRpcError as e:
        return rec.fail(e.code().name, time.perf_counter())
    return rec.finish(time.perf_counter())


async def run(a: argparse.Namespace) -> dict:
    import grpc
    from tqdm import tqdm

    from pdcluster.deploy.flags import dotted, override
    from pdcluster.deploy.launch import Cluster
    from pdcluster.deploy.pools import load_pools_config, parse_pools_config
    from pdcluster.router.proto import generation_pb2 as pb
    from pdcluster.router.proto import generation_pb2_grpc as pbg

    serve = load_pools_config(a.pools) if a.pools else parse_pools_config(POOLS_YAML, "bench/ramp.py")
    cfg = override(serve, dotted(server__port=0, server__metrics_port=0, server__http_port=0, router__policy=a.policy,
                                 engine__cache__kv_cache_memory=a.kv_cache_mib * 2**20,
                                 pools__drain_timeout_s=a.drain_timeout_s))
    sched = schedule(a.steps, a.step_s)
    times = arrivals(sched, a.step_s, a.seed)
    reqs = build_dataset({"dataset": "random", "num_prompts": len(times), "input_len": a.input_len,
                          "output_len": a.output_len, "range_ratio": 0.25, "seed": a.seed}, 49152)
    records, samples = [], []
    cluster = await Cluster(cfg).start()
    try:
        cluster.start_autoscaler(cfg.pools.autoscaling_rules(), cfg.pools.autoscaler.interval_s)
        pools = cluster.router.workers
        async with grpc.aio.insecure_channel(cluster.address) as ch:
            stub = pbg.GenerationStub(ch)
            await asyncio.gather(*(_send(stub, pb, r.prompt_ids[:32], 4) for r in reqs[:4]))   # warm-up
            t0 = time.perf_counter()
            bar = tqdm(total=len(times), desc="ramp", unit="req", disable=None)

            async def sample():
                while True:
                    t = time.perf_counter() - t0
                    samples.append(dict(t=t, prefill=len(pools.prefill), decode=len(pools.decode),
                                        starting=len(cluster.starting)))
                    step = min(int(t // a.step_s), len(a.steps) - 1)
                    bar.set_postfix_str(f"rate {a.steps[step]:g}/s prefill {len(pools.prefill)} "
                                        f"decode {len(pools.decode)}")
                    await asyncio.sleep(1.0)

            async def one(t_send: float, r) -> None:
                await asyncio.sleep(max(0.0, t0 + t_send - time.perf_counter()))
                o = await _send(stub, pb, r.prompt_ids, r.output_len)
                tpot = (o.latency - o.ttft) / (o.output_tokens - 1) if o.success and o.output_tokens > 1 else None
                records.append(dict(t_send=t_send, ok=o.success, error=o.error, ttft_ms=o.ttft * 1e3,
                                    tpot_ms=None if tpot is None else tpot * 1e3, prompt=o.prompt_tokens,
                                    output=o.output_tokens))
                bar.update(1)

            sampler = asyncio.ensure_future(sample())
            await asyncio.gather(*(one(t, r) for t, r in zip(times, reqs)))
            # idle tail: let the pools shrink back, still sampling
            tail_end = time.perf_counter() + a.tail_s
            while time.perf_counter() < tail_end and (len(pools.prefill) > cfg.pools.prefill.lo
                                                      or len(pools.decode) > cfg.pools.decode.lo):
                await asyncio.sleep(1.0)
            sampler.cancel()
            bar.close()
            total_s = time.perf_counter() - t0
        counters = cluster.autoscaler.counters()
    finally:
        await cluster.stop()
    return dict(settings=dict(steps=a.steps, step_s=a.step_s, window_s=a.window_s, input_len=a.input_len,
                              output_len=a.output_len, seed=a.seed, policy=a.policy,
                              pools=a.pools or POOLS_YAML),
                schedule=sched, windows=windows(records, samples, total_s, a.window_s), samples=samples,
                autoscaler=counters, requests=len(records), failed=sum(not r["ok"] for r in records),
                duration_s=total_s)


def plot(result: dict, path: str) -> None:
    from matplotlib.figure import Figure
    ws, s = result["windows"], result["samples"]
    mid = [(w["t0"] + w["t1"]) / 2 for w in ws]
    fig = Figure(figsize=(11, 8), layout="constrained")
    ax_rate, ax_ttft, ax_tpot = fig.subplots(3, 1, sharex=True)
    step_s = result["settings"]["step_s"]
    xs = [t for t, _ in result["schedule"]] + [result["schedule"][-1][0] + step_s]
    ax_rate.step(xs, [r for _, r in result["schedule"]] + [result["schedule"][-1][1]], where="post",
                 color="gray", label="offered rate (req/s)")
    ax_rate.set_ylabel("req/s")
    rep = ax_rate.twinx()
    rep.step([x["t"] for x in s], [x["prefill"] for x in s], where="post", label="prefill replicas")
    rep.step([x["t"] for x in s], [x["decode"] for x in s], where="post", label="decode replicas", ls="--")
    rep.set_ylabel("replicas")
    rep.set_ylim(0, max(max(x["prefill"] for x in s), max(x["decode"] for x in s)) + 1)
    fig.legend(loc="outside upper center", ncols=3)
    for ax, key, name in ((ax_ttft, "p90_ttft_ms", "p90 TTFT"), (ax_tpot, "p90_tpot_ms", "p90 TPOT")):
        ax.plot(mid, [w[key] if w[key] is not None else np.nan for w in ws], marker="o")
        ax.set_ylabel(f"{name} (ms)")
        ax.grid(alpha=0.3)
    ax_tpot.set_xlabel(f"seconds ({result['settings']['window_s']:g} s windows, by send time)")
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter,
                                epilog="Default pools config (--pools replaces it):\n\n" + POOLS_YAML)
    p.add_argument("--steps", type=lambda s: [float(x) for x in s.split(",")], default="0.2,0.6,1.2,0.6,0.2",
                   help="request rate per step, req/s, comma-separated (one prefill replica saturates near "
                        "0.7 req/s of 256-token prompts on 2 shared cores)")
    p.add_argument("--step-s", type=float, default=40.0, help="seconds per step")
    p.add_argument("--tail-s", type=float, default=60.0,
                   help="after the last step, wait up to this long for the pools to shrink to min, seconds")
    p.add_argument("--window-s", type=float, default=10.0, help="reporting window, seconds")
    p.add_argument("--input-len", type=int, default=256, help="prompt tokens, mean (+-25%%)")
    p.add_argument("--output-len", type=int, default=16, help="output tokens, mean (+-25%%)")
    p.add_argument("--pools", default=None, help="pools YAML (deploy/pools.yaml format); default: the one below")
    p.add_argument("--policy", default="least-loaded", help="placement policy")
    p.add_argument("--kv-cache-mib", type=int, default=512,
                   help="KV cache per worker, MiB (512: ~11k tokens of the embedded model in float32)")
    p.add_argument("--drain-timeout-s", type=float, default=30.0,
                   help="pools' drain_timeout_s: seconds a scaled-down replica's running requests get to "
                        "finish before they migrate")
    p.add_argument("--seed", type=int, default=0, help="seeds the arrivals and the prompts")
    p.add_argument("--out", default="bench/ramp", help="writes OUT.json and OUT.png")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("pdcluster.router.lifecycle",):          # one line per request: too much for a progress bar
        logging.getLogger(name).setLevel(logging.WARNING)
    result = asyncio.run(run(a))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out + ".json").write_text(json.dumps(result, indent=1))
    plot(result, a.out + ".png")
    print(f"{result['requests']} requests ({result['failed']} failed) in {result['duration_s']:.0f}s; "
          f"autoscaler {result['autoscaler']}")
    print(f"{'window':>11} {'sent':>5} {'ok':>4} {'p90 TTFT':>9} {'p90 TPOT':>9} {'prefill':>8} {'decode':>7}")
    for w in result["windows"]:
        f = lambda v: "-" if v is None else f"{v:.0f}"
        print(f"{w['t0']:5.0f}-{w['t1']:<5.0f} {w['sent']:5d} {w['ok']:4d} {f(w['p90_ttft_ms']):>9} "
              f"{f(w['p90_tpot_ms']):>9} {w['prefill_replicas']:8d} {w['decode_replicas']:7d}")
    print(f"wrote {a.out}.json and {a.out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
