"""Prefill worker: batched, chunked prefill with the prefix cache; ships KV layer by layer.

A remote prefill runs the prompt to its first sampled token (max_tokens=1 here; the decode worker
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
from dataclasses import dataclass, replace

import torch

from pdcluster.engine.block_events import BlockEventLog
from pdcluster.engine.engine_thread import EngineThread
from pdcluster.engine.llm_engine import LLMEngine, StepOutput
from pdcluster.engine.sampling_params import SamplingParams
from pdcluster.kv_transfer import (BandwidthMeter, GrpcKVTransport, KVTransferError, LayerwiseSender, MooncakeKVTransport,
                         TcpKVTransport)
from pdcluster.kv_transfer.codec_policy import CompressionPolicy, prefill_seconds

# "mooncake" imports the mooncake package only when built (MooncakeUnavailable if it cannot)
KV_TRANSPORTS = {"tcp": TcpKVTransport, "grpc": GrpcKVTransport, "mooncake": MooncakeKVTransport}

log = logging.getLogger(__name__)


@dataclass
class KVDestination:
    address: str                 # decode worker's KV server "host:port" (of this worker's transport)
    dst_id: str                  # decode worker id (names the link in the meter)
    skip_blocks: int             # leading blocks the decode worker already holds
    dst_block_ids: list[int]     # reserved blocks for the rest, in order


class PrefillWorker:
    def __init__(self, worker_id: str, engine: LLMEngine, secret: str | None = None,
                 bandwidth_limit_bytes_per_s: float | None = None, transfer_timeout_s: float = 30.0,
                 transport: str = "tcp", kv_layerwise: bool = True, kv_compression: str = "off",
                 kv_netns: str | None = None, kv_host: str | None = None):
        """transport: "tcp" (TcpKVTransport), "grpc" (GrpcKVTransport) or "mooncake"
        (MooncakeKVTransport: the decode side pulls over Mooncake); the decode workers must
        advertise the matching server (DecodeWorker's kv_transport). kv_layerwise False: whole-request
        transfer, every layer is handed to the sender after the last layer computed (the baseline
        that layer-wise streaming is measured against). kv_compression: "off", "int8", "fp8" or
        "auto" (kv_transfer/codec_policy.py: per transfer, by the link's measured bandwidth);
        tcp and grpc only (Mooncake moves the cache bytes uncompressed). kv_netns: tcp only, the KV
        connections' sockets are made in that `ip netns` namespace (a shaped link: deploy/netns.py)."""
        if transport not in KV_TRANSPORTS:
            raise ValueError(f"transport must be one of {sorted(KV_TRANSPORTS)}, got {transport!r}")
        self.compression = CompressionPolicy(kv_compression)
        if kv_compression != "off" and not hasattr(KV_TRANSPORTS[transport], "codecs"):
            raise ValueError(f"kv_compression {kv_compression!r} needs the tcp or grpc transport, not {transport!r}")
        if kv_netns is not None and transport != "tcp":
            raise ValueError(f"kv_netns needs the tcp transport, not {transport!r}")
        self.worker_id = worker_id
        self.incarnation = uuid.uuid4().hex   # new on every (re)start of the process
        self.engine = engine
        self.events = BlockEventLog()      # prefix-cache events for the router's global index
        self.events.attach(engine.kv.pool)
        self.meter = BandwidthMeter()
        # kv_host: the address decode workers reach this worker's transport at. Only Mooncake listens
        # on the prefill side (the decode side READs its staging arena), so only it takes one: the
        # node's IP on a multi-node cluster (the actor's bind_node_ip); None: the transport's default
        # (loopback; $PDCLUSTER_MOONCAKE_HOST overrides either, mooncake_transport.mooncake_host).
        extra = {"host": kv_host} if transport == "mooncake" and kv_host else {}
        if kv_netns is not None:
            extra["netns"] = kv_netns
        self.transport = KV_TRANSPORTS[transport](secret=secret, meter=self.meter, src_id=worker_id,
                                                  bandwidth_limit_bytes_per_s=bandwidth_limit_bytes_per_s, **extra)
        self.transfer_timeout_s = transfer_timeout_s
        self.kv_layerwise = kv_layerwise
        # request id -> (sender, skip_blocks, codec); touched on the engine thread only
        self._sends: dict[str, tuple[LayerwiseSender, int, str]] = {}
        self._shipping: list = []        # this step's (sender, source block ids), set at layer 0
        self._lock = threading.Lock()
        self.in_flight = 0
        self.loop = EngineThread(engine, layer_hook=self._on_layer, name=f"prefill-{worker_id}")

    # the layer hook (engine thread): ship this layer of every prompt completing in this step
    # (whole-request mode: every layer at the last one; the cache still holds them all then)
    def _on_layer(self, layer: int, batch) -> None:
        runner = self.engine.runner
        kc = runner.k_caches[layer]
        if layer == 0:   # which prompts complete this step, and their source blocks: once per step
            self._shipping = []
            for i, req in enumerate(batch.reqs):
                entry = self._sends.get(req.request_id)
                if entry is not None and batch.samples(i):
                    ids = torch.tensor(req.block_ids[entry[1]:], dtype=torch.int64, device=kc.device)
                    self._shipping.append((entry[0], ids))
        if self.kv_layerwise:
            layers = (layer,)
        else:
            layers = range(len(runner.k_caches)) if layer == len(runner.k_caches) - 1 else ()
        for sender, ids in self._shipping:
            for li in layers:
                k, v = runner.k_caches[li], runner.v_caches[li]
                sender.send_layer(li, k.index_select(0, ids).cpu(), v.index_select(0, ids).cpu())

    def prefill(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                dest: KVDestination | None, cache_salt: str | None = None) -> dict:
        """Blocking: prefill, stream the KV to `dest`, return the first token and figures."""
        done: Future = Future()
        t0 = time.perf_counter()

        def listener(o: StepOutput) -> None:
            done.set_result((o.new_token_ids[0] if o.new_token_ids else None, o.request))

        def add(engine: LLMEngine):
            req = engine.add_request(prompt_ids, replace(params, max_tokens=1, stop=()), request_id,
                                     cache_salt, detokenize=False)
            if dest is not None:
                n = -(-len(prompt_ids) // engine.cfg.cache.block_size) - dest.skip_blocks
                if n != len(dest.dst_block_ids):
                    engine.abort(request_id)
                    raise ValueError(f"decode reserved {len(dest.dst_block_ids)} blocks, prefill needs {n}")
                codec = self._codec(dest, len(prompt_ids))
                kw = {"codec": codec} if codec != "none" else {}  # Mooncake's open() takes no codec
                sender = self.transport.open(dest.address, request_id, dest.dst_block_ids, dest.dst_id, **kw)
                self._sends[request_id] = (sender, dest.skip_blocks, codec)
            self.loop.listeners[request_id] = listener
            return req

        with self._lock:
            self.in_flight += 1
        try:
            self.loop.run(add)
            token, req = done.result()
            t_prefill = time.perf_counter() - t0
            stats = None
            entry = self.loop.run(lambda e: self._sends.pop(request_id, None))
            if entry is not None:
                if token is None:
                    entry[0].abort()
                    raise KVTransferError("prefill aborted before the KV was sent")
                stats = entry[0].finish(timeout=self.transfer_timeout_s)
            if token is None:
                raise RuntimeError(f"prefill of {request_id} was aborted")
            return dict(first_token=token, cached_tokens=max(req.num_cached_tokens, 0),
                        prefill_s=t_prefill, kv_bytes=stats.bytes if stats else 0,
                        kv_transfer_ms=stats.exposed_s * 1e3 if stats else 0.0,
                        kv_wall_ms=stats.wall_s * 1e3 if stats else 0.0,
                        kv_codec=entry[2] if entry is not None else "none")
        finally:
            with self._lock:
                self.in_flight -= 1

    def _codec(self, dest: KVDestination, tokens: int) -> str:
        """The codec for one transfer (engine thread): the policy, given the uncompressed K+V bytes
        of the reserved blocks, the link's measured bandwidth and the time to prefill `tokens` at
        this worker's learned rate (the whole prompt: its prefix hit is not known yet)."""
        kc = self.engine.runner.k_caches
        nbytes = len(dest.dst_block_ids) * 2 * kc[0][0].numel() * kc[0].element_size() * len(kc)
        stats = self.engine.stats
        return self.compression.choose(nbytes, prefill_seconds(tokens, stats.prefill_tokens, stats.prefill_s),
                                       self.meter.bandwidth(self.worker_id, dest.dst_id))

    def abort(self, request_id: str) -> None:
        def _abort(engine: LLMEngine):
            entry = self._sends.pop(request_id, None)
            if entry:
                entry[0].abort()
            req = engine.scheduler.requests.get(request_id)
            engine.abort(request_id)
            cb = self.loop.listeners.pop(request_id, None)
            if cb and req is not None:
                cb(StepOutput(req, [], "", True))
        self.loop.run(_abort)

    def probe(self, address: str, dst_id: str) -> float | None:
        """Measure the idle link to a decode worker's KV endpoint (bytes/s, also a meter sample, so
        it reaches the router with the next status); None where the transport has no probe."""
        probe = getattr(self.transport, "probe", None)
        return probe(address, dst_id, timeout=self.transfer_timeout_s) if probe is not None else None

    def status(self, drain_events: bool = False) -> dict:
        """Load figures; with drain_events (the router's poll) also the block events since the last drain."""
        e = self.engine
        seq, events = self.events.drain() if drain_events else (None, [])
        return dict(worker_id=self.worker_id, role="prefill", incarnation=self.incarnation, pid=os.getpid(),
                    in_flight=self.in_flight,
                    links=self.meter.snapshot(), block_seq=seq, block_events=events, **e.figures())

    def cached_hashes(self) -> tuple[int, list[int]]:
        """(event sequence number, every cached chain hash): a full resync for the router's index."""
        return self.loop.run(lambda e: self.events.snapshot(e.kv.pool))

    def close(self) -> None:
        self.loop.stop()
        self.transport.close()

