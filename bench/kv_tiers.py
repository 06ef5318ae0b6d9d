"""KV cache tiers (issue 19): what write-behind costs the decode, and how warm a restarted worker comes back.

    python -m pdcluster.bench.kv_tiers [--requests 24] [--concurrency 8] [--prompt-len 256] [--output-len 32]
                                       [--repeats 3] [--restart-prompt-len 1024] [--out bench/kv-tiers.json]

One offline engine (the embedded model, float32 KV, --threads torch threads), its KV connector swapped
between runs, so both sides share weights, pool and machine state.

write-behind  --requests unique prompts, --concurrency at a time, through a device pool only a little
              larger than the running batch: every admission evicts the cached blocks of finished
              prompts. Baseline: no tiers. Candidate ("tiers"): host + disk tiers on, writing through
              (the default): each computed block is copied out on the engine thread (timed) and the
              writer thread stores it (host pool, one file each); evicting it later copies nothing.
              "write-back": the same tiers storing evicted blocks only (--kv-tier-write-back). Runs
              alternate baseline / tiers / write-back --repeats times; TPOT is per request
              ((last token - first token) / (n - 1), wall clock around engine.step, so the eviction
              copy, which runs in the scheduler, counts), the median run of each side is reported.
warm restart  One --restart-prompt-len prompt: TTFT cold (computed), warm (its prefix in the device
              pool: the worker before a restart), from the host tier (evicted by other prompts), and
              after a restart: the tiers rebuilt on the same directory (the host pool is gone), the
              device pool emptied, the disk tier verified (scan time reported) and the prompt run
              again, its prefix loaded from disk. TTFT is add_request to the first token on an idle engine.
              Then the same restart for a prompt still in the device pool when the worker stops (nothing
              evicted it: a hot prefix), with write-back (blocks go below only when evicted: the restart
              finds nothing) and with write-through (the default: stored as computed).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from pdcluster.engine.kv_connector import KVConnector
from pdcluster.engine.llm_engine import LLMEngine, build_config
from pdcluster.engine.sampling_params import SamplingParams
from pdcluster.kv_transfer.tiers import MultiConnector, TierConfig, TierConnector

BS = 16


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]


def drive(engine: LLMEngine, batch: list[list[int]], out_len: int, salt: str) -> dict:
    """Run every prompt (the scheduler batches up to max_num_seqs); per-request TTFT and TPOT (s)."""
    params = SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    reqs = {engine.add_request(ids, params, request_id=f"{salt}-{i}", cache_salt=salt, detokenize=False).request_id:
            None for i, ids in enumerate(batch)}
    first, last, steps = {}, {}, 0
    while len(last) < len(reqs):
        outs = engine.step()
        now = time.perf_counter()
        steps += 1
        for o in outs:
            rid = o.request.request_id
            first.setdefault(rid, now)
            if o.finished:
                last[rid] = now
    tpot = [(last[r] - first[r]) / (out_len - 1) for r in reqs]
    return dict(tpot_ms=statistics.mean(tpot) * 1e3, ttft_ms=statistics.mean(first[r] - t0 for r in reqs) * 1e3,
                wall_s=time.perf_counter() - t0, steps=steps)


def with_tiers(engine: LLMEngine, cfg: TierConfig | None) -> TierConnector | None:
    tiers = TierConnector(cfg, engine.block_events()) if cfg else None
    engine.connector = MultiConnector(tiers, KVConnector()) if tiers else KVConnector()
    if tiers:
        tiers.wait_idle()
    return tiers


def write_behind(engine: LLMEngine, a, tmp: Path) -> dict:
    bb = engine.kv_block_bytes()
    rows = {"baseline": [], "tiers": [], "write-back": []}
    snaps = []
    vocab = engine.cfg.model.vocab_size
    for rep in range(a.repeats):
        for side in ("baseline", "tiers", "write-back"):
            cfg = TierConfig(host_bytes=a.host_blocks * bb, disk_dir=str(tmp / f"wb-{rep}-{side}"),
                             disk_bytes=a.host_blocks * (bb + 64),
                             write_through=side == "tiers") if side != "baseline" else None
            tiers = with_tiers(engine, cfg)
            engine.kv.pool.reset_prefix_cache()
            batch = prompts(a.requests, a.prompt_len, vocab, seed=rep)      # same prompts on both sides
            r = drive(engine, batch, a.output_len, salt=f"{side}-{rep}")
            if tiers:
                t = time.perf_counter()
                tiers.wait_idle(120)
                s = tiers.snapshot.as_dict()
                r |= dict(snapshot_blocks=s["blocks"], snapshot_ms=s["seconds"] * 1e3,
                          snapshot_ms_per_step=s["seconds"] * 1e3 / r["steps"], dropped=s["dropped"],
                          writer_tail_s=time.perf_counter() - t,
                          stored={f["tier"]: f["stored"] for f in tiers.figures()})
                snaps.append(s)
                tiers.close()
            rows[side].append(r)
            print(f"  {side:8} rep {rep}: TPOT {r['tpot_ms']:7.2f} ms  TTFT {r['ttft_ms']:8.1f} ms  "
                  f"wall {r['wall_s']:6.2f} s  steps {r['steps']}"
                  + (f"  copied {r['snapshot_blocks']} blocks in {r['snapshot_ms']:.1f} ms "
                     f"({r['snapshot_ms_per_step']:.3f} ms/step), dropped {r['dropped']}" if tiers else ""),
                  flush=True)
    with_tiers(engine, None)
    med = {side: statistics.median(x["tpot_ms"] for x in v) for side, v in rows.items()}
    return dict(runs=rows, median_tpot_ms=med, tpot_ratio=med["tiers"] / med["baseline"],
                write_back_tpot_ratio=med["write-back"] / med["baseline"])


def ttft(engine: LLMEngine, ids: list[int], rid: str) -> tuple[float, int]:
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    req = engine.add_request(ids, params, request_id=rid, cache_salt="restart", detokenize=False)
    while not req.is_finished:
        engine.step()
    return (time.perf_counter() - t0) * 1e3, req.num_cached_tokens


def evict(engine: LLMEngine, tiers: TierConnector) -> None:
    """Other prompts' traffic, in effect: every free device block handed out once, then freed uncached."""
    pool = engine.kv.pool
    pool.free(pool.allocate(pool.num_free_blocks))
    tiers.wait_idle(120)


def resident_restart(engine: LLMEngine, ids: list[int], cfg: TierConfig, rid: str) -> tuple[float, int]:
    """The prompt computed and still in the device pool when the worker restarts (no eviction):
    (TTFT ms, cached tokens) after the restart."""
    engine.kv.pool.reset_prefix_cache()
    tiers = with_tiers(engine, cfg)
    ttft(engine, ids, f"{rid}-computed")
    tiers.wait_idle(120)
    tiers.close()
    engine.kv.pool.reset_prefix_cache()                       # the restart
    tiers = with_tiers(engine, cfg)
    out = ttft(engine, ids, f"{rid}-restarted")
    tiers.close()
    with_tiers(engine, None)
    return out


def warm_restart(engine: LLMEngine, a, tmp: Path) -> dict:
    bb = engine.kv_block_bytes()
    n_blocks = a.restart_prompt_len // BS + 2
    cfg = TierConfig(host_bytes=2 * n_blocks * bb, disk_dir=str(tmp / "restart"), disk_bytes=2 * n_blocks * (bb + 64))
    (ids,) = prompts(1, a.restart_prompt_len, engine.cfg.model.vocab_size, seed=99)
    engine.kv.pool.reset_prefix_cache()
    tiers = with_tiers(engine, cfg)
    out = {}
    out["cold_ms"], _ = ttft(engine, ids, "cold")
    out["device_ms"], out["device_cached"] = ttft(engine, ids, "device")
    evict(engine, tiers)
    out["host_ms"], out["host_cached"] = ttft(engine, ids, "host")
    evict(engine, tiers)
    tiers.close()
    engine.kv.pool.reset_prefix_cache()                       # a restarted worker's device pool is empty
    t = time.perf_counter()
    tiers = with_tiers(engine, cfg)                           # returns once the disk is verified
    out["scan_ms"] = (time.perf_counter() - t) * 1e3
    out["disk_blocks"] = tiers.figures()[1]["blocks"]
    out["restart_ms"], out["restart_cached"] = ttft(engine, ids, "restart")
    out["restart_disk_hits"] = tiers.figures()[1]["hits"]
    tiers.close()
    with_tiers(engine, None)
    for wt in (False, True):
        key = "resident_wt" if wt else "resident_wb"
        out[f"{key}_ms"], out[f"{key}_cached"] = resident_restart(engine, ids, replace(
            cfg, disk_dir=str(tmp / key), write_through=wt), key)
    out["restart_vs_device"] = out["restart_ms"] / out["device_ms"]
    out["restart_vs_host"] = out["restart_ms"] / out["host_ms"]
    out["restart_vs_cold"] = out["restart_ms"] / out["cold_ms"]
    return out


def main(argv: list[str] | None = None) -> int:
    from pdcluster.deploy.cli import HelpFormatter
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--requests", type=int, default=24, help="prompts per write-behind run")
    ap.add_argument("--concurrency", type=int, default=8, help="requests batched at a time (max_num_seqs)")
    ap.add_argument("--prompt-len", type=int, default=256, help="tokens per write-behind prompt")
    ap.add_argument("--output-len", type=int, default=32, help="greedy tokens per request")
    ap.add_argument("--repeats", type=int, default=3, help="baseline/candidate pairs, alternating")
    ap.add_argument("--host-blocks", type=int, default=512, help="host (and disk) tier capacity, blocks")
    ap.add_argument("--restart-prompt-len", type=int, default=1024, help="tokens of the warm-restart prompt")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--dir", default=None, help="where the disk tiers go (default: a temporary directory)")
    ap.add_argument("--out", default="bench/kv-tiers.json", help="JSON results")
    a = ap.parse_args(argv)
    per_req = -(-(a.prompt_len + a.output_len) // BS)
    num_blocks = max(a.concurrency * per_req + a.concurrency, a.restart_prompt_len // BS + 4)
    engine = LLMEngine(build_config(num_blocks=num_blocks, max_num_seqs=a.concurrency,
                                    max_num_batched_tokens=2048, num_threads=a.threads))
    engine.warmup()
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        tmp = Path(d)
        print(f"write-behind: {a.requests} prompts x {a.prompt_len} tokens, {a.output_len} out, concurrency "
              f"{a.concurrency}, device pool {num_blocks} blocks of {engine.kv_block_bytes() / 2**20:.2f} MiB")
        wb = write_behind(engine, a, tmp)
        m = wb["median_tpot_ms"]
        print(f"TPOT median: baseline {m['baseline']:.2f} ms, tiers (write-through, the default) {m['tiers']:.2f} ms, "
              f"ratio {wb['tpot_ratio']:.3f} (target <= 1.05); write-back {m['write-back']:.2f} ms, "
              f"ratio {wb['write_back_tpot_ratio']:.3f}")
        print(f"warm restart: one prompt of {a.restart_prompt_len} tokens")
        wr = warm_restart(engine, a, tmp)
        print(f"{'TTFT ms':>10} {'cold':>8} {'device':>8} {'host':>8} {'restart(disk)':>14} {'scan':>8}")
        print(f"{'':>10} {wr['cold_ms']:8.1f} {wr['device_ms']:8.1f} {wr['host_ms']:8.1f} {wr['restart_ms']:14.1f} "
              f"{wr['scan_ms']:8.1f}")
        print(f"restart / device-warm {wr['restart_vs_device']:.2f}x, / host {wr['restart_vs_host']:.2f}x, / cold "
              f"{wr['restart_vs_cold']:.2f}x (target: restart within 1.5x of before); cached tokens "
              f"device {wr['device_cached']} host {wr['host_cached']} restart {wr['restart_cached']} "
              f"({wr['disk_blocks']} blocks verified on disk, {wr['restart_disk_hits']} loaded)")
        print(f"restart of a prompt still in the device pool (never evicted): write-back {wr['resident_wb_ms']:.1f} ms "
              f"({wr['resident_wb_cached']} cached tokens), write-through {wr['resident_wt_ms']:.1f} ms "
              f"({wr['resident_wt_cached']} cached): {wr['resident_wb_ms'] / wr['resident_wt_ms']:.2f}x; "
              f"write-through / device-warm {wr['resident_wt_ms'] / wr['device_ms']:.2f}x")
    Path(a.out).write_text(json.dumps(dict(args=vars(a), num_blocks=num_blocks, write_behind=wb, warm_restart=wr),
                                      indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
