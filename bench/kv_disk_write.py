"""The disk tier's block files written past the page cache (O_DIRECT) against through it, on this host's disk.

    python -m pdcluster.bench.kv_disk_write --out bench/kv-disk-write.json --plot bench/kv-disk-write.png

Each round writes --blocks blocks of SmolLM2-135M's float32 KV (737,280 bytes each, from a strided staging view,
as the tier's writer does) through kv_transfer/tiers/disk.py's DiskStore once with O_DIRECT and once through the
page cache (one torch thread, as a one-thread worker's writer), alternating which goes first, into fresh
directories, so the page cache grows as a filling disk tier's does. Then it reads every block back as a disk hit
does (DiskStore.read). Per block: wall ms, this process's CPU ms (user + system) and the whole host's busy CPU ms
(/proc/stat: the kernel's writeback threads included).
Medians over the rounds; ratio = page cache / O_DIRECT (above 1: O_DIRECT costs less).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import tempfile
import time

import torch

from pdcluster.kv_transfer.tiers.block_format import Geometry
from pdcluster.kv_transfer.tiers.disk import DiskStore

GEOM = Geometry(30, 16, 3, 64, torch.float32)      # SmolLM2-135M: 30 layers, 16-token blocks, 3 KV heads of 64
MODES = ("o_direct", "page_cache")
KEYS = ("write_wall_ms", "write_cpu_ms", "write_host_cpu_ms", "read_wall_ms", "read_cpu_ms", "read_host_cpu_ms")


def host_busy_s() -> float:
    """Seconds of busy CPU on the whole host since boot (/proc/stat: every field but idle and iowait)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def one(mode: str, blocks: int, parent: str, staging: torch.Tensor) -> dict:
    d = tempfile.mkdtemp(prefix=f"kvdw-{mode}-", dir=parent)
    try:
        store = DiskStore(d, GEOM)
        store.direct = mode == "o_direct" and store.direct
        out = {"direct": store.direct}
        for phase in ("write", "read"):
            t, c, h = time.perf_counter(), cpu_s(), host_busy_s()
            for i in range(blocks):
                if phase == "write":
                    store.write(i + 1, staging[:, i % staging.shape[1]], None)
                else:
                    store.read(i + 1)
            if phase == "write":
                os.sync()                               # the page cache's writeback counts against it
            out[f"{phase}_wall_ms"] = (time.perf_counter() - t) * 1e3 / blocks
            out[f"{phase}_cpu_ms"] = (cpu_s() - c) * 1e3 / blocks
            out[f"{phase}_host_cpu_ms"] = (host_busy_s() - h) * 1e3 / blocks
        return out
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main(argv=None) -> int:
    from pdcluster.deploy.cli import HelpFormatter
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--blocks", type=int, default=1000, help="blocks written and read per run")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each mode, alternated")
    ap.add_argument("--dir", default=None, help="where to write (default: the system's temporary directory)")
    ap.add_argument("--out", default=None, help="write the result JSON here")
    ap.add_argument("--plot", default=None, help="write a PNG of the medians here")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)                                      # as a one-thread worker's writer thread
    staging = torch.randn(GEOM.shape[0], 8, *GEOM.shape[1:])      # a copy-out of 8 blocks: [2L, n, bs, h, d]
    runs = {m: [] for m in MODES}
    for r in range(a.rounds):
        for m in (MODES if r % 2 == 0 else MODES[::-1]):
            runs[m].append(one(m, a.blocks, a.dir or tempfile.gettempdir(), staging))
            print(f"round {r + 1} {m:10}", "  ".join(f"{k} {runs[m][-1][k]:.3f}" for k in KEYS), flush=True)
    if not runs["o_direct"][0]["direct"]:
        print("this filesystem refuses O_DIRECT: both modes wrote through the page cache")
    med = {m: {k: statistics.median(x[k] for x in runs[m]) for k in KEYS} for m in MODES}
    ratio = {k: med["page_cache"][k] / med["o_direct"][k] if med["o_direct"][k] else None for k in KEYS}
    print(f"\n{GEOM.block_bytes:,}-byte blocks, {a.blocks} per run, median of {a.rounds} rounds (ms per block):")
    print(f"{'':22}" + "".join(f"{k:>19}" for k in KEYS))
    for m in MODES:
        print(f"{m:22}" + "".join(f"{med[m][k]:19.3f}" for k in KEYS))
    print(f"{'page_cache / o_direct':22}" + "".join(f"{ratio[k]:18.2f}x" if ratio[k] else f"{'-':>19}" for k in KEYS))
    result = dict(blocks=a.blocks, rounds=a.rounds, block_bytes=GEOM.block_bytes, runs=runs, median=med, ratio=ratio)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    if a.plot:
        plot(med, a.plot)
    return 0


def plot(med: dict, path: str) -> None:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax = fig.subplots()
    width = 0.4
    for j, m in enumerate(MODES):
        ax.bar([i + (j - 0.5) * width for i in range(len(KEYS))], [med[m][k] for k in KEYS], width, label=m)
    ax.set_xticks(range(len(KEYS)), [k.replace("_ms", "") for k in KEYS], rotation=15)
    ax.set(ylabel="ms per block (median)", title="disk tier: a 737 KB KV block written and read back")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
