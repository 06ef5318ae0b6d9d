"""Prefill worker: batched, chunked prefill with the prefix cache; ships KV layer by layer.

A remote prefill runs the prompt to its first sampled token (one token here; the decode worker
continues from there). After each layer of the step that completes a prompt, that layer's blocks
(only those the decode worker lacks) are gathered and handed to kv_transfer, which streams them
while the next layer computes. The request's blocks stay in this worker's prefix cache afterwards.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import replace
from typing import Callable


from pdcluster.abort_fence import AbortFence
from pdcluster.engine.engine_thread import EngineThread
from pdcluster.engine.llm_engine import LLMEngine, StepOutput
from pdcluster.engine.sampling_params import SamplingParams
from pdcluster.messages import (CacheSnapshot, KVDestination, LinkFigures, PrefillResult, PullFigures, PullOrder,
                                PullResult, WorkerStatus)
from pdcluster.kv_transfer import BandwidthMeter, KVTransferError, SendConnector
from pdcluster.kv_transfer.tiers.attach import attach_tiers, cache_snapshot, tier_figures, tier_load_counters
from pdcluster.kv_transfer.codec_policy import CompressionPolicy, prefill_seconds
from pdcluster.kv_transfer.pull import serve_pull
from pdcluster.kv_transfer.pull_stats import PullStats
from pdcluster.kv_transfer.registry import TRANSFER_TIMEOUT_S, check_compression, sender_class

log = logging.getLogger(__name__)


class PrefillWorker:
    def __init__(self, worker_id: str, engine: LLMEngine | Callable[[], LLMEngine], secret: str | None = None,
                 bandwidth_limit_bytes_per_s: float | None = None, transfer_timeout_s: float = TRANSFER_TIMEOUT_S,
                 transport: str = "tcp", kv_layerwise: bool = True, kv_compression: str = "off",
                 kv_netns: str | None = None, kv_host: str | None = None, tier_key: str | None = None):
        """tier_key: the disk tier's subdirectory (deploy/scaling.py: a replica may take over a dead or retired
        one's, warm; None: worker_id). transport: a name in kv_transfer/registry.py: "tcp", "grpc" or "mooncake" (the decode side
        pulls over Mooncake; its package is imported only when built); the decode workers must
        advertise the matching server (DecodeWorker's kv_transport). kv_layerwise False: whole-request
        transfer, every layer is handed to the sender after the last layer computed (the baseline
        that layer-wise streaming is measured against). kv_compression: "off", "int8", "fp8" or
        "auto" (kv_transfer/codec_policy.py: per transfer, by the link's measured bandwidth);
        tcp and grpc only (Mooncake moves the cache bytes uncompressed). kv_netns: tcp only, the KV
        connections' sockets are made in that `ip netns` namespace (a shaped link: deploy/netns.py)."""
        check_compression(transport, kv_compression)
        sender = sender_class(transport)
        self.compression = CompressionPolicy(kv_compression)
        if kv_netns is not None and transport != "tcp":
            raise ValueError(f"kv_netns needs the tcp transport, not {transport!r}")
        self.worker_id, self.transport_name = worker_id, transport
        self.incarnation = uuid.uuid4().hex   # new on every (re)start of the process
        # a builder builds the engine on this thread (engine/engine_thread.py); it idles until a
        # command comes, and none can before this constructor returns
        self.engine_thread = EngineThread(engine, name=f"prefill-{worker_id}")
        engine = self.engine = self.engine_thread.engine
        self.events = engine.block_events()      # prefix-cache events for the router's global index
        self.meter = BandwidthMeter()
        # kv_host: the address decode workers reach this worker's transport at. Only Mooncake listens
        # on the prefill side (the decode side READs its staging arena), so only it takes one: the
        # node's IP on a multi-node cluster (the actor's bind_node_ip); None: the transport's default
        # (loopback; $PDCLUSTER_MOONCAKE_HOST overrides either, kv_transfer/mooncake/transport.py mooncake_host).
        extra = {"host": kv_host} if transport == "mooncake" and kv_host else {}
        if kv_netns is not None:
            extra["netns"] = kv_netns
        try:
            self.transport = sender(secret=secret, meter=self.meter, src_id=worker_id,
                                    bandwidth_limit_bytes_per_s=bandwidth_limit_bytes_per_s, **extra)
        except BaseException:
            self.engine_thread.stop()
            raise
        self.transfer_timeout_s = transfer_timeout_s
        # ships each prompt's layers from the engine thread (whole-request mode: every layer after the last)
        self.sends = SendConnector(layerwise=kv_layerwise)
        self.tiers = attach_tiers(engine, self.sends, tier_key or worker_id)     # beside the host/disk tiers, if any
        self.pull_stats = PullStats()                                 # the pulls it serves as holder
        self._lock = threading.Lock()
        self.in_flight = 0
        self.fence = AbortFence()       # ids aborted before they arrived (pdcluster/abort_fence.py); engine thread only

    def prefill(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                dest: KVDestination | None, cache_salt: str | None = None,
                output_ids: list[int] = ()) -> PrefillResult:
        """Blocking: prefill, stream the KV to `dest`, return the first token and figures. output_ids:
        outputs an earlier attempt sent (a migration): prefilled and shipped with the prompt, counted as
        outputs by the sampler; the token returned is the next one."""
        done: Future = Future()
        t0 = time.perf_counter()

        def listener(o: StepOutput) -> None:
            done.set_result((o.new_token_ids[0] if o.new_token_ids else None, o.request,
                             o.logprobs[0] if o.logprobs else None))

        def add(engine: LLMEngine):
            self.fence.check(request_id)
            nxt = len(output_ids) + 1                       # the next token only (min_tokens past it: EOS masked)
            one = replace(params, max_tokens=nxt, stop=(), min_tokens=min(params.min_tokens, nxt))
            req = engine.add_request(prompt_ids, one, request_id, cache_salt, detokenize=False, output_ids=output_ids)
            if dest is not None:
                n = -(-req.num_prefill_tokens // engine.cfg.cache.block_size) - dest.skip_blocks
                if n != len(dest.dst_block_ids):
                    engine.abort(request_id)
                    raise ValueError(f"decode reserved {len(dest.dst_block_ids)} blocks, prefill needs {n}")
                codec = self._codec(dest, req.num_prefill_tokens)
                kw = {"codec": codec} if codec != "none" else {}  # Mooncake's open() takes no codec
                try:
                    sender = self.transport.open(dest.address, request_id, dest.dst_block_ids, dest.dst_id, **kw)
                except BaseException:       # e.g. an address it refuses: nothing is computed for nobody
                    engine.abort(request_id)
                    raise
                self.sends.add(request_id, sender, dest.skip_blocks, codec)
            self.engine_thread.listeners[request_id] = listener
            return req

        with self._lock:
            self.in_flight += 1
        try:
            self.engine_thread.run(add)
            while True:                 # a died engine thread would never answer: its RPC thread must not wait on
                try:
                    token, req, logprobs = done.result(timeout=1.0)
                    break
                except TimeoutError:
                    self.engine_thread.check_alive()
            t_prefill = time.perf_counter() - t0
            stats = None
            entry = self.engine_thread.run(lambda e: self.sends.pop(request_id))
            if entry is not None:
                if token is None:
                    entry[0].abort()
                    raise KVTransferError("prefill aborted before the KV was sent")
                stats = entry[0].finish(timeout=self.transfer_timeout_s)
            if token is None:
                raise RuntimeError(f"prefill of {request_id} was aborted")
            return PrefillResult(first_token=token, cached_tokens=max(req.num_cached_tokens, 0), prefill_s=t_prefill,
                                 kv_bytes=stats.bytes if stats else 0,
                                 kv_transfer_ms=stats.exposed_s * 1e3 if stats else 0.0,
                                 kv_wall_ms=stats.wall_s * 1e3 if stats else 0.0,
                                 kv_codec=entry[2] if entry is not None else "none", first_logprobs=logprobs,
                                 prompt_logprobs=tuple(req.prompt_logprobs))
        finally:
            with self._lock:
                self.in_flight -= 1

    def _codec(self, dest: KVDestination, tokens: int) -> str:
        """The codec for one transfer (engine thread): the policy, given the uncompressed K+V bytes
        of the reserved blocks (in the model's dtype: what the sender ships uncompressed, a quantized
        pool's blocks dequantized), the link's measured bandwidth and the time to prefill `tokens` at
        this worker's learned rate (the whole prompt: its prefix hit is not known yet)."""
        nbytes = len(dest.dst_block_ids) * self.engine.kv_block_model_bytes()
        stats = self.engine.stats
        return self.compression.choose(nbytes, prefill_seconds(tokens, stats.prefill_tokens, stats.prefill_s),
                                       self.meter.bandwidth(self.worker_id, dest.dst_id))

    def abort(self, request_id: str) -> None:
        def _abort(engine: LLMEngine):
            req = engine.abort(request_id)       # the connector aborts its sender first
            if req is None:
                self.fence.add(request_id)       # before its prefill call: refuse that when it comes
            cb = self.engine_thread.listeners.pop(request_id, None)
            if cb and req is not None:
                cb(StepOutput(req, [], "", True))
        self.engine_thread.run(_abort)

    def probe(self, address: str, dst_id: str) -> float | None:
        """Measure the idle link to a decode worker's KV endpoint (bytes/s, also a meter sample, so
        it reaches the router with the next status); None where the transport has no probe."""
        probe = getattr(self.transport, "probe", None)
        return probe(address, dst_id, timeout=self.transfer_timeout_s) if probe is not None else None

    def serve_pull(self, order: PullOrder) -> PullResult:
        """Send the blocks order.hashes names into a puller's reservation (blocking; an RPC thread).
        Over this worker's own transport: tcp and grpc (Mooncake's sender serves no pulls)."""
        transport = self.transport if self.transport_name in ("tcp", "grpc") else None
        return serve_pull(self.engine_thread, transport, order, self.transfer_timeout_s, self.tiers, self.pull_stats)

    def status(self, drain_events: bool = False) -> WorkerStatus:
        """Load figures; with drain_events (the router's poll) also the block events since the last drain.
        Raises once the engine thread has died or while its steps keep failing: the router then counts the
        worker unhealthy."""
        self.engine_thread.check_healthy()
        figures = self.engine.figures() | tier_load_counters(self.tiers, self.engine.kv_block_model_bytes())
        return WorkerStatus.of(self.worker_id, "prefill", self.incarnation, os.getpid(), figures,
                               self.events.drain() if drain_events else (None, ()), in_flight=self.in_flight,
                               links=tuple(LinkFigures.of(x) for x in self.meter.snapshot()),
                               tiers=tier_figures(self.tiers), pulls=PullFigures.of(self.pull_stats.as_dict()))

    def cached_hashes(self) -> CacheSnapshot:
        """Every cached chain hash by tier, at an event number: a full resync for the router's index."""
        return cache_snapshot(self.engine_thread.run(lambda e: e.block_snapshot()), self.tiers)

    def tier_hashes(self) -> tuple[int, dict[str, list[int]]]:
        """(event sequence number, {"host"|"disk": chain hashes}) of its KV cache tiers (none: off)."""
        return self.tiers.tier_hashes() if self.tiers is not None else (self.events.seq, {})

    def close(self) -> None:
        self.engine_thread.stop()
        self.transport.close()
        if self.tiers is not None:
            self.tiers.close()

