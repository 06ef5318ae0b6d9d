"""Decode worker: continuous batching over requests whose KV arrived; can also prefill locally.

Remote-prefill protocol (one owner per block at every moment):
  reserve(rid, prompt)  -> blocks for the whole prompt are allocated here first (prefix-cache hits
                           reused), the KV receiver is told to expect the missing ones; the router
                           gets the KV address, how many leading blocks to skip, and the block ids.
  (prefill worker streams K/V into exactly those blocks; frames for any other id are dropped)
  start(rid, first_tok) -> the transfer must be complete; the request joins the running batch with
                           num_computed_tokens = prompt length and the first token appended.
  abort(rid)            -> from any state: the receiver fences the id, the blocks are freed. An abort
                           that overtakes its reserve or generate (each RPC runs on its own thread)
                           fences the id here, and the late call is refused (pdcluster/abort_fence.py).
Tokens of every request are pushed to its TokenStream, drained by the RPC layer.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from typing import Callable

from pdcluster.abort_fence import AbortFence
from pdcluster.engine.engine_thread import EngineThread
from pdcluster.engine.llm_engine import LLMEngine, StepOutput
from pdcluster.engine.sampling_params import SamplingParams
from pdcluster.engine.kv_connector import NoKVCapacity
from pdcluster.kv_transfer import BandwidthMeter, KVReceiver
from pdcluster.kv_transfer.pull import OrderFn, PullConnector, serve_pull
from pdcluster.kv_transfer.registry import TRANSFER_TIMEOUT_S, check, sender_class, server_class
from pdcluster.kv_transfer.tiers.attach import attach_tiers, cache_snapshot, tier_figures, tier_load_counters
from pdcluster.messages import (CacheSnapshot, LinkFigures, PullFigures, PullOrder, PullPlan, PullResult, Reservation,
                                TokenItem, WorkerStatus)

log = logging.getLogger(__name__)


class TokenStream:
    """TokenItems for one request, pushed from the engine thread: into `sink` when given (e.g. an
    event loop's queue), else a queue."""

    def __init__(self, sink=None):
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.sink = sink or self.q.put
        self.first = True               # the next item is the stream's first: it carries the prompt logprobs

    def push(self, o: StepOutput) -> None:
        prompt = tuple(o.request.prompt_logprobs) if self.first else ()
        self.first = False
        self.sink(TokenItem(token_ids=o.new_token_ids, finished=o.finished, finish_reason=o.finish_reason,
                            num_cached_tokens=max(o.request.num_cached_tokens, 0), logprobs=tuple(o.logprobs),
                            prompt_logprobs=prompt))

    def get(self, timeout: float | None = None) -> TokenItem:
        return self.q.get(timeout=timeout)


class DecodeWorker:
    """Receives KV on the one server of its `kv_transport` (kv_transfer/registry.py) over a
    KVReceiver; its address is `kv_address` (what the router hands the prefill worker, whose
    transport must match). It listens on kv_host:kv_port; tcp only: on kv_tcp_host / kv_tcp_port when
    given, inside the `ip netns` namespace kv_tcp_netns (a shaped link's decode end: deploy/netns.py)."""

    def __init__(self, worker_id: str, engine: LLMEngine | Callable[[], LLMEngine], kv_host: str = "127.0.0.1",
                 kv_port: int = 0,
                 secret: str | None = None, transfer_timeout_s: float = TRANSFER_TIMEOUT_S, reservation_ttl_s: float = 300.0,
                 kv_transport: str = "tcp", kv_tcp_port: int = 0, kv_tcp_netns: str | None = None,
                 kv_tcp_host: str | None = None, tier_key: str | None = None):
        """tier_key: the disk tier's subdirectory (deploy/scaling.py: a replica may take over a dead or retired
        one's, warm; None: worker_id)."""
        check(kv_transport)
        self.worker_id = worker_id
        self.incarnation = uuid.uuid4().hex   # new on every (re)start of the process
        # first: a builder builds the engine on this thread (engine/engine_thread.py). It idles until a
        # command comes, and none can before this constructor returns.
        self.engine_thread = EngineThread(engine, name=f"decode-{worker_id}")
        engine = self.engine = self.engine_thread.engine
        self.events = engine.block_events()      # prefix-cache events for the router's global index
        self.kv_transport = kv_transport
        self.receiver = KVReceiver()
        # remote-prefill reservations and peer pulls (kv_transfer/pull.py; its address is set below),
        # beside the host/disk cache tiers when configured: the engine's connector
        self.connector = PullConnector(self.receiver, engine.cfg.model.num_layers, engine.cfg.cache.block_size, "",
                                       worker_id)
        self.tiers = attach_tiers(engine, self.connector, tier_key or worker_id)
        tcp = kv_transport == "tcp"
        # Mooncake registers the caches (CPU; GPU caches land through its own host staging buffers)
        try:
            self.server = server_class(kv_transport).for_worker(
                self.receiver, *engine.kv_caches(), host=(tcp and kv_tcp_host) or kv_host,
                port=(tcp and kv_tcp_port) or kv_port, secret=secret, netns=kv_tcp_netns if tcp else None)
            self.server.start_sync()
        except BaseException:           # e.g. the port is taken
            self.engine_thread.stop()
            raise
        self.connector.address = self.kv_address
        self.transfer_timeout_s = transfer_timeout_s
        # peer pulls this worker serves as a holder: a sender of its transport, made on the first one
        self._secret, self._pull_lock, self._pull_transport = secret, threading.Lock(), None
        self.meter = BandwidthMeter()           # its outgoing pull links (reported with its status)
        # rid -> monotonic expiry of its reservation; engine thread only. A reservation that is
        # neither started nor aborted by its expiry (its router lost track of it) is freed.
        self._reserved: dict[str, float] = {}
        self.fence = AbortFence()       # ids aborted before they arrived; engine thread only
        # longer than the router waits for the prefill that fills it (queue + compute + transfer)
        self.reservation_ttl_s = reservation_ttl_s

    @property
    def kv_address(self) -> str:
        """The advertised KV address: that of the `kv_transport` server."""
        return self.server.address

    def _listen(self, rid: str, stream: TokenStream) -> None:
        """Engine thread, once rid's request is this call's (added or started): its outputs go to
        stream from the next step on. Never before: a refused call (a duplicate id) must not take
        the live request's stream."""
        self.engine_thread.listeners[rid] = stream.push

    # remote prefill
    def reserve(self, rid: str, prompt_ids: list[int], params: SamplingParams,
                cache_salt: str | None = None, output_ids: list[int] = ()) -> Reservation:
        """Blocks for the prompt's KV (and output_ids', outputs already sent), computed elsewhere;
        NoKVCapacity when there is no room now."""
        def _reserve(engine: LLMEngine) -> Reservation:
            self.fence.check(rid)
            try:
                r = engine.reserve_remote(prompt_ids, params, rid, cache_salt, output_ids)
            except NoKVCapacity as e:
                raise NoKVCapacity(f"{self.worker_id}: {e}") from None
            self._reserved[rid] = time.monotonic() + self.reservation_ttl_s
            return Reservation(kv_address=self.kv_address, dst_id=self.worker_id, skip_blocks=r.skip_blocks,
                               dst_block_ids=r.block_ids, cached_tokens=r.cached_tokens)
        return self.engine_thread.run(_reserve)

    def start(self, rid: str, first_token: int, sink=None) -> TokenStream:
        """The transfer finished (the prefill worker holds the ack): join the running batch."""
        stream = TokenStream(sink)

        def _start(engine: LLMEngine) -> None:
            self._reserved.pop(rid)             # KeyError: not reserved (aborted, expired, never)
            self._listen(rid, stream)
            engine.start_remote(rid, first_token)
        if not self.engine_thread.run(lambda e: rid in self._reserved):
            raise KeyError(rid)
        # the engine's connector: with cache tiers it also waits for the reservation's blocks a tier loads (the
        # pull connector alone waited only for the transfer, and a tier load still running aborted the request)
        self.engine.connector.wait_loaded(rid, self.transfer_timeout_s)
        try:
            self.engine_thread.run(_start)
        except BaseException:
            self._drop_stream(rid, stream)
            raise
        return stream

    # local prefill
    def generate(self, rid: str, prompt_ids: list[int], params: SamplingParams,
                 cache_salt: str | None = None, sink=None, output_ids: list[int] = (),
                 pull: PullPlan | None = None, order_fn: OrderFn | None = None) -> TokenStream:
        """pull, order_fn: fetch the plan's prefix blocks from their holder through order_fn (which
        asks it, kv_transfer/pull.py) instead of computing them; any failure computes them."""
        stream = TokenStream(sink)

        def add(e: LLMEngine):
            self.fence.check(rid)
            # queued only: admission (external_tokens, after_alloc) comes at the next step, on this thread, so
            # the plan set after it is in time; set before, a refused duplicate id replaced the live request's
            # plan and then dropped it
            e.add_request(prompt_ids, params, rid, cache_salt, detokenize=False, output_ids=output_ids)
            if pull is not None and order_fn is not None:
                self.connector.plan(rid, pull, order_fn)
            self._listen(rid, stream)
        self.engine_thread.run(add)
        return stream

    # peer pulls, holder side
    def serve_pull(self, order: PullOrder) -> PullResult:
        """Send the blocks order.hashes names into a puller's reservation (blocking; an RPC thread)."""
        return serve_pull(self.engine_thread, self._puller(), order, self.transfer_timeout_s, self.tiers,
                          self.connector.stats)

    def _puller(self):
        """This worker's sender for pulls it serves (tcp and grpc; None for Mooncake, whose decode
        side pulls through its own engine)."""
        with self._pull_lock:
            if self._pull_transport is None and self.kv_transport in ("tcp", "grpc"):
                self._pull_transport = sender_class(self.kv_transport)(secret=self._secret, meter=self.meter,
                                                                       src_id=self.worker_id)
            return self._pull_transport

    def abort(self, rid: str) -> None:
        """Stop rid wherever it is and free its blocks (idempotent)."""
        def _abort(engine: LLMEngine) -> None:
            reserved = self._reserved.pop(rid, None) is not None
            req = engine.abort(rid)          # the connector fences late KV for rid, reserved or not
            if req is None and not reserved:
                self.fence.add(rid)          # before its reserve or generate: refuse that when it comes
            cb = self.engine_thread.listeners.pop(rid, None)
            if cb and req is not None:
                cb(StepOutput(req, [], "", True))
        self.engine_thread.run(_abort)
        self._drop_stream(rid)

    def _drop_stream(self, rid: str, stream: TokenStream | None = None) -> None:
        """Stop sending rid's outputs (only to `stream`, when given: another call's stays)."""
        listeners = self.engine_thread.listeners
        if stream is None or listeners.get(rid) == stream.push:
            listeners.pop(rid, None)

    def finished(self, rid: str) -> None:
        self._drop_stream(rid)

    def _expire_reservations(self, engine: LLMEngine) -> None:
        now = time.monotonic()
        for rid in [r for r, expiry in self._reserved.items() if expiry < now]:
            log.warning("%s: reservation %s expired unclaimed after %.0fs; freeing its blocks", self.worker_id,
                        rid, self.reservation_ttl_s)
            del self._reserved[rid]
            engine.abort(rid)

    def status(self, drain_events: bool = False) -> WorkerStatus:
        """Load figures; with drain_events (the router's poll) also the block events since the last drain.
        Each poll also sweeps expired reservations (queued on the engine thread, not waited for). Raises
        once the engine thread has died or while its steps keep failing: the router then counts the worker
        unhealthy."""
        self.engine_thread.check_healthy()
        self.engine_thread.call(self._expire_reservations)
        running, waiting = self.engine.queue_lengths()
        figures = self.engine.figures() | tier_load_counters(self.tiers, self.engine.kv_block_model_bytes())
        return WorkerStatus.of(self.worker_id, "decode", self.incarnation, os.getpid(), figures,
                               self.events.drain() if drain_events else (None, ()), running=running,
                               waiting=waiting, reserved=len(self._reserved), kv_address=self.kv_address,
                               links=tuple(LinkFigures.of(x) for x in self.meter.snapshot()),
                               tiers=tier_figures(self.tiers), pulls=PullFigures.of(self.connector.stats.as_dict()))

    def steps(self) -> int:
        """Forward steps the engine has finished, and its polls with work it could not schedule yet (no room
        for a waiting prompt, loads in flight): rises while the engine thread lives and has anything to do.
        Plain counters, read off the engine thread without walking its queues."""
        self.engine_thread.check_alive()
        return self.engine.stats.steps + self.engine.idle_polls

    def cached_hashes(self) -> CacheSnapshot:
        """Every cached chain hash by tier, at an event number: a full resync for the router's index."""
        return cache_snapshot(self.engine_thread.run(lambda e: e.block_snapshot()), self.tiers)

    def tier_hashes(self) -> tuple[int, dict[str, list[int]]]:
        """(event sequence number, {"host"|"disk": chain hashes}) of its KV cache tiers (none: off)."""
        return self.tiers.tier_hashes() if self.tiers is not None else (self.events.seq, {})

    def close(self) -> None:
        self.engine_thread.stop()
        self.server.stop_sync()
        if self.tiers is not None:
            self.tiers.close()
        if self._pull_transport is not None:
            self._pull_transport.close()
