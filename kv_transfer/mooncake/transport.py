"""KVTransport through the Mooncake Transfer Engine, pull mode: the decode side READs staged KV.

Per request: send_layer() (compute thread) only enqueues; a coroutine on the shared KV loop
stages each chunk (whole blocks, at most one arena slot of K+V bytes) into the registered staging
arena on a stager thread (copy + crc32), then tells the decode worker over the Pull stream
(mooncake/protocol.py) where it is. The decode worker READs it straight into the reserved cache
blocks (or, for GPU caches, into a host staging buffer: mooncake/server.py), checksums, lands it
and answers "read"; the slot is then free for the next chunk. K and V may be on any device. The
final "ack" is the ownership handoff, as the TCP/gRPC acks.

Why pull: a READ is issued by the side that owns the destination blocks, under the reservation's
lock, so abort and fencing stay local to the decode worker. One-sided WRITEs from here could land
in blocks the decode worker already freed and reused.

Slots of a stream still held when it ends (error, cancel) are released once the server answered
(it handles one message at a time, so no READ of them is in flight) or, if it never answers, after
the RPC is cancelled: a READ that outlives that lands only in its own failing reservation.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
from typing import Sequence

import grpc
import torch

from pdcluster.kv_transfer.mooncake import protocol as proto
from pdcluster.kv_transfer import wire
from pdcluster.kv_transfer.crc import crc32
from pdcluster.kv_transfer.errors import KVTransferError
from pdcluster.kv_transfer.grpc.base import Channels
from pdcluster.kv_transfer.loop_thread import shared_loop
from pdcluster.kv_transfer.meter import BandwidthMeter
from pdcluster.kv_transfer.mooncake.arena import ArenaFull, StagingArena
from pdcluster.kv_transfer.mooncake.engine import Engine
from pdcluster.kv_transfer.transport import END, KVTransport, LayerwiseSender, LoopSender, TransferStats

_CANCEL = object()  # queue item besides (layer, first, k, v) and END
DEFAULT_ARENA_BYTES = 256 << 20
DEFAULT_SLOT_BYTES = 4 << 20  # payload bytes per staged chunk (one READ batch on the decode side)
HOST_ENV = "PDCLUSTER_MOONCAKE_HOST"


def mooncake_host(host: str | None = None) -> str:
    """The address decode workers reach this process's Transfer Engine at: $PDCLUSTER_MOONCAKE_HOST
    when set (an operator's explicit choice, e.g. one NIC of several), else `host` (the prefill
    worker passes its node's IP on a multi-node cluster), else loopback (one host)."""
    return os.environ.get(HOST_ENV) or host or "127.0.0.1"


class MooncakeKVTransport(KVTransport):
    """One per prefill process: one TransferEngine, one registered staging arena.

    host: the address the decode workers reach this engine at (mooncake_host: $PDCLUSTER_MOONCAKE_HOST
    overrides it; None: 127.0.0.1). protocol "tcp" or "rdma", device: RDMA device names ("" = all).
    stage_timeout_s: how long a chunk may wait for a free slot before its request fails
    (RESOURCE_EXHAUSTED)."""

    def __init__(self, *, secret: str | None = None, meter: BandwidthMeter | None = None,
                 src_id: str = "local", bandwidth_limit_bytes_per_s: float | None = None,
                 host: str | None = None, protocol: str = "tcp", device: str = "",
                 arena_bytes: int = DEFAULT_ARENA_BYTES, slot_bytes: int = DEFAULT_SLOT_BYTES,
                 stage_timeout_s: float = 10.0):
        if bandwidth_limit_bytes_per_s is not None:
            raise ValueError("the mooncake transport cannot emulate a slow link; use the tcp transport")
        self.meter, self.src_id = meter, src_id
        self.stage_timeout_s = stage_timeout_s
        self.host = mooncake_host(host)
        self.engine = Engine(self.host, protocol, device)
        self.arena = StagingArena(arena_bytes, slot_bytes)
        self.engine.register(self.arena.buffer)
        self._metadata = ((wire.SECRET_METADATA_KEY, secret),) if secret is not None else ()
        self._stagers = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="kv-mooncake-stage")
        self._loop = shared_loop()
        self._channels = Channels(proto.MAX_MESSAGE_BYTES)  # loop thread only

    def open(self, address: str, request_id: str, dst_block_ids: Sequence[int],
             dst_id: str | None = None) -> LayerwiseSender:
        return MooncakeLayerwiseSender(self, address, dst_id or address, request_id, dst_block_ids)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._channels.close(), self._loop).result()
        self._stagers.shutdown(wait=True)
        self.engine.close()

    def _pull(self, address: str):  # loop thread
        return self._channels.get(address).stream_stream(proto.PULL_METHOD)  # raw bytes both ways


class MooncakeLayerwiseSender(LoopSender):
    def __init__(self, transport: MooncakeKVTransport, address: str, dst_id: str, request_id: str,
                 dst_block_ids: Sequence[int]):
        self._init_sender(request_id, address, dst_id, dst_block_ids)
        self._transport = transport
        self._stop = False  # abort() called: a stager waiting for a slot gives up
        self._peer_done = False  # the server answered (ack or error): a stager waiting for a slot gives up
        self._seq = 0  # next chunk number of this stream; loop side
        self._start(transport._loop)

    def _frame_limit(self) -> tuple[int, str]:
        return self._transport.arena.slot_bytes, "a staging slot"

    def abort(self) -> None:
        with self._lock:
            if self._closed and self._stop:
                return
            self._closed = self._stop = True
        self._put(_CANCEL)
        self._transport.arena.wake()

    # stager thread
    def _stage(self, layer: int, ids: Sequence[int], k: torch.Tensor, v: torch.Tensor, chunk: int,
               chunks: int) -> tuple[int, wire.FrameHeader] | None:
        """Copy one chunk (K, V on any device, any layout) into a free slot: (slot, its header), or
        None if aborted meanwhile."""
        arena = self._transport.arena
        try:
            slot = arena.acquire(self._transport.stage_timeout_s, stop=lambda: self._stop or self._peer_done)
        except ArenaFull as e:
            raise KVTransferError(f"KV staging arena full: {e}", "RESOURCE_EXHAUSTED") from None
        if slot is None:
            return None
        kb, vb = k.reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)  # on k's device
        dst = arena.view(slot, kb.numel() + vb.numel())  # host
        dst[:kb.numel()].copy_(kb)  # device -> host: synchronous (blocking copy_), before the crc
        dst[kb.numel():].copy_(vb)
        header = wire.FrameHeader(self.request_id, layer, tuple(ids), wire._DTYPE_NAMES[k.dtype],
                                  tuple(k.shape), dst.numel(), crc32(dst.numpy()), chunk, chunks)
        return slot, header

    # loop thread
    async def _run(self) -> TransferStats:
        t_open = time.perf_counter()
        if not self._dst:  # an empty reservation: nothing to move, no RPC
            while (await self._queue.get()) not in (END, _CANCEL):
                pass
            return self._stats(t_open, time.perf_counter(), 0, {})
        t = self._transport
        loop = asyncio.get_running_loop()
        held: dict[int, int] = {}  # seq -> slot: staged, not reported read yet
        call = t._pull(self.address)(metadata=t._metadata)
        reader = asyncio.ensure_future(self._read(call, held))
        reader.add_done_callback(self._on_peer_done)
        sent, item = 0, None
        try:
            try:
                await call.write(proto.pack("hello", v=proto.VERSION, rid=self.request_id,
                                            session=t.engine.session_id))
                while item not in (END, _CANCEL):
                    getter = asyncio.ensure_future(self._queue.get())
                    await asyncio.wait((getter, reader), return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():  # the server answered early: an error
                        getter.cancel()
                        break
                    item = getter.result()
                    if item in (END, _CANCEL):
                        break
                    sent += await self._send_piece(loop, call, held, *item)
                    del item
                    item = None
                cancel = self._stop
                await call.write(proto.pack("cancel" if cancel else "end"))
                await call.done_writing()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass  # the RPC ended under us: the reader has the reason
            timeout = proto.CANCEL_GRACE_S if self._stop else None
            ack = await asyncio.wait_for(asyncio.shield(reader), timeout)
            if self._stop:
                raise KVTransferError(f"transfer of {self.request_id!r} was aborted", "CANCELLED")
        except asyncio.TimeoutError:
            raise KVTransferError(f"transfer of {self.request_id!r} was aborted "
                                  f"(no answer from {self.address})", "CANCELLED") from None
        finally:
            if not (reader.done() and not reader.cancelled() and reader.exception() is None):
                call.cancel()  # no ack: stop the RPC (after an ack the server ends it itself)
            reader.cancel()
            for slot in held.values():
                t.arena.release(slot)
            held.clear()
            while not self._queue.empty():  # drop tensors queued behind a failure
                self._queue.get_nowait()
        t_ack = time.perf_counter()
        if t.meter is not None and sent and ack.get("read_s", 0) > 0:
            t.meter.record(t.src_id, self.dst_id, sent, ack["read_s"])
        return self._stats(t_open, t_ack, sent, ack)

    def _on_peer_done(self, _reader) -> None:
        """The server ended the stream (e.g. the decode side aborted): slots it holds are never
        reported read, so a stager waiting for one must not wait out its timeout."""
        self._peer_done = True
        self._transport.arena.wake()

    async def _send_piece(self, loop, call, held: dict[int, int], layer: int, first: int,
                          k: torch.Tensor, v: torch.Tensor) -> int:
        """Stage and announce one piece's chunks, numbered on from self._seq; payload bytes staged."""
        t = self._transport
        k, v = k.detach(), v.detach()  # any device: _stage copies each chunk into the arena
        n = k.shape[0]
        block_bytes = 2 * k[:1].numel() * k.element_size()
        per_chunk = max(1, t.arena.slot_bytes // block_bytes) if block_bytes else max(1, n)
        chunks, staged = -(-n // per_chunk), 0
        for c in range(chunks):
            lo, hi = c * per_chunk, min(n, (c + 1) * per_chunk)
            ids = self._dst[first + lo:first + hi]
            got = await loop.run_in_executor(t._stagers, self._stage, layer, ids, k[lo:hi], v[lo:hi], c, chunks)
            if got is None:  # aborted
                return staged
            slot, header = got
            seq, self._seq = self._seq, self._seq + 1
            held[seq] = slot
            await call.write(proto.stage_message(seq, t.arena.address(slot), header))
            staged += header.nbytes
        return staged

    async def _read(self, call, held: dict[int, int]) -> dict:
        """Release slots as the server reads them; the "ack" message, or raise its error."""
        arena = self._transport.arena
        while (data := await call.read()) is not grpc.aio.EOF:
            msg = proto.unpack(data)
            if msg["t"] == "read" and (slot := held.pop(msg.get("seq"), None)) is not None:
                arena.release(slot)
            elif msg["t"] == "ack":
                return msg
            elif msg["t"] == "error":
                raise KVTransferError(f"KV transfer of {self.request_id!r} to {self.address} failed: "
                                      f"{msg.get('status')}: {msg.get('message')}", msg.get("status", "UNKNOWN"))
        code = await call.code()
        raise KVTransferError(f"KV transfer of {self.request_id!r} to {self.address} failed: "
                              f"{code.name}: {await call.details()}",
                              code.name if code != grpc.StatusCode.OK else "DATA_LOSS")

    def _stats(self, t_open: float, t_ack: float, sent: int, ack: dict) -> TransferStats:
        with self._lock:
            t_first, t_last = self._t_first or t_open, self._t_last or t_open
        return TransferStats(request_id=self.request_id, bytes=sent, wire_bytes=sent,
                             wall_s=t_ack - t_first, exposed_s=max(0.0, t_ack - t_last),
                             busy_s=ack.get("read_s", 0.0), receiver_s=ack.get("seconds", 0.0))
