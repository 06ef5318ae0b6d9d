"""Router at fleet scale (issue 20, point 5): the REAL router bookkeeping with N simulated workers.

No Ray, no sockets: each worker is a record registered in the router's own WorkerRegistry (its
`loads_of` is what the live router hands the policy), its KV blocks reach the router's PrefixIndex
through `PrefixIndex.apply` (the call WorkerRegistry._ingest makes per block event), and each
decision is what router/lifecycle/place.py does per try: `policy.choose(len, loads_of("prefill"),
loads_of("decode"), exclude, hashes=, now=)` then `index.expect` on the chosen worker(s).

Workload (deterministic per --seed): `--groups` shared prefixes (system prompts / documents) of
8..32 blocks, popularity Zipf(1.1); each worker holds conversations = a group prefix + a unique
suffix of 4..64 blocks, until it holds entries_per_worker blocks. Chain hashes are synthetic 64-bit
splitmix64(parent ^ block id) ints (engine.hashing's real sha-based hashes cost ~us each to make;
the index only sees ints). A "long document" chain of --long-blocks blocks is held by 8 workers so
the prompt-length sweep walks every block of the prompt through the index.

Measured: (a) sustained placements/s per policy at --workers workers over an index of --blocks
held (worker, block) device entries (with --lower-share, plus host-tier entries: that share of
each worker's conversations also in its host tier), and the router's memory for that index (RSS
delta of this process, /proc/self/statm: what a router process would pay); (b) one decision's
latency vs workers at a fixed prompt, and vs prompt blocks at fixed workers, with the fitted
growth exponent (latency ~ x^k, least squares in log-log).

`cost-model/scan` is the cost model's one-pass search (CostModel.choose_scan, what `cost-model` ran
before its per-worker columns were kept across decisions, cost_vector.py), timed beside it in the
same run. With --churn each decision also charges its workers as place() does (in_flight, queued
prompt tokens) and releases the decision --churn-window decisions back, so caches of per-worker
figures see a few workers change between decisions, as in a live router.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from dataclasses import dataclass

from pdcluster.router.config import RouterConfig
from pdcluster.router.cost_config import CostConfig
from pdcluster.router.metrics import RouterMetrics
from pdcluster.router.placement import POLICY_NAMES, make_policy
from pdcluster.router.prefix_index import PrefixIndex
from pdcluster.router.registry import WorkerRegistry
from pdcluster.router.telemetry import Telemetry

_MASK = (1 << 64) - 1


def chain_hash(parent: int, block_id: int) -> int:
    """splitmix64 of parent ^ block id: a synthetic chain hash (a block's hash names its prefix)."""
    z = (parent ^ (block_id * 0x9E3779B97F4A7C15)) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def chain(parent: int, ids) -> list[int]:
    out = []
    for i in ids:
        parent = chain_hash(parent, i)
        out.append(parent)
    return out


@dataclass(frozen=True)
class Workload:
    """The shared prefixes every worker and prompt draws from. groups[g]: group g's chain hashes."""
    seed: int
    groups: tuple[tuple[int, ...], ...]
    weights: tuple[float, ...]          # Zipf(1.1) popularity of each group
    long_doc: tuple[int, ...]           # the long shared chain (prompt-length sweep)

    @classmethod
    def make(cls, seed: int = 0, n_groups: int = 256, long_blocks: int = 2048) -> Workload:
        rng = random.Random(seed)
        groups = tuple(tuple(chain(rng.getrandbits(64), range(rng.randint(8, 32)))) for _ in range(n_groups))
        weights = tuple(1.0 / (g + 1) ** 1.1 for g in range(n_groups))
        return cls(seed, groups, weights, tuple(chain(rng.getrandbits(64), range(long_blocks))))

    def conversation(self, rng: random.Random, next_id: int, suffix_blocks: int | None = None) -> list[int]:
        """A group prefix + a unique suffix (block ids from next_id, so unique per call site)."""
        g = self.groups[rng.choices(range(len(self.groups)), self.weights)[0]]
        n = rng.randint(4, 64) if suffix_blocks is None else suffix_blocks
        return list(g) + chain(g[-1], range(next_id, next_id + n))

    def worker_blocks(self, worker_index: int, entries: int) -> list[list[int]]:
        """Worker worker_index's cached conversations (one stored event each), ~entries blocks in all."""
        rng = random.Random(self.seed * 1_000_003 + worker_index)
        out, seen, held, next_id = [], set(), 0, (worker_index + 1) << 32
        while held < entries:       # held: distinct blocks (a group prefix counts once per worker)
            c = self.conversation(rng, next_id)
            next_id += len(c)
            out.append(c)
            held += len(c) - len(seen.intersection(c))
            seen.update(c)
        return out


SCAN = "cost-model/scan"        # the cost model's one-pass search, for a before / after in one run


class _ScanPolicy:
    """CostModel.choose_scan as a policy (shares the fleet's index and telemetry)."""
    def __init__(self, cm):
        self.cm = cm

    def choose(self, *a, **kw):
        return self.cm.choose_scan(*a, **kw)


class _SimWorker:
    """A simulated worker as the registry knows it: only its id (no client calls are made)."""
    def __init__(self, worker_id: str):
        self.worker_id = worker_id


@dataclass
class Fleet:
    registry: WorkerRegistry
    index: PrefixIndex
    policies: dict
    churn_window: int = 0               # > 0: charge each decision's workers, release it this many later
    _held: list = None

    def decide(self, name: str, hashes: list[int], prompt_len: int, now: float):
        """One decision as place() makes it: choose, then expect() on the worker that computes it
        (and with churn, charge the workers as place() does, releasing an older decision)."""
        reg = self.registry
        choice = self.policies[name].choose(prompt_len, reg.loads_of("prefill"), reg.loads_of("decode"),
                                            frozenset(), hashes=hashes, now=now)
        self.index.expect(choice.prefill or choice.decode, hashes, now)
        if self.churn_window:
            held = self._held if self._held is not None else []
            self._held = held
            charged = [(choice.decode, 0)] + ([(choice.prefill, prompt_len)] if choice.prefill else [])
            for w, n in charged:
                reg.charge(w, n, +1)
            held.append(charged)
            if len(held) > self.churn_window:
                for w, n in held.pop(0):
                    reg.charge(w, n, -1)
        return choice

    def release(self) -> None:
        """Release every charge churn still holds (the fleet's loads back as built)."""
        for charged in self._held or ():
            for w, n in charged:
                self.registry.charge(w, n, -1)
        self._held = []


def build_fleet(wl: Workload, n_workers: int, entries: int, policies=POLICY_NAMES, prefill_share: float = 0.5,
                now: float = 1e6, progress: bool = False, lower_share: float = 0.0) -> Fleet:
    """n_workers workers (prefill_share of them prefill), ~entries (worker, block) device entries in the
    index; lower_share of each worker's conversations are also in its host tier (written behind):
    host-tier entries, whose index cost issue 19 bounds."""
    from tqdm import tqdm
    cost_cfg = CostConfig()
    index, telemetry = PrefixIndex(), Telemetry(cost_cfg)
    reg = WorkerRegistry(RouterConfig(), RouterMetrics(_fresh_prom()), index, telemetry)
    n_p = max(1, round(n_workers * prefill_share))
    rng = random.Random(wl.seed + 7)
    per = max(1, entries // n_workers)
    holders_of_long = set(rng.sample(range(n_workers), min(8, n_workers)))
    tier_rng = random.Random(wl.seed + 11)      # apart: lower_share=0 builds the same fleet as before tiers
    for i in tqdm(range(n_workers), desc=f"build {n_workers}w/{entries:,} blocks", disable=not progress):
        role = "prefill" if i < n_p else "decode"
        wid = f"{role[0]}{i}"
        reg.add(role, _SimWorker(wid), zone=f"z{i % 4}")
        w = reg.loads[wid]
        # what a status poll would have set (WorkerRegistry._ingest), and fixed rates so the cost
        # model's learned figures are all known
        w.num_blocks, w.free_blocks = 20_000, rng.randint(2_000, 20_000)
        w.running, w.in_flight, w.queued_tokens = rng.randint(0, 32), rng.randint(0, 8), rng.randint(0, 8192)
        w.prefill_tps, w.decode_step_s = 8_000.0, (0.02, 0.0005)
        seq = 0
        for conv in wl.worker_blocks(i, per):
            seq += 1
            index.apply(wid, "stored", conv, seq=seq, now=now)
            if lower_share and tier_rng.random() < lower_share:
                seq += 1
                index.apply(wid, "stored", conv, seq=seq, now=now, tier="host")
        if i in holders_of_long:
            seq += 1
            index.apply(wid, "stored", wl.long_doc, seq=seq, now=now)
        index.heartbeat(wid, seq=seq, now=now)
    pols = {}
    for name in policies:
        if name == SCAN:
            pols[name] = _ScanPolicy(make_policy("cost-model", index=index, telemetry=telemetry, config=cost_cfg))
        else:
            pols[name] = make_policy(name, index=index, telemetry=telemetry, config=cost_cfg)
        if hasattr(pols[name], "warm"):         # as the Router does at start: compiled pricing loaded
            pols[name].warm()
    return Fleet(reg, index, pols)


def _fresh_prom():
    from prometheus_client import CollectorRegistry
    return CollectorRegistry()


def prompts(wl: Workload, n: int, blocks: int, seed: int = 1) -> list[list[int]]:
    """n prompts of exactly `blocks` blocks: a popular group prefix + a new suffix (mostly a prefix hit)."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        c = wl.conversation(rng, (1 << 62) + k * 4096, suffix_blocks=blocks)
        out.append(c[:blocks])
    return out


def time_decisions(fleet: Fleet, name: str, ps: list[list[int]], block_size: int, budget_s: float,
                   now: float = 1e6, min_calls: int = 1, cpu: bool = False):
    """Decisions made over ps (cycled) until budget_s; returns (count, seconds), with cpu also this
    process's CPU seconds (on shared cores: what the decisions cost their core, waits for it left out)."""
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while True:
        h = ps[n % len(ps)]
        fleet.decide(name, h, len(h) * block_size, now)
        n += 1
        el = time.perf_counter() - t0
        if el >= budget_s and n >= min_calls:
            return (n, el, time.process_time() - c0) if cpu else (n, el)


def fit_exponent(xs, ys) -> float:
    """k of y ~ c * x^k: least squares slope of log y on log x (needs >= 2 distinct x, y > 0)."""
    if len(xs) != len(ys) or len(set(xs)) < 2 or min(ys) <= 0 or min(xs) <= 0:
        raise ValueError("fit_exponent needs >= 2 distinct positive x and positive y")
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def table(header: list[str], rows: list[list]) -> str:
    """A markdown table; floats to 4 significant digits."""
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def sweep(wl, axis_values, make_fleet, make_prompts, policies, budget_s, block_size, progress):
    """{policy: [us per decision for each axis value]}."""
    from tqdm import tqdm
    out = {p: [] for p in policies}
    for v in tqdm(axis_values, desc="sweep", disable=not progress):
        fleet, ps = make_fleet(v), make_prompts(v)
        for p in policies:
            n, el = time_decisions(fleet, p, ps, block_size, budget_s)
            out[p].append(el / n * 1e6)
    return out


def plot(result: dict, path: str) -> None:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(12, 5), layout="constrained")
    a, b = fig.subplots(1, 2)
    for ax, key, xl in ((a, "by_workers", "workers"), (b, "by_blocks", "prompt blocks")):
        s = result[key]
        for p, ys in s["us"].items():
            ax.plot(s["x"], ys, marker="o", label=f"{p} (k={s['exponent'][p]:.2f})")
        ax.set(xscale="log", yscale="log", xlabel=xl, ylabel="us per placement decision",
               title=f"decision latency vs {xl}")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.savefig(path, dpi=100)


def build_parser() -> argparse.ArgumentParser:
    from pdcluster.deploy.cli import HelpFormatter
    ap = argparse.ArgumentParser(prog="python -m pdcluster.bench.router_scale", description=__doc__.split("\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--workers", type=int, default=1000, help="workers in the sustained-rate fleet")
    ap.add_argument("--blocks", type=int, default=10_000_000, help="(worker, block) entries in its prefix index")
    ap.add_argument("--policies", default=",".join(POLICY_NAMES + (SCAN,)),
                    help=f"comma-separated placement policies ({SCAN}: the cost model's one-pass search)")
    ap.add_argument("--prompt-blocks", type=int, default=64, help="prompt length, blocks (sustained + workers sweep)")
    ap.add_argument("--sweep-workers", default="10,100,1000,2000", help="workers sweep, comma-separated worker counts")
    ap.add_argument("--sweep-entries-per-worker", type=int, default=500, help="index blocks per worker in sweeps")
    ap.add_argument("--sweep-blocks", default="16,64,256,1024,2048",
                    help="prompt-blocks sweep, comma-separated prompt lengths in blocks (at --sweep-fixed-workers)")
    ap.add_argument("--sweep-fixed-workers", type=int, default=100, help="workers in the prompt-blocks sweep")
    ap.add_argument("--budget-s", type=float, default=0.5, help="seconds per timed cell (at least one decision)")
    ap.add_argument("--sustain-s", type=float, default=3.0, help="seconds per policy for the sustained rate")
    ap.add_argument("--lower-share", type=float, default=0.0,
                    help="share of each worker's conversations also held in its host tier (sustained fleet)")
    ap.add_argument("--churn", action="store_true",
                    help="sustained: each decision charges its workers as place() does and releases an older one")
    ap.add_argument("--churn-window", type=int, default=64, help="with --churn: decisions held at once")
    ap.add_argument("--skip-sustained", action="store_true", help="skip the sustained-rate run")
    ap.add_argument("--skip-sweeps", action="store_true", help="skip the workers and prompt-blocks sweeps")
    ap.add_argument("--seed", type=int, default=0, help="seeds the synthetic workload")
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    ap.add_argument("--plot", default=None, help="PNG of latency vs workers and vs prompt blocks")
    ap.add_argument("--disable-tqdm", action="store_true", help="no progress bars")
    return ap


def main(argv=None) -> None:
    a = build_parser().parse_args(argv)
    policies = [p for p in a.policies.split(",") if p]
    prog = not a.disable_tqdm
    bs = CostConfig().block_size
    wl = Workload.make(a.seed, long_blocks=max(int(x) for x in a.sweep_blocks.split(",")))
    result: dict = {"args": vars(a)}
    if not a.skip_sustained:
        rss0, t0 = rss_bytes(), time.perf_counter()
        fleet = build_fleet(wl, a.workers, a.blocks, policies, progress=prog, lower_share=a.lower_share)
        build_s, mem = time.perf_counter() - t0, rss_bytes() - rss0
        entries = sum(fleet.index.num_blocks(w) + fleet.index.num_blocks(w, "lower") for w in fleet.index.workers)
        distinct = fleet.index.num_hashes()
        ps = prompts(wl, 256, a.prompt_blocks)
        rows = []
        fleet.churn_window = a.churn_window if a.churn else 0
        for p in policies:
            n, el, cpu = time_decisions(fleet, p, ps, bs, a.sustain_s, cpu=True)
            fleet.release()
            rows.append([p, n, n / el, el / n * 1e6, n / cpu, cpu / n * 1e6])
        result["sustained"] = dict(workers=a.workers, entries=entries, distinct_hashes=distinct, build_s=build_s,
                                   rss_delta_bytes=mem, bytes_per_entry=mem / entries,
                                   churn_window=fleet.churn_window, load_average=os.getloadavg(),
                                   rows={r[0]: {"decisions": r[1], "per_s": r[2], "us": r[3], "per_cpu_s": r[4],
                                                "cpu_us": r[5]} for r in rows})
        print(f"\nfleet: {a.workers} workers, {entries:,} (worker, block) entries, {distinct:,} distinct hashes; "
              f"built in {build_s:.1f}s; router RSS delta {mem / 2**30:.2f} GiB = {mem / entries:.0f} B/entry")
        print(f"load average (1, 5, 15 min) at the end: {os.getloadavg()}")
        print(table(["policy", "decisions", "placements/s", "us/decision", "placements/cpu-s", "cpu us/decision"],
                    rows))
        del fleet
    if a.skip_sweeps:
        if a.json:
            with open(a.json, "w") as f:
                json.dump(result, f, indent=1)
        return
    xs = [int(x) for x in a.sweep_workers.split(",")]
    us = sweep(wl, xs, lambda n: build_fleet(wl, n, n * a.sweep_entries_per_worker, policies),
               lambda n: prompts(wl, 64, a.prompt_blocks), policies, a.budget_s, bs, prog)
    result["by_workers"] = dict(x=xs, us=us, exponent={p: fit_exponent(xs, us[p]) for p in policies})
    ys = [int(x) for x in a.sweep_blocks.split(",")]
    fixed = build_fleet(wl, a.sweep_fixed_workers, a.sweep_fixed_workers * a.sweep_entries_per_worker, policies)
    usb = sweep(wl, ys, lambda n: fixed, lambda n: [list(wl.long_doc[:n])], policies, a.budget_s, bs, prog)
    result["by_blocks"] = dict(x=ys, us=usb, exponent={p: fit_exponent(ys, usb[p]) for p in policies})
    for key, label in (("by_workers", "workers"), ("by_blocks", "prompt blocks")):
        s = result[key]
        print(f"\nus per decision vs {label} (fitted exponent k: latency ~ x^k)")
        print(table([label] + policies, [[x] + [s["us"][p][i] for p in policies] for i, x in enumerate(s["x"])]
                    + [["k"] + [s["exponent"][p] for p in policies]]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    if a.plot:
        plot(result, a.plot)


if __name__ == "__main__":
    main()
