"""KVTransport over gRPC/TCP: one client-streaming Push RPC per request, driven on the shared loop.

Threads: `send_layer` (compute thread) only enqueues onto an asyncio.Queue via
`call_soon_threadsafe`; the per-request coroutine on the shared loop thread chunks, checksums and
writes frames while the compute thread runs the next layer (torch matmuls release the GIL).
Device tensors are copied to CPU by that coroutine, so the compute thread never waits on it.
"""
from __future__ import annotations

import asyncio
import time
from typing import Sequence

import grpc

from pdcluster.kv_transfer import codec as kvcodec
from pdcluster.kv_transfer import wire
from pdcluster.kv_transfer.errors import KVTransferError
from pdcluster.kv_transfer.grpc.base import Channels
from pdcluster.kv_transfer.loop_thread import shared_loop
from pdcluster.kv_transfer.malloc_tuning import keep_large_buffers
from pdcluster.kv_transfer.meter import BandwidthMeter
from pdcluster.kv_transfer.throttle import TokenBucket
from pdcluster.kv_transfer.transport import END, KVTransport, LayerwiseSender, LoopSender, TransferStats

_HEADER_ROOM = 64 << 10  # bytes a frame may exceed chunk_bytes by (prefix + msgpack header)


class GrpcKVTransport(KVTransport):
    """One per prefill process. Channels and throttles are per decode address, touched only on
    the shared loop thread. `bandwidth_limit_bytes_per_s` paces all streams to one address
    together (a token bucket with a one-frame burst), emulating a slow link. Its busy time
    (TransferStats.busy_s, hence the meter) counts the bucket's waits and is at least wire bytes /
    limit: the burst is pacing slack, not capacity (as TcpKVTransport)."""

    codecs = kvcodec.CODECS  # what open(codec=...) accepts

    def __init__(self, *, chunk_bytes: int = wire.DEFAULT_CHUNK_BYTES,
                 max_message_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES, secret: str | None = None,
                 bandwidth_limit_bytes_per_s: float | None = None,
                 meter: BandwidthMeter | None = None, src_id: str = "local"):
        if not 0 < chunk_bytes <= max_message_bytes - _HEADER_ROOM:
            raise ValueError(f"chunk_bytes {chunk_bytes} must leave {_HEADER_ROOM} bytes of room "
                             f"under max_message_bytes {max_message_bytes}")
        self.chunk_bytes = chunk_bytes
        self.meter, self.src_id = meter, src_id
        self._max_message_bytes = max_message_bytes
        self._metadata = ((wire.SECRET_METADATA_KEY, secret),) if secret is not None else ()
        self._limit = bandwidth_limit_bytes_per_s
        self._loop = shared_loop()
        self._channels = Channels(max_message_bytes)  # loop thread only, as _pushes
        self._pushes: dict[str, grpc.aio.StreamUnaryMultiCallable] = {}
        self._buckets: dict[str, TokenBucket] = {}
        keep_large_buffers()

    def open(self, address: str, request_id: str, dst_block_ids: Sequence[int],
             dst_id: str | None = None, codec: str = "none") -> LayerwiseSender:
        """codec: how this request's K/V go on the wire (codec.py), encoded on the loop thread."""
        kvcodec.check_codec(codec)
        return GrpcLayerwiseSender(self, address, dst_id or address, request_id, dst_block_ids, codec)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result()

    async def _close(self) -> None:
        self._pushes.clear()
        await self._channels.close()

    # loop thread only, below
    def _push(self, address: str) -> grpc.aio.StreamUnaryMultiCallable:
        if address not in self._pushes:  # raw bytes both ways
            self._pushes[address] = self._channels.get(address).stream_unary(wire.PUSH_METHOD)
        return self._pushes[address]

    def _bucket(self, address: str) -> TokenBucket | None:
        if self._limit is None:
            return None
        if address not in self._buckets:
            self._buckets[address] = TokenBucket(self._limit, burst=self.chunk_bytes)
        return self._buckets[address]


class GrpcLayerwiseSender(LoopSender):
    def __init__(self, transport: GrpcKVTransport, address: str, dst_id: str, request_id: str,
                 dst_block_ids: Sequence[int], codec: str = "none"):
        self._init_sender(request_id, address, dst_id, dst_block_ids)
        self._transport = transport
        self.codec = codec
        self._start(transport._loop)

    def _frame_limit(self) -> tuple[int, str]:
        return self._transport._max_message_bytes - _HEADER_ROOM, "a gRPC message"

    def abort(self) -> None:
        with self._lock:
            self._closed = True
        self._future.cancel()  # cancels _run on the loop, which cancels the RPC

    def _wake_if_rejected(self, notice: asyncio.Future) -> None:
        if _rejected(notice):  # a sender idle between layers must half-close now, not at finish()
            self._queue.put_nowait(END)

    async def _run(self) -> TransferStats:
        t_open = time.perf_counter()
        sent = wire_bytes = 0
        busy = receiver_s = 0.0
        call = notice = None
        if self._dst:  # an empty reservation needs no RPC; open early so connecting overlaps compute
            call = self._transport._push(self.address)(metadata=self._transport._metadata)
            # the server's initial metadata arrives early only when it rejects the stream
            notice = asyncio.ensure_future(call.initial_metadata())
            notice.add_done_callback(self._wake_if_rejected)
        bucket = self._transport._bucket(self.address)
        try:
            while not _rejected(notice) and (item := await self._queue.get()) is not END:
                layer, first, k, v = item
                ids = self._dst[first:first + k.shape[0]]
                for frame in wire.encode_chunks(self.request_id, layer, ids, k, v,
                                                self._transport.chunk_bytes, self.codec):
                    if _rejected(notice):  # stop writing: half-close below, then read the status
                        break
                    t0 = time.perf_counter()
                    if bucket is not None and (delay := bucket.reserve(len(frame))) > 0:
                        await asyncio.sleep(delay)  # the emulated link is busy with earlier bytes
                    await _write(call, frame)
                    busy += time.perf_counter() - t0
                    wire_bytes += len(frame)
                sent += kvcodec.payload_bytes(self.codec, k.shape, k.dtype)
                del item, k, v  # free the layer's tensors while waiting for the next one
            t0 = time.perf_counter()
            if call is not None:
                await call.done_writing()
                ack = wire.decode_ack(await call)
                receiver_s = ack.receiver_seconds
            t_ack = time.perf_counter()
            busy += t_ack - t0
        except grpc.aio.AioRpcError as e:
            raise KVTransferError(f"KV transfer of {self.request_id!r} to {self.address} failed: "
                                  f"{e.code().name}: {e.details()}", e.code().name) from None
        finally:
            if call is not None:
                call.cancel()  # no-op once the RPC has finished
                notice.cancel()
            while not self._queue.empty():  # drop tensors queued behind a failure
                self._queue.get_nowait()
        if self._transport._limit is not None:
            busy = max(busy, wire_bytes / self._transport._limit)
        if self._transport.meter is not None and sent:  # wire bytes/s (headers, scales included)
            self._transport.meter.record(self._transport.src_id, self.dst_id, wire_bytes, busy)
        with self._lock:
            t_first, t_last = self._t_first or t_open, self._t_last or t_open
        return TransferStats(request_id=self.request_id, bytes=sent, wire_bytes=wire_bytes,
                             wall_s=t_ack - t_first, exposed_s=max(0.0, t_ack - t_last),
                             busy_s=busy, receiver_s=receiver_s)


def _rejected(notice: asyncio.Future | None) -> bool:
    """True once the server sent its early "rejected" initial metadata (wire.REJECTED_METADATA_KEY)."""
    if notice is None or not notice.done() or notice.cancelled() or notice.exception() is not None:
        return False
    return any(key == wire.REJECTED_METADATA_KEY for key, _ in notice.result())


async def _write(call: grpc.aio.StreamUnaryCall, frame: bytes) -> None:
    try:
        await call.write(frame)
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        # The RPC ended under us (the server went away, or cut off a rejected stream). A write
        # racing that end may report a local INTERNAL error; awaiting the call yields the status
        # the server sent when it arrived after that error.
        await call
        raise
