"""TTFT of a prompt whose prefix is a host- or disk-tier hit: loaded whole before the step (the old
path) vs layer by layer inside the step that computes the tail (issue 19 point 1, kv_transfer/tiers/).

    python -m pdcluster.bench.tier_layerwise [--tier host|disk] [--prefix-len 1024] [--tail-len 32]
        [--repeats 5] [--plot F.png]

One offline engine (the embedded model, float32 KV, --threads torch threads), its KV connector swapped
between the two sides (TierConfig.layerwise False / True), so both share weights, pool and machine.
Each repeat: a fresh prefix + tail computed once (cold: the prefix lands in the device pool), then
both sides, alternating which goes first; per side (its own tier attached: --tier):
  host    the device pool evicted (every free block handed out once: the prefix goes to this side's
          tier), then prefix + a new tail: the prefix loads back from that tier, the tail computes
          (JSON key host_ms: the lower-tier hit, host or disk);
  device  prefix + another tail at once (the prefix is in the device pool again): the floor.
"host - device" per repeat is the load's exposed time.
--tier disk: a disk-only tier in a fresh directory per side and repeat (under --disk-dir); after the
eviction every block file is fsynced and dropped from the page cache (posix_fadvise DONTNEED, those
files only), so the hit reads the storage device, each layer checked (disk.py's row crcs).
TTFT is add_request to the first token on an idle engine, stepping it in a loop (an idle step
polls the loader every 1 ms, as the engine does). Medians over the repeats; ratios side by side.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time

from pdcluster.bench import outputs
from pdcluster.engine.kv_connector import KVConnector
from pdcluster.engine.llm_engine import LLMEngine, build_config
from pdcluster.engine.sampling_params import SamplingParams
from pdcluster.kv_transfer.tiers import MultiConnector, TierConfig, TierConnector

BS = 16
SIDES = ("whole-block", "layerwise")


def ttft(engine: LLMEngine, ids: list[int], rid: str) -> tuple[float, int, int]:
    """(ms to the first token, cached tokens, engine steps until then)."""
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    req = engine.add_request(ids, params, request_id=rid, detokenize=False)
    steps = 0
    while not req.is_finished:
        engine.step()
        steps += 1
    return (time.perf_counter() - t0) * 1e3, req.num_cached_tokens, steps


def attach(engine: LLMEngine, tiers: TierConnector) -> None:
    engine.connector = MultiConnector(tiers, KVConnector())


def evict(engine: LLMEngine, tiers: TierConnector) -> None:
    """Other traffic, in effect: every free block handed out once (the cached prefix leaves the device
    pool; the attached tiers copy it out), then freed uncached. A disk tier's files then leave the page
    cache (so the hit reads the device)."""
    pool = engine.kv.pool
    pool.free(pool.allocate(pool.num_free_blocks))
    tiers.wait_idle(120)
    if tiers.disk is not None:
        for f in tiers.disk.dir.glob("*.kvb"):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def one_side(engine: LLMEngine, tiers: TierConnector, prefix: list[int], tails: list[list[int]], tag: str) -> dict:
    """The prefix is in the device pool: evict it into this side's tier, then time a tier hit and
    a device hit."""
    attach(engine, tiers)
    tiers.wait_idle(120)                        # a disk tier scans its (empty) directory first
    f0 = tiers.figures()[0]
    evict(engine, tiers)
    out = {}
    out["host_ms"], out["host_cached"], out["host_steps"] = ttft(engine, prefix + tails[0], f"{tag}-host")
    out["device_ms"], out["device_cached"], _ = ttft(engine, prefix + tails[1], f"{tag}-device")
    f = tiers.figures()[0]
    assert f["corrupt"] == f0["corrupt"] and f["load_failures"] == f0["load_failures"], f
    out["host_hits"], out["load_ms"] = f["hits"] - f0["hits"], (f["load_sum_s"] - f0["load_sum_s"]) * 1e3
    return out


def plot(result: dict, path: str) -> None:
    """Per repeat: each side's host-hit and device-hit TTFT (grouped bars), one PNG."""
    import numpy as np
    from matplotlib.figure import Figure
    runs = result["runs"]
    n = len(runs[SIDES[0]])
    x = np.arange(n)
    fig = Figure(figsize=(10, 4.5), layout="constrained")
    ax = fig.subplots()
    w = 0.2
    for i, (side, key) in enumerate((("whole-block", "host_ms"), ("layerwise", "host_ms"),
                                     ("whole-block", "device_ms"), ("layerwise", "device_ms"))):
        ax.bar(x + (i - 1.5) * w, [r[key] for r in runs[side]], w,
               label=f"{side}: {result['args'].get('tier', 'host') + ' hit' if key == 'host_ms' else 'device hit'}")
    ax.set(title=f"TTFT with a {result['args']['prefix_len']}-token prefix in the "
                 f"{result['args'].get('tier', 'host')} tier "
                 f"(+{result['args']['tail_len']} computed): whole-block load vs layer by layer",
           xlabel="repeat", ylabel="ms", xticks=x)
    top = max(r[k] for side in SIDES for r in runs[side] for k in ("host_ms", "device_ms"))
    ax.set_ylim(0, top * 1.3)
    ax.legend(ncol=2, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    from pdcluster.deploy.cli import HelpFormatter
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--tier", choices=("host", "disk"), default="host", help="the lower tier the prefix loads from")
    ap.add_argument("--disk-dir", default=None, help="--tier disk: where its directories go (default: a temp dir)")
    ap.add_argument("--prefix-len", type=int, default=1024, help="tokens of the cached prefix (whole blocks)")
    ap.add_argument("--tail-len", type=int, default=32, help="tokens computed after the prefix")
    ap.add_argument("--repeats", type=int, default=5, help="repeats of both sides, alternating which goes first")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    outputs.add_args(ap, "bench/tier-layerwise.json", plot_help="PNG of the per-repeat TTFTs (bench/plots.py style)")
    a = ap.parse_args(argv)
    if outputs.replotted(a, plot, "bench/tier-layerwise.png"):
        return 0
    if a.prefix_len % BS or a.prefix_len <= 0 or a.tail_len <= 0:
        raise ValueError(f"--prefix-len must be a positive multiple of {BS} and --tail-len positive")
    n_blocks = (a.prefix_len + a.tail_len) // BS + 2
    engine = LLMEngine(build_config(num_blocks=2 * n_blocks, max_num_batched_tokens=4096, num_threads=a.threads))
    engine.warmup()
    rng = random.Random(0)
    vocab = engine.cfg.model.vocab_size
    rows = {s: [] for s in SIDES}
    cold = []
    tier_bytes = 2 * n_blocks * (engine.kv_block_bytes() + 4096)      # (a disk file's header included)
    root = tempfile.TemporaryDirectory(dir=a.disk_dir, prefix="tier-layerwise-")

    def tier_config(side: str, rep: int) -> TierConfig:
        if a.tier == "host":
            return TierConfig(host_bytes=tier_bytes, layerwise=side == "layerwise")
        return TierConfig(disk_dir=os.path.join(root.name, f"{side}-{rep}"), disk_bytes=tier_bytes,
                          layerwise=side == "layerwise")
    print(f"prefix {a.prefix_len} tokens ({a.prefix_len // BS} blocks of {engine.kv_block_bytes() / 2**20:.2f} MiB) "
          f"+ tail {a.tail_len}; {a.repeats} repeats")
    for rep in range(a.repeats):
        prefix = [rng.randrange(100, vocab) for _ in range(a.prefix_len)]     # fresh each repeat: no stale hits
        tails = [[rng.randrange(100, vocab) for _ in range(a.tail_len)] for _ in range(5)]
        engine.kv.pool.reset_prefix_cache()
        tiers = {s: TierConnector(tier_config(s, rep), engine.block_events())
                 for s in SIDES}                # fresh each repeat: earlier prefixes, loaded back, are protected
        order = SIDES if rep % 2 == 0 else SIDES[::-1]
        attach(engine, tiers[order[0]])
        c, _, _ = ttft(engine, prefix + tails[4], f"cold-{rep}")         # computed: the prefix is in the device pool
        cold.append(c)
        line = f"  rep {rep}: cold {c:8.1f} ms"
        for side in order:
            r = one_side(engine, tiers[side], prefix, tails[2 * SIDES.index(side):], f"{side}-{rep}")
            assert r["host_cached"] == a.prefix_len and r["host_hits"] == a.prefix_len // BS, r
            rows[side].append(r)
            line += (f" | {side}: {a.tier} hit {r['host_ms']:7.1f} ({r['host_steps']} steps, load {r['load_ms']:5.1f})"
                     f" device hit {r['device_ms']:7.1f}")
        print(line, flush=True)
        engine.connector = KVConnector()
        for t in tiers.values():
            t.close()
    keys = ("host_ms", "device_ms", "load_ms")
    med = {s: {k: statistics.median(x[k] for x in rows[s]) for k in keys} for s in SIDES}
    exposed = {s: statistics.median(x["host_ms"] - x["device_ms"] for x in rows[s]) for s in SIDES}
    ratio = med["whole-block"]["host_ms"] / med["layerwise"]["host_ms"]
    print(f"\ncold (computed) median {statistics.median(cold):.1f} ms")
    print(f"{'median ms':12} {a.tier + ' hit':>9} {'device hit':>11} {a.tier + ' - device':>14} {'load':>7}")
    for s in SIDES:
        m = med[s]
        print(f"{s:12} {m['host_ms']:9.1f} {m['device_ms']:11.1f} {exposed[s]:14.1f} {m['load_ms']:7.1f}")
    print(f"{a.tier}-hit TTFT whole-block / layerwise: {ratio:.2f}x (median of each side); the load's exposed time "
          f"({a.tier} hit - device hit, per repeat, median): {exposed['whole-block']:.1f} -> {exposed['layerwise']:.1f} ms")
    root.cleanup()
    result = dict(args=vars(a), cold_ms=cold, runs=rows, median=med, exposed_ms=exposed, host_ttft_ratio=ratio)
    outputs.save(a, result, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
