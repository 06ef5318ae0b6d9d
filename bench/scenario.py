"""`pdcluster bench scenario NAME`: two cluster configurations, one seeded workload, side by side.

Both configurations run on this machine, one cluster up at a time (same model, same total cores),
alternating baseline, candidate, baseline, candidate, ... for --rounds rounds, so that drift of a
shared machine hits both. Each run starts its cluster, sends a few warm-up requests (not measured),
drives the same seeded workload (same prompts, same arrival times) through bench.serve's
run_benchmark, and stops the cluster. Each side's rounds are merged (latency samples pooled,
throughputs = totals / summed durations) and ratios = candidate / baseline are printed.

A scenario is a `Scenario` in `SCENARIOS`; adding one is a few lines:

    register(Scenario(
        name="two-decode", summary="1P1D vs 1P2D",
        baseline=cluster(),
        candidate=cluster(pools__decode__initial_replicas=2),
        dataset={"dataset": "random", "num_prompts": 24, "input_len": 128, "output_len": 32},
        request_rate=2.0, goodput={"tpot": 200.0}, metrics=("p99_tpot_ms", "request_goodput")))

A side may also be given as command-line flags of `pdcluster serve` (deploy/flags.py names) over its
config, resolved when it runs (`candidate_flags`): a scenario can name a feature's flags before the
build has them, and `--only baseline` runs the side that does (the other side is "not run").

Result file (--out): {"scenario": {...the scenario and run settings...}, "baseline": merged result,
"candidate": merged result, "ratios": {metric: candidate / baseline or null}}. The merged results
keep run_benchmark's keys (sample lists included, so the figure can be redrawn) plus "config"
(the ClusterConfig), "runs" (the per-round figures of the ratio metrics) and "workers" (each
worker's busy seconds / steps during the measured runs).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from pdcluster.bench.metrics import parse_goodput
from pdcluster.bench.scenario_report import (SIDE_NAMES, STEP_COUNTERS, build_report, format_report, pull_deltas,
                                             tier_deltas)
from pdcluster.deploy.config import ClusterConfig
from pdcluster.deploy.flags import dotted, override, tree_flags


def cluster(**kw) -> ClusterConfig:
    """ClusterConfig() with the leaves named by kw set; "__" separates path names (kv__layerwise=False)."""
    return override(ClusterConfig(), dotted(**kw))


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    baseline: ClusterConfig
    candidate: ClusterConfig
    dataset: dict                                  # build_dataset keys (bench/datasets.py DEFAULTS)
    request_rate: float                            # req/s, Poisson unless burstiness != 1
    goodput: dict[str, float]                      # SLO targets in ms: ttft / tpot / e2el
    metrics: tuple[str, ...]                       # result keys to compare (ratio = candidate / baseline)
    labels: tuple[str, str] = ("baseline", "candidate")
    burstiness: float = 1.0
    max_concurrency: int | None = None
    warmup: int = 4                                # unmeasured requests after each cluster start
    notes: str = ""                                # how the defaults were chosen
    shaped_link: bool = False                      # kv_bandwidth_limit as a real veth+tbf link (deploy/netns.py)
                                                   #   where the machine allows it, else the transport's bucket
    candidate_flags: Mapping[str, Any] = field(default_factory=dict)   # `pdcluster serve` flags set over
                                                   #   candidate when it runs, in the flags' units (with_flags);
                                                   #   FRESH_DIR: a new empty directory for each run
    baseline_flags: Mapping[str, Any] = field(default_factory=dict)    # the same, over baseline
    load: float | None = None                      # a trace replay's load: device-only's workers' busy share
                                                   #   on the host that runs it (bench/trace_load.py): sets its
                                                   #   time scale unless --time-scale does


SCENARIOS: dict[str, Scenario] = {}
FRESH_DIR = "<fresh-dir>"                          # a candidate flag's value: a new temp directory per run


def with_flags(cfg: ClusterConfig, flags: Mapping[str, Any]) -> ClusterConfig:
    """cfg with `pdcluster serve` flags set (values in the flags' units, e.g. GiB). A flag that the
    tree has once per pool ("--decode-kv-host-cache-gb") is set in every pool by its pool-less name
    ("--kv-host-cache-gb"). ValueError naming the flags this build lacks."""
    table = list(tree_flags(cfg))
    changes, missing = {}, []
    for name, value in flags.items():
        hits = [f for f in table if f.name == name or f.name.endswith("-" + name.removeprefix("--"))]
        if not hits:
            missing.append(name)
        for f in hits:
            changes[f.path] = f.to_field(value)
    if missing:
        raise ValueError(f"flags {', '.join(missing)} are not in this build's config tree")
    return override(cfg, changes)


def side_config(sc: Scenario, side: str, dirs: contextlib.ExitStack | None = None) -> ClusterConfig:
    """The config one run of `side` starts: the candidate with its flags set, each FRESH_DIR value a new
    temp directory that `dirs` removes when it closes (None: a placeholder path, to check the flags)."""
    cfg, given, label = ((sc.baseline, sc.baseline_flags, sc.labels[0]) if side == "baseline"
                         else (sc.candidate, sc.candidate_flags, sc.labels[1]))
    if not given:
        return cfg
    flags = {}
    for name, value in given.items():
        if value == FRESH_DIR:
            value = (dirs.enter_context(tempfile.TemporaryDirectory(prefix="pdcluster-scenario-"))
                     if dirs is not None else tempfile.gettempdir())
        flags[name] = value
    try:
        return with_flags(cfg, flags)
    except ValueError as e:
        raise ValueError(f"scenario {sc.name}: the {label} side cannot run here: {e}") from None


def register(s: Scenario) -> Scenario:
    SCENARIOS[s.name] = s
    return s


# Running: one cluster at a time.
async def _ticker(bar) -> None:
    while True:
        await asyncio.sleep(0.5)
        bar.refresh()


async def _warmup(addr: str, n: int, vocab_size: int) -> None:
    """n short concurrent requests, so that every worker has run a prefill and a decode step."""
    from pdcluster.bench.datasets import build_dataset
    from pdcluster.bench.serve import run_benchmark
    if n <= 0:
        return
    reqs = build_dataset({"dataset": "random", "num_prompts": n, "input_len": 32, "output_len": 4,
                          "seed": 12345, "ignore_eos": True}, vocab_size)
    await run_benchmark(addr, reqs, float("inf"), 1.0, None, 0, None, progress=False)


async def run_once(cfg: ClusterConfig, sc: Scenario, requests, seed: int, vocab_size: int, bar=None,
                   progress: bool = True) -> tuple[dict, dict]:
    """Start cfg's cluster, warm it up, run the workload, stop it: (result, worker figures)."""
    from pdcluster.bench.serve import run_benchmark
    from pdcluster.deploy.launch import Cluster

    def phase(text: str) -> None:
        if bar is not None:
            bar.set_postfix_str(text)

    phase("starting cluster")
    tick = asyncio.ensure_future(_ticker(bar)) if bar is not None else None
    cluster = Cluster(replace(cfg, server=replace(cfg.server, port=0, metrics_port=0, http_port=0)))
    try:
        await cluster.start()
        phase("warm-up")
        await _warmup(cluster.address, sc.warmup, vocab_size)
        before = await cluster.worker_status()
        phase("running")
        if tick is not None:
            tick.cancel()
            tick = None
        result = await run_benchmark(cluster.address, requests, sc.request_rate, sc.burstiness,
                                     sc.max_concurrency, seed, sc.goodput or None, progress=progress)
        after = await cluster.worker_status()
        phase("stopping cluster")
    finally:
        if tick is not None:
            tick.cancel()
        await cluster.stop()
    busy = {wid: after[wid].engine.busy_s - before[wid].engine.busy_s for wid in after}
    workers = {wid: dict(busy_s=busy[wid], steps=after[wid].engine.steps - before[wid].engine.steps,
                         busy_fraction=busy[wid] / result["duration"],
                         tiers=tier_deltas(before[wid].tiers if wid in before else (), after[wid].tiers),
                         pulls=pull_deltas(before[wid].pulls if wid in before else None, after[wid].pulls),
                         role=after[wid].role,
                         engine={k: getattr(after[wid].engine, k) - (getattr(before[wid].engine, k) if wid in before
                                                                      else 0) for k in STEP_COUNTERS})
               for wid in after}
    return result, workers


@contextlib.contextmanager
def kv_link(cfg: ClusterConfig, shaped: bool, notes: dict[str, None]):
    """cfg for one run: its kv.bandwidth_limit as a shaped veth+tbf link made for the run (removed
    after it) when `shaped`, else as is (the transport's token bucket). Adds what ran to `notes`."""
    rate = cfg.kv.bandwidth_limit
    if not rate or not shaped:
        if rate:
            notes[f"token bucket in the transport at {rate / 1e6:.1f} MB/s"] = None
        yield cfg
        return
    from pdcluster.deploy import netns
    with netns.shaped_link(netns.line_rate(rate)) as link:
        notes[link.describe().replace(link.prefill_ns, "pdkv<pid>p").replace(link.decode_ns, "pdkv<pid>d")] = None
        yield replace(cfg, kv=replace(cfg.kv, bandwidth_limit=None, link=link))


def link_mode(sc: Scenario) -> tuple[bool, str]:
    """(shaped, why not): whether this scenario's throttled KV link runs as a real shaped link."""
    if not sc.shaped_link or not (sc.baseline.kv.bandwidth_limit or sc.candidate.kv.bandwidth_limit):
        return False, ""
    from pdcluster.deploy import netns
    return netns.available()


def scenario_requests(sc: Scenario, seed: int) -> tuple[list, int]:
    """(the workload's requests, the model's vocabulary size). A trace replay's blocks are the
    engine's (the baseline's cache block_size) and draw no special tokens of the model's tokenizer."""
    from pdcluster.bench.datasets import build_dataset
    from pdcluster.engine.loader import load_model_config
    mcfg = load_model_config(sc.baseline.model)
    opts, reserved = dict(sc.dataset, seed=seed), ()
    if opts["dataset"].startswith("mooncake:"):
        from pdcluster.engine.tokenizer import load_tokenizer
        tok = load_tokenizer(mcfg)
        reserved = sorted(set(tok.added_tokens_decoder) | set(tok.all_special_ids))
        opts.setdefault("block_size", sc.baseline.engine.cache.block_size)
    return build_dataset(opts, mcfg.vocab_size, reserved), mcfg.vocab_size


async def run_scenario(sc: Scenario, rounds: int, seed: int, progress: bool = True, only: str | None = None,
                       calibration: dict | None = None) -> dict:
    """Runs both sides alternately for `rounds` rounds (or `only` one of them) and builds the report
    (calibration: how a --load set the time scale, bench/trace_load.py at_load's)."""
    from tqdm import tqdm

    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    sides = [s for s in SIDE_NAMES if only in (None, s)]
    if not sides:
        raise ValueError(f"only must be one of {', '.join(SIDE_NAMES)}, got {only!r}")
    for side in sides:
        side_config(sc, side)               # a side that cannot run here fails before any cluster starts
    requests, vocab = scenario_requests(sc, seed)
    runs: dict[str, list[dict]] = {"baseline": [], "candidate": []}
    workers: dict[str, list[dict]] = {"baseline": [], "candidate": []}
    shaped, why_not = link_mode(sc)
    links: dict[str, None] = {}  # what throttled the KV link, in run order, once each
    t0 = time.perf_counter()
    bar = tqdm(total=len(sides) * rounds, desc="runs", disable=not progress, position=0, leave=True)
    try:
        for i in range(rounds):
            for side in sides:
                bar.set_description(f"round {i + 1}/{rounds} {side} ({sc.labels[SIDE_NAMES.index(side)]})")
                with contextlib.ExitStack() as dirs:
                    run_cfg = dirs.enter_context(kv_link(side_config(sc, side, dirs), shaped, links))
                    res, w = await run_once(run_cfg, sc, requests, seed, vocab, bar if progress else None, progress)
                runs[side].append(res)
                workers[side].append(w)
                bar.update(1)
    finally:
        bar.close()
    settings = dict(rounds=rounds, seed=seed, num_requests=len(requests), sides=sides,
                    wall_s=round(time.perf_counter() - t0, 1))
    if links:
        settings["kv_link"] = "; ".join(links) + (f" (no shaped link: {why_not})" if why_not else "")
    if calibration:
        settings["calibration"] = calibration
    return build_report(sc, settings, runs["baseline"], runs["candidate"], workers)


# CLI
def epilog() -> str:
    from pdcluster.bench.peers import WORKLOAD
    lines = ["scenarios:"]
    for s in SCENARIOS.values():
        lines.append(f"  {s.name}: {s.summary}")
        trace = s.dataset["dataset"].startswith("mooncake:")
        rate = "the trace's arrival times" if trace else f"{s.request_rate} req/s"
        lines.append(f"    workload {json.dumps(s.dataset)} at {rate}; goodput {s.goodput}; "
                     f"compares {', '.join(s.metrics)}")
    lines.append("  peers: pdcluster (1P+1D and one worker) against each --peer URL, one OpenAI client")
    lines.append(f"    workload {json.dumps(WORKLOAD)} at each --concurrency; compares output tok/s, TTFT, TPOT")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    names = sorted(SCENARIOS) + ["peers"]
    p.add_argument("name", nargs="?", choices=names, metavar="NAME",
                   help=f"scenario to run: {', '.join(names)} (peers: pdcluster against --peer servers, "
                        "bench/peers.py)")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    p.add_argument("--rounds", type=int, default=2,
                   help="baseline/candidate pairs, run alternately (2: B, C, B, C)")
    p.add_argument("--num-prompts", type=int, default=None,
                   help="override the scenario's request count (shared-prefix: spread over its groups, rounded up; "
                        "not for multi-turn or a trace replay, whose --max-requests is it; default: the scenario's)")
    p.add_argument("--request-rate", type=float, default=None,
                   help="override the scenario's rate (req/s; inf; default: the scenario's)")
    p.add_argument("--seed", type=int, default=0, help="seeds the workload and the arrivals (same for every run)")
    p.add_argument("--goodput", nargs="+", metavar="NAME:MS", default=None,
                   help="override the scenario's SLO targets, e.g. --goodput tpot:250")
    p.add_argument("--warmup", type=int, default=None,
                   help="unmeasured requests after each cluster start (default: the scenario's, 4 unless set)")
    p.add_argument("--only", choices=SIDE_NAMES, default=None,
                   help="run one side only (e.g. the baseline while the candidate's flags are not in this build)")
    p.add_argument("--max-requests", type=int, default=None, help="override a trace replay's request count")
    p.add_argument("--time-scale", type=float, default=None,
                   help="override a trace replay's time scale (replay s per trace s; lower: a higher load); "
                        "instead of its --load")
    p.add_argument("--load", type=float, default=None,
                   help="a trace replay's load: the busy share it asks of device-only's workers on this host (past "
                        "~0.87: past what they serve); a probe of this host's prefill speed sets the time scale "
                        "(bench/trace_load.py; default: the scenario's, where it has one)")
    p.add_argument("--out", default=None, help="write {scenario, baseline, candidate, ratios} JSON here")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="latency CDFs and throughput, side by side")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bars")
    from pdcluster.bench.peers import CONCURRENCY, SIDES
    peers = p.add_argument_group("peers (NAME peers)")
    peers.add_argument("--peer", action="append", metavar="[NAME=]URL",
                       help="an OpenAI-compatible server of the same model, e.g. llama=http://127.0.0.1:8103/v1 "
                            "(repeat for several; start each beforehand, and restart it between runs or give "
                            "each run its own --seed: llama-server keeps earlier runs' prompts in its slots' "
                            "cache and would serve repeats from it)")
    peers.add_argument("--sides", nargs="*", choices=sorted(SIDES), default=sorted(SIDES),
                       help="pdcluster clusters to start and measure: disagg = 1 prefill + 1 decode worker, "
                            "single = one 2-thread worker, each at the defaults; -int4: with the GGUF's 4-bit "
                            "weights packed and --cpu-compile; disagg-split: disagg-int4 with a bfloat16 prefill "
                            "pool (-f32: a float32 one); -i8: the decode worker's batches of >= 12 rows on an "
                            "int8 copy (disagg-split-i8 = deploy/pools-cpu.yaml); none: peers only")
    peers.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY),
                       help="max requests in flight, one run each")
    peers.add_argument("--input-len", type=int, default=None, help="prompt tokens (default: 128)")
    peers.add_argument("--output-len", type=int, default=None, help="output tokens (default: 64)")


def trace_override(sc: Scenario, key: str, value) -> Scenario:
    """sc with its trace replay's `key` (a TraceScale field) set to value; ValueError if sc replays no trace."""
    if not str(sc.dataset["dataset"]).startswith("mooncake:"):
        raise ValueError(f"--{key.replace('_', '-')} applies to a trace replay; {sc.name} replays none")
    return replace(sc, dataset=dict(sc.dataset, **{key: value}))


def main(a: argparse.Namespace) -> int:
    if a.list or not a.name:
        print(epilog())
        return 0 if a.list else 2
    if a.name == "peers":
        from pdcluster.bench import peers
        return peers.main(a)
    sc = SCENARIOS[a.name]
    try:
        for key in ("max_requests", "time_scale"):
            if getattr(a, key) is not None:
                sc = trace_override(sc, key, getattr(a, key))
        if a.num_prompts is not None and sc.dataset["dataset"] == "shared-prefix":  # n spread over the groups
            per_group = max(1, -(-a.num_prompts // sc.dataset["num_groups"]))
            sc = replace(sc, dataset=dict(sc.dataset, prompts_per_group=per_group))
        elif a.num_prompts is not None:
            kind = str(sc.dataset["dataset"])
            if kind == "multi-turn" or kind.startswith("mooncake:"):      # their counts are other fields
                raise ValueError(f"--num-prompts does not apply to {sc.name} ("
                                 + ("a trace replay: --max-requests" if kind != "multi-turn" else
                                    "its conversations x turns") + ")")
            sc = replace(sc, dataset=dict(sc.dataset, num_prompts=a.num_prompts))
        if a.request_rate is not None:
            sc = replace(sc, request_rate=a.request_rate)
        if a.goodput:
            sc = replace(sc, goodput=parse_goodput(a.goodput))
        if a.warmup is not None:
            sc = replace(sc, warmup=a.warmup)
        if a.load is not None and a.time_scale is not None:
            raise ValueError("give --load or --time-scale, not both")
        calibration = None
        if a.load is not None or (sc.load is not None and a.time_scale is None):
            from pdcluster.bench.trace_load import at_load
            sc, calibration = at_load(sc, a.load if a.load is not None else sc.load, a.seed)
    except ValueError as e:
        print(f"bench scenario: {e}", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(run_scenario(sc, a.rounds, a.seed, progress=not a.disable_tqdm, only=a.only,
                                          calibration=calibration))
    except (ValueError, OSError) as e:
        print(f"bench scenario: {e}", file=sys.stderr)
        return 2

    def draw(path: str) -> None:
        from pdcluster.bench.plots import plot_comparison
        plot_comparison({report[s]["label"]: report[s] for s in SIDE_NAMES if not report[s].get("not_run")}, path)
    emit(report, format_report(report), a.out, a.plot, draw)
    return 0


def emit(report: dict, table: str, out: str | None, plot: str | None, draw) -> None:
    """Print the table; write the report as JSON to `out` and draw(plot) when given."""
    print(table)
    if out:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {out}")
    if plot:
        draw(plot)
        print(f"wrote {plot}")


# The catalogue (bench/scenarios.py) registers itself into SCENARIOS on import.
from pdcluster.bench.scenarios import KV_BLOCK_BYTES  # noqa: E402,F401
