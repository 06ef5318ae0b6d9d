"""Peer-pull pricing: should the worker that prefills a prompt pull prefix blocks another worker holds
instead of recomputing them (kv_transfer/pull.py moves them)? Pure Python.

For a local option on decode worker d whose own hit covers blocks [0, a), and a holder h (another
worker, prefill or decode) that holds blocks [0, b) of the prompt in any of its tiers (b capped so
the last token still computes on d), the pull covers [a, b):
      pull_s      = read_h + move_s + backlog_h + fail_d * recompute_s          (expected seconds)
      move_s      = w * measured + (1 - w) * link_s
      measured    = d's measured seconds per pull of those bytes (Telemetry.pull_s)
      link_s      = (b - a) * block_size * kv_bytes_per_token / bandwidth(h -> d), the price before d
                    has pulled (plus pull_overhead_s, weighted alike, in the comparison below)
      w           = Telemetry.pull_weight: 1 at d's last measured pull, halving every
                    cost.pull_price_half_life_s without one (0 before any). Once a slow pull prices
                    pulls out, none is chosen, so none is measured: without the decay one slow pull
                    turned pulls off for good; with it the price returns to the link's and the next
                    pull chosen measures it again (exploration). fail_d fades the same way.
      backlog_h   = h.serving_s: the serving seconds of the pulls this router ordered from h that are
                    not done yet (this one waits for them: the holder serves between its steps)
      read_h      = sum over host, disk of h's blocks in [a, b) from that tier * block bytes / h's load rate
      recompute_s = (b - a) * block_size / prefill rate of d
      fail_d      = the share of d's recent pulls that failed (Telemetry.pull_failure_fraction; 0 until one does)
   All learned online. d's measured pull time (fixed + per MB, fitted from its order-to-landed
   times) includes what the link meter (the wire alone) leaves out: the order's round trip, the wait
   for the holder's engine thread between its steps, the landing. On the shared 2-core host under
   load it was ~2 s for 24 blocks (0.22 s quiet) where the link priced 0.05-0.15 s
   (bench/RESULTS.md, "Peer pull priced from measured pulls"), so pulls won against holders that would have served the prompt sooner. A pull
   fails when h evicted the blocks before the order came (it leaves when d admits the prompt, after
   d's queue); the prompt then waits for the refusal and computes them after all, hence fail_d.
   bandwidth: the link figures learned per (src, dst) pair, as KV transfers are priced (Telemetry.links;
   zone priors while unmeasured); h's tier load rates as for its own tier hits (Telemetry.tier_load_bps).
   h's prefix is its device blocks first, then host/disk ones; within those the index keeps counts,
   not positions, so disk blocks are taken to come last (the cost model's convention): a cap on b
   drops disk blocks first, a local hit a drops host blocks first. The holder reads its tier blocks
   before sending (kv_transfer/pull.py), so read_h adds to the move.
The holder's side: serving the pull takes h serve_h seconds (h's measured seconds per pull served,
fixed + per MB, Telemetry.serve_s; before its first: read_h + link_s). Once the placement is made the
router charges that to h (router/lifecycle/pull.py) until the puller's first token: serving_s, and
serve_h x h's prefill rate in queued_tokens, so every option that prefills on h prices it in its
queue (the three choosers alike: they all read queued_tokens), and later pulls from h wait for it.
The pull is taken when conf_h * recompute_s > pull_s + (1 - w) * pull_overhead_s (a measured pull
time includes the overhead): it must win even when the index's
confidence that h still holds the blocks (PrefixIndex.confidence) discounts the saving. The best
holder is the one that saves most. Applied to an Estimate, the pulled tokens leave compute_s (and
the local penalty, which scales with it) and join cached_tokens, and pull_s joins the TTFT: the
transfer is not credited with overlap against the tail's compute (the tail runs after the pulled
blocks land). The TPOT guard is checked again on what d still computes (the tail's first chunk),
not on the whole prompt's. The duplicate penalty (cost_model.py) still counts the pulled tokens, as the
room the copy takes in d's pool (it evicts another prefix there as a recomputed one would): priced at
d's prefill rate, or at its lower tier's load rate where d spills evicted blocks to one. So a pull decides
how a prompt placed away from its prefix's holder gets the prefix, not (by itself) whether to move it.
"""
from __future__ import annotations

from dataclasses import dataclass

from pdcluster.router.placement.load import WorkerLoad
from pdcluster.router.prefix_index import TierHits


@dataclass(frozen=True)
class PullOption:
    holder: str
    first_block: int                # a: the first pulled block of the prompt
    blocks: int                     # b - a
    pull_s: float                   # the holder's tier reads + the link or the measured pull time (read_s
                                    # included) + the failure share x recompute_s: expected seconds
    recompute_s: float              # what the pull saves (unscaled by confidence)
    bandwidth_bps: float
    bandwidth_source: str           # the link's (Telemetry.links), or "pulls-measured" (Telemetry.pull_s, w >= 0.5)
    read_s: float = 0.0             # the holder reading host / disk blocks
    serve_s: float = 0.0            # the holder's seconds serving it (read + send)


def pull_seconds(blocks: int, block_size: int, kv_bytes_per_token: float, bandwidth_bps: float) -> float:
    """Seconds to move `blocks` KV blocks over a link of bandwidth_bps bytes/s."""
    return blocks * block_size * kv_bytes_per_token / max(bandwidth_bps, 1.0)


def recompute_seconds(blocks: int, block_size: int, prefill_tps: float) -> float:
    return blocks * block_size / max(prefill_tps, 1e-9)


def lower_blocks_in(hits: TierHits, a: int, b: int) -> tuple[int, int]:
    """(host, disk) blocks among [a, b) of a prefix held as `hits` (device first, then host/disk
    with disk last: see the module doc). b <= hits.total."""
    host, disk = hits.host, hits.disk
    tail = hits.total - b                           # cut from the end: disk first
    disk, host = max(0, disk - tail), max(0, host - max(0, tail - disk))
    head = max(0, a - hits.device)                  # cut from the start past the device blocks: host first
    return max(0, host - head), max(0, disk - max(0, head - host))


def read_seconds(model, w: WorkerLoad, host: int, disk: int) -> float:
    """Seconds holder w takes to read `host` + `disk` blocks out of its lower tiers."""
    if not (host or disk):
        return 0.0
    c, t = model.cfg, model.telemetry
    per_block = c.block_size * c.kv_bytes_per_token
    return per_block * (host / t.tier_load_bps(w, "host") + disk / t.tier_load_bps(w, "disk"))


def best_pull(model, prompt_len: int, d: WorkerLoad, own_blocks: int, holders: dict[str, TierHits],
              loads: dict[str, WorkerLoad], now: float) -> PullOption | None:
    """The most saving pull for a local prefill on d (see the module doc), or None. model: the
    CostModel (its cfg, telemetry, index); own_blocks: d's hit blocks in any tier; holders: worker
    id -> its TierHits of the prompt (PrefixIndex.match_tiers)."""
    c, t = model.cfg, model.telemetry
    cap = max(0, (prompt_len - 1) // c.block_size)
    a = min(own_blocks, cap)
    rate = t.prefill_tps(d)
    fail = t.pull_failure_fraction(d, now)
    weight = t.pull_weight(d, now)
    best = None
    for h, hits in holders.items():
        w = loads.get(h)
        b = min(hits.total, cap)
        if h == d.worker_id or w is None or not w.healthy or b <= a:
            continue
        bw, src = t.links.bandwidth(h, d.worker_id, w.zone, d.zone)
        read_s = read_seconds(model, w, *lower_blocks_in(hits, a, b))
        nbytes = (b - a) * c.block_size * c.kv_bytes_per_token
        link_s = pull_seconds(b - a, c.block_size, c.kv_bytes_per_token, bw)
        learned = t.pull_s(d, nbytes)
        if learned is None or weight <= 0.0:        # no pull measured into d yet: the link's figure
            pull_s, overhead = read_s + link_s, c.pull_overhead_s
        else:                                       # d's measured pulls (their fixed latency included), fading
            pull_s = read_s + (weight * learned + (1.0 - weight) * link_s)
            overhead = (1.0 - weight) * c.pull_overhead_s
            if weight >= 0.5:
                src = "pulls-measured"
        pull_s += w.serving_s                       # the holder's backlog of pulls ordered before this one
        serve_s = t.serve_s(w, nbytes)
        if serve_s is None:
            serve_s = read_s + link_s
        save_s = recompute_seconds(b - a, c.block_size, rate)
        if fail:                                    # a failed pull computes the blocks after all
            pull_s += fail * save_s
        gain = model.index.confidence(h, now) * save_s - pull_s - overhead
        if gain > 0 and (best is None or gain > best[0]):
            best = (gain, PullOption(h, a, b - a, pull_s, save_s, bw, src, read_s, serve_s))
    return best[1] if best else None


def apply_pulls(model, estimates: list, prompt_len: int, hashes: list[int], hits: dict,
                workers: list[WorkerLoad], now: float) -> None:
    """Price a pull into every local estimate where one pays (cost_model.Estimate, in place).
    hits: worker id -> TierHits of the prompt (PrefixIndex.match_tiers) for the placeable workers;
    workers: every healthy worker not excluded, the holders (a draining or busy worker still serves pulls)."""
    c, t = model.cfg, model.telemetry
    loads = {w.worker_id: w for w in workers}
    extra = [w for w in loads if w not in hits]
    if extra:
        hits = hits | model.index.match_tiers(hashes, extra)
    held = {}
    for w, h in hits.items():
        if not h.total or w not in loads:
            continue
        k = model.index.first_pending(w, hashes, h.device)      # a pull is served from computed blocks only:
        if k == h.device:                                       # not from those a placement just sent it
            held[w] = h
        elif k:
            held[w] = TierHits(k, 0, 0)
    if not held:
        return
    for e in estimates:
        if e.kind != "local" or e.decode not in loads:
            continue
        d = loads[e.decode]
        own = hits[e.decode].total if e.decode in hits else 0
        p = best_pull(model, prompt_len, d, own, held, loads, now)
        if p is None:
            continue
        saved = min(e.compute_s, p.recompute_s)
        n_d = max(d.running, d.in_flight)
        e.pull_from, e.pull_first_block, e.pull_blocks = p.holder, p.first_block, p.blocks
        e.pull_s, e.pull_bandwidth_bps = p.pull_s, p.bandwidth_bps
        e.pull_serve_s = p.serve_s
        e.pull_serve_tokens = p.serve_s * t.prefill_tps(loads[p.holder])
        e.compute_s -= saved
        e.cached_tokens += p.blocks * c.block_size
        e.ttft_s += p.pull_s - saved
        penalty = c.local_penalty * n_d * e.compute_s
        e.cost_s += p.pull_s - saved + penalty - e.local_penalty_s
        e.local_penalty_s = penalty
        # the TPOT guard on what d still computes: the tail's first chunk, not the whole prompt's
        stall = model.local_stall(d, n_d, e.compute_s * t.prefill_tps(d))
        _, _, e.step_s_after, e.tpot_ok = model._decode_verdicts(
            d, prompt_len, n_d, e.resident_tokens_decode, stall, False)
