"""Peer pull: a worker about to prefill a prompt fetches prefix blocks another worker holds,
instead of computing them (the router's cost model decides, router/placement/pull_pricing.py).

    router ── PullPlan(holder, first block, hashes) ──> puller
    puller (engine thread, KV connector): external_tokens -> the pulled blocks' tokens;
        after_alloc -> a reservation at its KVReceiver + a PullOrder handed to `order_fn`
        (another thread: the worker actor asks the holder)
    holder: serve_pull -> the blocks by chain hash: its device pool's (a KV cache in host memory: read
        on the calling thread while the engine steps, engine/peer_read.py read_device_blocks_now; on
        a GPU: a host copy on the engine thread between steps), the rest from its host / disk cache
        tiers on the calling thread; then streams them into the reservation over the KV transport
    puller: finished_loading reports the reservation's end; the scheduler counts the tokens as
        computed (COMPLETE) or frees the blocks and recomputes every token (anything else)

The transfer is a plain one of the cluster's transport: frames land only in the reservation, each
checksummed, and an abort fences late frames. A missing block (evicted), a holder that dies or
answers late, a bad frame: the reservation ends failed and the prompt is computed here, token-exact.
Tenant isolation: the puller takes the plan's hashes only if they equal its own salted chain hashes
of the prompt, and the holder finds blocks only by hash.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from pdcluster.kv_transfer.connectors import ReceiveConnector
from pdcluster.kv_transfer.pull_stats import PullStats
from pdcluster.kv_transfer.receiver import KVReceiver, PendingTransfer, TransferState
from pdcluster.messages import PullOrder, PullPlan, PullResult

log = logging.getLogger(__name__)

# order_fn(order) -> PullResult: asks the holder (blocking; any thread but the engine's). An
# exception counts as a failed pull.
OrderFn = Callable[[PullOrder], PullResult]


class PullConnector(ReceiveConnector):
    """A decode worker's connector: remote-prefill reservations (ReceiveConnector) and peer pulls.
    `address` / `worker_id`: where the holder sends (this worker's KV server) and the link's name."""

    def __init__(self, receiver: KVReceiver, num_layers: int, block_size: int, address: str, worker_id: str):
        super().__init__(receiver, num_layers)
        self.block_size, self.address, self.worker_id = block_size, address, worker_id
        self._plans: dict[str, tuple[PullPlan, OrderFn]] = {}      # rid -> plan, until admitted
        self._range: dict[str, tuple[int, int]] = {}               # rid -> blocks [a, b) external_tokens offered
        self._pulling: dict[str, tuple[PendingTransfer, float]] = {}   # rid -> its reservation, start (perf_counter)
        self.pulled_blocks = 0                                      # blocks landed by completed pulls
        self.failed_pulls = 0
        self.stats = PullStats()                                    # this worker's pulls, both halves

    def plan(self, request_id: str, plan: PullPlan, order_fn: OrderFn) -> None:
        """Pull for request_id when the scheduler admits it (engine thread, after add_request queued it and
        before the next step admits it)."""
        if plan.hashes:
            self._plans[request_id] = (plan, order_fn)

    # scheduler side
    def external_tokens(self, request, num_local_tokens: int) -> int:
        rid = request.request_id
        entry = self._plans.get(rid)
        if entry is None:
            return 0
        plan, bs = entry[0], self.block_size
        own = request.block_hashes()
        a = num_local_tokens // bs                                  # local hits come first
        b = min(plan.first_block + len(plan.hashes), (request.num_prefill_tokens - 1) // bs)
        if own[plan.first_block:plan.first_block + len(plan.hashes)] != list(plan.hashes):
            log.warning("%s: pull plan for %s names blocks not of its prompt (salt or tokens differ); computing",
                        self.worker_id, rid)
            self._plans.pop(rid)
            return 0
        if b <= a:                      # local hits cover it now. Below plan.first_block (the router's
            self._plans.pop(rid)        # view of this pool was stale) the pull starts at a: the holder's
            return 0                    # device prefix runs from block 0, and these are our own hashes
        self._range[rid] = (a, b)
        return (b - a) * bs

    def after_alloc(self, request, block_ids: list[int], num_external_tokens: int) -> None:
        rid = request.request_id
        entry = self._plans.pop(rid, None)
        if entry is None:                                           # a remote prefill's reservation
            return super().after_alloc(request, block_ids, num_external_tokens)
        a, b = self._range.pop(rid)
        assert len(block_ids) == b - a, (len(block_ids), a, b)
        p = self.receiver.expect(rid, block_ids, self.num_layers, self._write)
        self._pulling[rid] = (p, time.perf_counter())
        order = PullOrder(rid, list(request.block_hashes()[a:b]), self.address, self.worker_id, list(block_ids))
        threading.Thread(target=self._order, args=(entry[1], order, entry[0].holder, p), daemon=True,
                         name=f"pull-{rid}").start()

    LANDED_GRACE_S = 2.0    # after the holder's "ok": how long its blocks may take to be seen landed

    def _order(self, order_fn: OrderFn, order: PullOrder, holder: str, p: PendingTransfer) -> None:
        """Ask the holder; a refusal or error ends the reservation (failed) unless it completed. So does an
        "ok" whose blocks have not landed (a holder acks only what this receiver acknowledged, so that is a
        faulty one): else nothing ended the reservation, and the request waited for it for good."""
        try:
            res = order_fn(order)
            if not isinstance(res, PullResult):
                why = f"answered {type(res).__name__}, not a PullResult"
            elif not res.ok:
                why = res.reason or "refused"
            elif p.wait(self.LANDED_GRACE_S) is TransferState.PENDING:
                why = "answered ok, but its blocks did not land"
            else:
                why = None
        except Exception as e:      # noqa: BLE001 - the holder's failure is a recompute, not an error
            why = f"{type(e).__name__}: {e}"
        if why is not None and p.end(TransferState.FAILED, f"pull from {holder}: {why}"):
            log.info("%s: pull of %s from %s failed (%s); recomputing", self.worker_id, order.request_id, holder, why)

    def finished_loading(self) -> list[tuple[str, bool]]:
        done = [(rid, p, t) for rid, (p, t) in self._pulling.items() if p.state is not TransferState.PENDING]
        out = []
        for rid, p, t in done:
            del self._pulling[rid]
            ok = p.state is TransferState.COMPLETE
            if ok:
                self.pulled_blocks += len(p.block_ids)
            else:
                self.failed_pulls += 1
            self.stats.pulled(ok, len(p.block_ids), p.bytes_received, time.perf_counter() - t)
            out.append((rid, ok))
        return out

    def request_finished(self, request_id: str, block_ids: list[int]) -> bool:
        """A plan the scheduler never used (no room for the pulled blocks: it computed them) ends here."""
        self._plans.pop(request_id, None)
        self._range.pop(request_id, None)
        return super().request_finished(request_id, block_ids)

    def request_aborted(self, request_id: str) -> None:
        self._plans.pop(request_id, None)
        self._range.pop(request_id, None)
        self._pulling.pop(request_id, None)
        super().request_aborted(request_id)          # fences the reservation


def serve_pull(engine_thread, transport, order: PullOrder, timeout_s: float, tiers=None,
               stats: PullStats | None = None) -> PullResult:
    """The holder's side (any thread but the engine's): copy the blocks named by order.hashes that
    the device pool holds (engine/peer_read.py: on this thread while the engine steps where the KV
    cache is in host memory, else on the engine thread between steps); read the rest from this
    worker's lower cache tiers (`tiers`: a TierConnector, or None) on this thread, so the engine
    steps meanwhile; then stream them into the puller's reservation over `transport` (a
    KVTransport). All or nothing: a block in no tier fails the pull. Never raises for a missing block
    or a failed transfer: the PullResult says so (the puller recomputes). `stats`: counted there."""
    from pdcluster.engine import peer_read
    t0 = time.perf_counter()
    engine = getattr(engine_thread, "engine", None)
    if engine is not None and peer_read.reads_off_thread(engine):   # host memory: read now, the engine steps on
        def read_device(hashes):
            return peer_read.read_device_blocks_now(engine, hashes)
    else:                                                           # between the engine's steps
        def read_device(hashes):
            return engine_thread.run(lambda e: peer_read.read_device_blocks(e, hashes))
    try:
        res = _serve(read_device, transport, order, timeout_s, tiers)
    except Exception as e:          # noqa: BLE001 - reading the blocks failed: the puller recomputes
        log.warning("serving a pull of %s failed: %s: %s", order.request_id, type(e).__name__, e)
        res = PullResult(False, reason=f"reading the blocks failed: {type(e).__name__}"), {}
    if stats is not None:
        if res[0].ok:
            stats.served_pull(res[1], res[0].kv_bytes, time.perf_counter() - t0)
        else:
            stats.serve_failed()
    return res[0]


def _serve(read_device, transport, order: PullOrder, timeout_s: float, tiers):
    """(the PullResult, blocks sent per tier). read_device(hashes) -> (positions found, ReadBlocks or None)."""
    none: dict[str, int] = {}
    if transport is None:
        return PullResult(False, reason="this worker's transport cannot serve pulls"), none
    if len(order.hashes) != len(order.dst_block_ids) or not order.hashes:
        return PullResult(False, reason=f"{len(order.hashes)} hashes for {len(order.dst_block_ids)} blocks"), none
    hashes = list(order.hashes)
    if (len(set(hashes)) != len(hashes) or not all(type(h) is int for h in hashes)
            or not all(type(b) is int and b >= 0 for b in order.dst_block_ids)):
        return PullResult(False, reason="a pull order names each block once, by int hashes and block ids"), none
    found, dev = read_device(hashes)
    by_tier = {"device": len(found)}
    if len(found) == len(hashes):
        k, v = dev.k, dev.v
    else:
        have = set(found)
        rest = [i for i in range(len(hashes)) if i not in have]
        low = tiers.read_blocks([hashes[i] for i in rest]) if tiers is not None else None
        if low is None:
            return PullResult(False, reason="blocks no longer cached (evicted)"), none
        blocks, counts = low
        by_tier |= counts
        k, v = _assemble(len(hashes), found, dev, rest, blocks)
    sender = None
    try:
        sender = transport.open(order.address, order.request_id, order.dst_block_ids, order.dst_id)
        for layer, (kl, vl) in enumerate(zip(k, v)):
            sender.send_layer(layer, kl, vl)
        stats = sender.finish(timeout=timeout_s)
    except Exception as e:          # noqa: BLE001 - any failure is the puller's recompute, and the stream is closed
        if sender is not None:
            sender.abort()
        return PullResult(False, reason=f"transfer failed: {type(e).__name__}: {e}"), none
    return PullResult(True, len(hashes), stats.bytes, stats.wall_s * 1e3), by_tier


def _assemble(n: int, found: list[int], dev, rest: list[int], low: list) -> tuple[list, list]:
    """Per layer K and V [n, bs, h, d]: rows `found` from the device copy (ReadBlocks or None), rows
    `rest` from the tier blocks `low` ([2L, bs, h, d] each, in `rest` order)."""
    import torch
    stacked = torch.stack(low)                                  # [m, 2L, bs, h, d]
    num_layers = stacked.shape[1] // 2
    k, v = [], []
    for layer in range(num_layers):
        kl = stacked.new_empty((n, *stacked.shape[2:]))
        vl = stacked.new_empty((n, *stacked.shape[2:]))
        kl[rest], vl[rest] = stacked[:, layer], stacked[:, num_layers + layer]
        if dev is not None:
            kl[found], vl[found] = dev.k[layer], dev.v[layer]
        k.append(kl)
        v.append(vl)
    return k, v
