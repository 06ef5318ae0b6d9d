"""KVTransport over plain TCP (tcp/protocol.py): one persistent connection per decode address.

Threads per connection (tcp/connection.py): a writer, which connects, proves the secret, then turns
queued pieces into frames; and a reader, which turns ACK / ERROR / CLOSE into each sender's result. `send_layer`
(the compute thread) only enqueues, so layer l is written while layer l+1 computes; the blocking
socket calls and the checksum release the GIL. Requests to one address share the connection: the
writer handles one piece at a time, so pieces of different requests interleave frame-run by
frame-run, and each request's stream ends with END (or CANCEL after abort()).

A connection that fails (refused, bad secret, reset, CLOSE) fails every request on it with the
reason's status; the next open() to that address connects afresh.
"""
from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Sequence

import torch

from pdcluster.kv_transfer import codec as kvcodec
from pdcluster.kv_transfer.errors import KVTransferError
from pdcluster.kv_transfer.malloc_tuning import keep_large_buffers
from pdcluster.kv_transfer.meter import BandwidthMeter
from pdcluster.kv_transfer.tcp import protocol as proto
from pdcluster.kv_transfer.tcp.connection import CANCEL, END, PROBE, Connection
from pdcluster.kv_transfer.transport import KVTransport, LayerwiseSender, TransferStats

PROBE_BYTES = 4 << 20  # default size of an idle-link probe
_HEADER_ROOM = 64 << 10  # bytes a frame may exceed its payload by (prefix + msgpack header)


class TcpKVTransport(KVTransport):
    """One per prefill process. `bandwidth_limit_bytes_per_s` paces each connection (all requests
    to one address together) with a token bucket of one frame's burst, emulating a slow link. Its
    busy time (TransferStats.busy_s, hence the meter) counts the bucket's waits and is at least
    wire bytes / limit: the burst is pacing slack, not capacity, so a transfer smaller than one
    burst does not make the emulated link look faster than its rate. `netns` (an `ip netns` name):
    each connection's socket is created inside that network namespace (kv_transfer/netns.py), so
    its bytes take that namespace's routes, e.g. a real shaped link (deploy/netns.py)."""

    codecs = kvcodec.CODECS  # what open(codec=...) accepts

    def __init__(self, *, chunk_bytes: int = proto.DEFAULT_CHUNK_BYTES, secret: str | None = None,
                 bandwidth_limit_bytes_per_s: float | None = None,
                 meter: BandwidthMeter | None = None, src_id: str = "local",
                 connect_timeout_s: float = proto.HANDSHAKE_TIMEOUT_S, netns: str | None = None):
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be > 0, got {chunk_bytes}")
        self.chunk_bytes = chunk_bytes
        self.meter, self.src_id = meter, src_id
        self.secret = secret
        self.limit = bandwidth_limit_bytes_per_s
        self.connect_timeout_s = connect_timeout_s
        self.netns = netns
        self._lock = threading.Lock()
        self._conns: dict[str, Connection] = {}
        keep_large_buffers()

    def open(self, address: str, request_id: str, dst_block_ids: Sequence[int],
             dst_id: str | None = None, codec: str = "none") -> LayerwiseSender:
        """codec: how this request's K/V go on the wire (codec.py), encoded on the writer thread."""
        kvcodec.check_codec(codec)
        conn = None
        if dst_block_ids:  # an empty reservation needs no connection
            with self._lock:
                conn = self._conns.get(address)
                if conn is None or conn.dead:
                    conn = self._conns[address] = Connection(self, address)
        sender = TcpLayerwiseSender(self, conn, address, dst_id or address, request_id, dst_block_ids,
                                    codec)
        if conn is not None:
            conn.register(sender)
        return sender

    def probe(self, address: str, dst_id: str | None = None, nbytes: int = PROBE_BYTES,
              timeout: float = 30.0) -> float:
        """Measure the link to `address` with nbytes of filler that the server reads and drops (an
        idle link has no fresh transfer figures); returns bytes/s and records it in the meter as one
        sample of link (src_id, dst_id or address). Paced like transfers on a throttled transport.
        Raises KVTransferError if the link fails, TimeoutError past `timeout` seconds."""
        if not 0 < nbytes <= proto.MAX_PROBE_BYTES:
            raise ValueError(f"a probe is 1..{proto.MAX_PROBE_BYTES} bytes, got {nbytes}")
        with self._lock:
            conn = self._conns.get(address)
            if conn is None or conn.dead:
                conn = self._conns[address] = Connection(self, address)
        result: concurrent.futures.Future = concurrent.futures.Future()
        if not conn.put((result, PROBE, nbytes)):
            raise KVTransferError(f"KV connection to {address} failed: {conn.error}", "UNAVAILABLE")
        seconds = result.result(timeout)
        if self.limit is not None:
            seconds = max(seconds, nbytes / self.limit)   # the burst is pacing slack, not capacity
        if self.meter is not None:
            self.meter.record(self.src_id, dst_id or address, nbytes, seconds)
        return nbytes / seconds

    def close(self) -> None:
        with self._lock:
            conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            conn.close()


class TcpLayerwiseSender(LayerwiseSender):
    def __init__(self, transport: TcpKVTransport, conn: Connection | None, address: str,
                 dst_id: str, request_id: str, dst_block_ids: Sequence[int], codec: str = "none"):
        self._init_sender(request_id, address, dst_id, dst_block_ids)
        self._transport, self._conn = transport, conn
        self.codec = codec  # codec.CODECS: how this request's K/V go on the wire
        self._t_open = time.perf_counter()
        self._future: concurrent.futures.Future = concurrent.futures.Future()
        # writer thread only
        self._wire = "new"  # -> "open" (a frame went out) -> "closed" (END or CANCEL went out)
        self._sent = self._wire_bytes = 0
        self._busy = 0.0
        self._t_end = 0.0  # perf_counter() when END was written

    def _frame_limit(self) -> tuple[int, str]:
        return proto.DEFAULT_MAX_FRAME_BYTES - _HEADER_ROOM, "a TCP frame"

    def _enqueue(self, layer: int, first: int, k_blocks: torch.Tensor, v_blocks: torch.Tensor) -> None:
        self._conn.put((self, layer, first, k_blocks, v_blocks))

    def finish(self, timeout: float | None = None) -> TransferStats:
        with self._lock:
            first_call, self._closed = not self._closed, True
        if first_call and self._conn is not None:
            self._conn.put((self, END))
        elif first_call:  # an empty reservation: nothing to send
            self._settle(self._stats(time.perf_counter(), 0.0))
        return self._outcome(timeout)

    def abort(self) -> None:
        with self._lock:
            self._closed = True
        self._future.cancel()  # no-op once finished; finish() then reports the outcome
        if self._conn is not None:  # the writer sends CANCEL if the stream is still open
            self._conn.put((self, CANCEL))

    # any thread
    def _settle(self, result: TransferStats | BaseException) -> None:
        try:
            if isinstance(result, BaseException):
                self._future.set_exception(result)
            else:
                self._future.set_result(result)
        except concurrent.futures.InvalidStateError:
            pass  # aborted (or already failed) first

    def _stats(self, t_ack: float, receiver_s: float) -> TransferStats:
        with self._lock:
            t_first, t_last = self._t_first or self._t_open, self._t_last or self._t_open
        busy = self._busy + (t_ack - self._t_end if self._t_end else 0.0)
        if self._transport.limit is not None:
            busy = max(busy, self._wire_bytes / self._transport.limit)
        return TransferStats(request_id=self.request_id, bytes=self._sent, wire_bytes=self._wire_bytes,
                             wall_s=t_ack - t_first, exposed_s=max(0.0, t_ack - t_last),
                             busy_s=busy, receiver_s=receiver_s)
