"""A peer pull served by a holder in the middle of a long prefill step: its device blocks read between
steps (on the engine thread, the old path and a GPU's) vs while the engine steps (engine/peer_read.py
read_device_blocks_now, a CPU holder's path now).

    python -m pdcluster.bench.pull_serve [--prefix-len 512] [--busy-len 1024] [--repeats 5] [--plot F.png]

Two real DecodeWorkers (no Ray; the embedded model, float32, one torch thread each, real TCP): the
holder keeps a prefix in its device pool. Each repeat, per side (alternating which goes first): the
holder starts a fresh --busy-len prompt (one prefill step: seconds on one CPU thread); once it is
scheduled, the puller generates the prefix + a new tail with a plan to pull the prefix from the
holder. Timed: the holder's serve (the order's arrival to the last frame sent), the puller's TTFT
(generate to first token), the holder's busy prompt (from the same instant to its token: what the
serve costs the holder's own step), and whether that prompt was still in its step when the serve
returned. The "between steps" side calls the same serve_pull with an engine-thread handle that
hides its engine, so the read is queued to the engine thread as before. Medians; ratios side by side.
"""
from __future__ import annotations

import argparse
import random
import statistics
import threading
import time

from pdcluster.bench import outputs
from pdcluster.decode_worker.worker import DecodeWorker
from pdcluster.engine.hashing import block_hashes
from pdcluster.engine.llm_engine import LLMEngine, build_config
from pdcluster.engine.sampling_params import SamplingParams
from pdcluster.kv_transfer.pull import serve_pull
from pdcluster.messages import PullPlan

BS = 16
SIDES = ("between steps", "while stepping")
ONE = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)


class _StepsOnly:
    """The holder's engine thread without its `engine`: serve_pull then reads on the engine thread."""

    def __init__(self, engine_thread):
        self.run = engine_thread.run


def _first(stream, timeout: float = 120.0) -> float:
    """perf_counter when the stream's first token item arrived (drains it to the end)."""
    at = None
    while True:
        item = stream.get(timeout=timeout)
        if at is None and item.token_ids:
            at = time.perf_counter()
        if item.finished:
            return at if at is not None else time.perf_counter()


def one(holder: DecodeWorker, puller: DecodeWorker, side: str, prefix: list[int], tail: list[int],
        busy: list[int], tag: str) -> dict:
    sched = holder.engine.scheduler
    hold = holder.engine_thread if side == SIDES[1] else _StepsOnly(holder.engine_thread)
    busy_stream = holder.generate(f"busy-{tag}", busy, ONE)
    busy_at: list[float] = []
    watcher = threading.Thread(target=lambda: busy_at.append(_first(busy_stream)))   # its own arrival time
    watcher.start()
    deadline = time.monotonic() + 30
    while not any(r.request_id == f"busy-{tag}" for r in list(sched.running)):
        if time.monotonic() > deadline:
            raise RuntimeError("the holder never scheduled its busy prompt")
        time.sleep(0.0005)
    seen: dict = {}

    def order(o):
        t0 = time.perf_counter()
        res = serve_pull(hold, holder._puller(), o, holder.transfer_timeout_s, holder.tiers, holder.connector.stats)
        seen.update(serve_ms=(time.perf_counter() - t0) * 1e3, ok=res.ok,
                    in_step=any(r.request_id == f"busy-{tag}" for r in list(sched.running)))
        return res
    ids = prefix + tail
    n = len(prefix) // BS
    plan = PullPlan("holder", holder.kv_address, 0, block_hashes(ids, BS, None)[:n])
    computed0 = puller.engine.stats.prefill_tokens
    t0 = time.perf_counter()
    first = _first(puller.generate(f"pull-{tag}", ids, ONE, pull=plan, order_fn=order))
    watcher.join()
    busy_done = busy_at[0]
    if not seen.get("ok") or puller.engine.stats.prefill_tokens - computed0 != len(tail):
        raise RuntimeError(f"{side}: the pull failed or was recomputed ({seen})")
    return dict(ttft_ms=(first - t0) * 1e3, serve_ms=seen["serve_ms"], served_in_step=seen["in_step"],
                busy_ms=(busy_done - t0) * 1e3)


def plot(result: dict, path: str) -> None:
    """Per repeat: each side's puller TTFT and holder serve time (grouped bars), one PNG."""
    import numpy as np
    from matplotlib.figure import Figure
    runs = result["runs"]
    x = np.arange(len(runs[SIDES[0]]))
    fig = Figure(figsize=(10, 4.5), layout="constrained")
    ax = fig.subplots()
    w = 0.2
    for i, (side, key) in enumerate([(s, k) for k in ("ttft_ms", "serve_ms") for s in SIDES]):
        ax.bar(x + (i - 1.5) * w, [r[key] for r in runs[side]], w,
               label=f"{side}: {'puller TTFT' if key == 'ttft_ms' else 'holder serve'}")
    a = result["args"]
    ax.set(title=f"A {a['prefix_len']}-token prefix pulled from a holder busy with a {a['busy_len']}-token "
                 "prefill:\nits blocks read between its steps vs while it steps", xlabel="repeat", ylabel="ms",
           xticks=x)
    ax.legend(ncol=2, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    from pdcluster.deploy.cli import HelpFormatter
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--prefix-len", type=int, default=512, help="tokens of the pulled prefix (whole blocks)")
    ap.add_argument("--tail-len", type=int, default=32, help="tokens the puller computes after the prefix")
    ap.add_argument("--busy-len", type=int, default=1024, help="tokens of the holder's busy prompt (one step)")
    ap.add_argument("--repeats", type=int, default=5, help="repeats of both sides, alternating which goes first")
    outputs.add_args(ap, "bench/pull-serve.json", plot_help="PNG of the per-repeat times")
    a = ap.parse_args(argv)
    if outputs.replotted(a, plot, "bench/pull-serve.png"):
        return 0
    if a.prefix_len % BS or a.prefix_len <= 0 or a.tail_len <= 0 or a.busy_len <= 0:
        raise ValueError(f"--prefix-len must be a positive multiple of {BS}; --tail-len, --busy-len positive")

    def engine() -> LLMEngine:
        blocks = 4 * (a.prefix_len + a.tail_len + a.busy_len) // BS
        return LLMEngine(build_config(num_blocks=blocks, max_num_batched_tokens=max(2048, a.busy_len + a.prefix_len),
                                      num_threads=1, dtype="float32", quantization="none"))
    holder = DecodeWorker("holder", engine, transfer_timeout_s=60)
    puller = DecodeWorker("puller", engine, transfer_timeout_s=60)
    rng = random.Random(0)
    vocab = holder.engine.cfg.model.vocab_size
    rows: dict[str, list] = {s: [] for s in SIDES}
    print(f"prefix {a.prefix_len} tokens pulled, tail {a.tail_len}, holder busy with {a.busy_len}; "
          f"{a.repeats} repeats")
    try:
        for rep in range(a.repeats):
            order = SIDES if rep % 2 == 0 else SIDES[::-1]
            line = f"  rep {rep}:"
            for side in order:
                prefix = [rng.randrange(100, vocab) for _ in range(a.prefix_len)]
                tail = [rng.randrange(100, vocab) for _ in range(a.tail_len)]
                busy = [rng.randrange(100, vocab) for _ in range(a.busy_len)]
                holder.generate(f"hold-{side}-{rep}", prefix + tail[:1], ONE).get(timeout=120)
                holder.engine_thread.run(lambda e: None)            # its blocks are cached (the step ended)
                r = one(holder, puller, side, prefix, tail, busy, f"{side[0]}{rep}")
                rows[side].append(r)
                line += (f" | {side}: TTFT {r['ttft_ms']:7.1f} serve {r['serve_ms']:7.1f}"
                         f" (in step: {r['served_in_step']}) busy {r['busy_ms']:7.1f}")
            print(line, flush=True)
    finally:
        holder.close(), puller.close()
    keys = ("ttft_ms", "serve_ms", "busy_ms")
    med = {s: {k: statistics.median(x[k] for x in rows[s]) for k in keys} for s in SIDES}
    in_step = {s: sum(x["served_in_step"] for x in rows[s]) for s in SIDES}
    print(f"\n{'median ms':16} {'puller TTFT':>12} {'holder serve':>13} {'busy prompt':>12} {'served in step':>15}")
    for s in SIDES:
        m = med[s]
        print(f"{s:16} {m['ttft_ms']:12.1f} {m['serve_ms']:13.1f} {m['busy_ms']:12.1f} "
              f"{in_step[s]:>10} of {len(rows[s])}")
    ratio = {k: med[SIDES[0]][k] / med[SIDES[1]][k] for k in keys}
    print(f"between / while: puller TTFT {ratio['ttft_ms']:.2f}x, holder serve {ratio['serve_ms']:.2f}x, "
          f"the holder's busy prompt {ratio['busy_ms']:.2f}x")
    result = dict(args=vars(a), runs=rows, median=med, served_in_step=in_step, ratio=ratio)
    outputs.save(a, result, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
