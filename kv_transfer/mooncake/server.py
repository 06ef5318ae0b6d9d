"""MooncakeKVServer: the decode side of the mooncake transport.

A grpc.aio server (on the shared KV loop) serving the Pull stream (mooncake/protocol.py) over a
KVReceiver, and a TransferEngine with host memory registered once at start. Each "stage" message
is landed on a reader thread (read_threads of them), as KVTcpServer lands a frame, on one of two
paths fixed at construction:

direct (contiguous CPU caches; the caches themselves are registered):
    PendingTransfer.target(header)        checked against the reservation before any byte moves
    PendingTransfer.locked(engine.read)   READ from the prefill arena into the reserved blocks
    crc32 of the landed bytes             against the header's
    PendingTransfer.commit(...)           only now do the blocks count as landed

staged (any other cache, e.g. CUDA, or staged=True; one registered host buffer per reader thread,
each staging_bytes >= the prefill side's slot_bytes; the caches are not registered):
    PendingTransfer.target(header)        checked against the reservation before any byte moves
    engine.read                           READ the chunk into this reader's staging buffer
    crc32 of the staged bytes             against the header's: a bad chunk is never written
    PendingTransfer.write(header, k, v)   copy into the reserved blocks under the lock, mark landed

Fencing: a direct READ runs under the reservation's lock, so `KVReceiver.abort()` returns only
when no READ into that request's blocks is in flight, and none starts afterwards: its blocks can
be freed and reused at once. abort() waits for at most one chunk READ (one arena slot; its time is
bounded by Mooncake's MC_TRANSFER_TIMEOUT). A staged READ touches only the reader's own buffer and
runs outside the lock; the copy into the cache is write()'s, under the lock and only while PENDING,
so abort() waits for at most one bounded copy (<= staging_bytes) and nothing lands after it returns.
Chunks are raw cache bytes (codec "none"): the prefill side stages no compressed chunks.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import time
from typing import Sequence

import grpc
import numpy as np
import torch

from pdcluster.kv_transfer.mooncake import protocol as proto
from pdcluster.kv_transfer import wire
from pdcluster.kv_transfer.crc import crc32
from pdcluster.kv_transfer.errors import DataLoss, KVTransferError, MalformedFrame, TransferClosed
from pdcluster.kv_transfer.grpc.base import AioKVServer
from pdcluster.kv_transfer.mooncake.engine import Engine
from pdcluster.kv_transfer.mooncake.transport import DEFAULT_SLOT_BYTES
from pdcluster.kv_transfer.receiver import InboundStream, PendingTransfer, KVReceiver, TransferState

log = logging.getLogger(__name__)


class _PullStream(InboundStream):
    """The reservation one Pull stream is bound to (at "hello"), and its chunk order."""

    def bind(self, request_id: str) -> None:
        self._t_first = time.perf_counter()
        self._entry = self._receiver.claim(request_id)

    def begin(self, header: wire.FrameHeader) -> tuple[PendingTransfer, list[int], list[memoryview] | None]:
        if self._entry is None:
            raise MalformedFrame("stage message before hello")
        if header.request_id != self._entry.request_id:
            raise MalformedFrame(f"chunk for {header.request_id!r} in the stream of {self._entry.request_id!r}")
        self._check_order(header)
        return (self._entry, *self._entry.target(header))


class MooncakeKVServer(AioKVServer):
    """Binds host:port for the control plane (grpc/base.py AioKVServer); the engine's own listeners
    are Mooncake's (see mooncake/engine.py). With a secret, a Pull without the matching
    x-pdcluster-secret metadata is answered UNAUTHENTICATED before anything is read.

    staged: land through host staging buffers (module docstring); forced on for caches that are
    not contiguous CPU tensors. staging_bytes: each buffer's size, the largest chunk (payload
    bytes) accepted on that path; at least the prefill side's slot_bytes."""
    service, method, listener = proto.SERVICE, "Pull", "a decode worker's Mooncake control listener"
    registers_caches = True

    def __init__(self, receiver: KVReceiver, k_caches: Sequence[torch.Tensor], v_caches: Sequence[torch.Tensor],
                 *, host: str = "127.0.0.1", port: int = 0, secret: str | None = None,
                 protocol: str = "tcp", device: str = "", read_threads: int = 4,
                 staged: bool = False, staging_bytes: int = DEFAULT_SLOT_BYTES):
        caches = [*k_caches, *v_caches]
        self.staged = staged or not all(c.device.type == "cpu" and c.is_contiguous() for c in caches)
        super().__init__(receiver, host=host, port=port, secret=secret, max_message_bytes=proto.MAX_MESSAGE_BYTES)
        self.engine = Engine(host, protocol, device)
        self.staging_bytes = staging_bytes
        self._staging: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()  # free buffers, uint8 [staging_bytes]
        if self.staged:  # one per reader thread, so a reader never waits for one
            pin = any(c.is_cuda for c in caches)  # page-locked: faster host -> GPU copies
            for _ in range(read_threads):
                buf = torch.empty(staging_bytes, dtype=torch.uint8, pin_memory=pin)
                self.engine.register(buf)
                self._staging.put(buf)
        else:
            for c in caches:
                self.engine.register(c)
        self._readers = concurrent.futures.ThreadPoolExecutor(read_threads, thread_name_prefix="kv-mooncake-read")

    def _handler(self) -> grpc.RpcMethodHandler:
        return grpc.stream_stream_rpc_method_handler(self._pull)  # raw bytes in and out

    def stop_sync(self, grace: float | None = None) -> None:
        super().stop_sync(grace)
        self._readers.shutdown(wait=True)
        self.engine.close()

    async def _pull(self, requests, context: grpc.aio.ServicerContext):
        """Handle one message at a time (see mooncake/protocol.py); every answer is a yield."""
        if not self._authorized(context):
            yield _error(KVTransferError(f"missing or wrong {wire.SECRET_METADATA_KEY} metadata", "UNAUTHENTICATED"))
            return
        stream, session, read_s = _PullStream(self.receiver), None, 0.0
        loop = asyncio.get_running_loop()
        try:
            async for data in requests:
                msg = proto.unpack(data)
                kind = msg["t"]
                if kind == "hello" and session is None:
                    if msg.get("v") != proto.VERSION or not isinstance(msg.get("rid"), str) \
                            or not isinstance(msg.get("session"), str):
                        raise MalformedFrame(f"bad hello (version {msg.get('v')!r})")
                    stream.bind(msg["rid"])
                    session = msg["session"]
                elif kind == "stage" and session is not None:
                    seq, addr, header = proto.parse_stage(msg)
                    read_s += await loop.run_in_executor(self._readers, self._land, stream, session, addr, header)
                    yield proto.pack("read", seq=seq)
                elif kind == "end" and session is not None:
                    ack = stream.close()
                    yield proto.pack("ack", bytes=ack.bytes_received, seconds=ack.receiver_seconds, read_s=read_s)
                    return
                elif kind == "cancel":
                    raise KVTransferError("the sender cancelled the transfer", "CANCELLED")
                else:
                    raise MalformedFrame(f"unexpected {kind!r} message")
            raise DataLoss("stream ended without end or cancel")
        except KVTransferError as e:  # the reservation fails, the sender gets the status
            stream.fail(e)
            yield _error(e)
        except (asyncio.CancelledError, GeneratorExit) as e:  # the client cancelled or went away
            stream.fail(KVTransferError(f"the Pull stream ended early: {e!r}", "CANCELLED"))
            raise
        except Exception as e:  # a bug: fail, never complete
            log.exception("mooncake Pull stream failed")
            stream.fail(e)
            yield _error(KVTransferError(f"internal error: {e!r}", "INTERNAL"))

    def _land(self, stream: _PullStream, session: str, addr: int, header: wire.FrameHeader) -> float:
        """Land one staged chunk in its reserved blocks (direct or staged path, module docstring);
        seconds the READ took."""
        if header.codec != "none":  # mooncake/protocol.py carries no scales; the arena holds raw bytes
            raise MalformedFrame(f"codec {header.codec!r}: the mooncake transport moves raw cache bytes only")
        entry, positions, views = stream.begin(header)
        if self.staged:
            return self._land_staged(entry, session, addr, header)
        if views is None:
            raise MalformedFrame("the reservation's cache cannot be read into")  # excluded at start
        local = [np.frombuffer(v, dtype=np.uint8).ctypes.data for v in views]
        lengths = [v.nbytes for v in views]
        remote = list(itertools.accumulate(lengths[:-1], initial=addr))  # K runs, then V runs, back to back
        t0 = time.perf_counter()
        try:
            entry.locked(self.engine.read, session, local, remote, lengths)
        except OSError as e:
            raise KVTransferError(f"reading layer {header.layer} chunk {header.chunk}: {e}", "UNAVAILABLE") from None
        seconds = time.perf_counter() - t0
        crc = 0
        for view in views:
            crc = crc32(view, crc)
        if crc != header.crc and entry.state is not TransferState.PENDING:
            raise TransferClosed(f"request {header.request_id!r} is {entry.state.value}: "
                                 f"chunk for layer {header.layer} dropped")
        if crc != header.crc:  # the bytes sit in this request's own blocks, never committed
            raise DataLoss(f"checksum mismatch in layer {header.layer} chunk {header.chunk}: "
                           f"crc32 {crc:#010x}, header says {header.crc:#010x}")
        entry.commit(header, positions)
        return seconds

    def _land_staged(self, entry: PendingTransfer, session: str, addr: int, header: wire.FrameHeader) -> float:
        """READ one chunk (validated by target()) into a staging buffer, checksum it there, then
        write() it into the reserved blocks; seconds the READ took."""
        if header.nbytes > self.staging_bytes:
            raise MalformedFrame(f"layer {header.layer} chunk {header.chunk} is {header.nbytes} bytes, over this "
                                 f"decode worker's {self.staging_bytes}-byte mooncake staging buffer: the "
                                 f"prefill side's slot_bytes must not exceed the decode side's staging_bytes")
        buf = self._staging.get()  # at most read_threads landings at once: never empty
        try:
            t0 = time.perf_counter()
            try:  # outside the lock: the READ writes only this reader's own buffer
                self.engine.read(session, [buf.data_ptr()], [addr], [header.nbytes])
            except OSError as e:
                raise KVTransferError(f"reading layer {header.layer} chunk {header.chunk}: {e}",
                                      "UNAVAILABLE") from None
            seconds = time.perf_counter() - t0
            crc = crc32(memoryview(buf.numpy())[:header.nbytes])
            if crc != header.crc and entry.state is not TransferState.PENDING:
                raise TransferClosed(f"request {header.request_id!r} is {entry.state.value}: "
                                     f"chunk for layer {header.layer} dropped")
            if crc != header.crc:  # nothing of it was written to the cache
                raise DataLoss(f"checksum mismatch in layer {header.layer} chunk {header.chunk}: "
                               f"crc32 {crc:#010x}, header says {header.crc:#010x}")
            # copies (synchronously) out of buf under the reservation's lock, iff still PENDING
            entry.write(header, *wire.payload_tensors(header, buf[:header.nbytes], keep_codes=True))
        finally:
            self._staging.put(buf)
        return seconds


def _error(e: KVTransferError) -> bytes:
    return proto.pack("error", status=e.status, message=str(e))
