"""One TCP connection of TcpKVTransport to one decode address: its socket, writer and reader threads.

The writer connects, proves the secret, then turns queued pieces into frames (crc32 once, header,
sendmsg of [head, K, V] memoryviews: no join, no copy in user space); the reader turns ACK / ERROR /
CLOSE / PROBED into each sender's (or probe's) result. Queue items: (sender, layer, first, k, v),
(sender, END), (sender, CANCEL), (future, PROBE, nbytes), or STOP.
"""
from __future__ import annotations

import collections
import concurrent.futures
import queue
import socket
import threading
import time
from typing import TYPE_CHECKING

import torch

from pdcluster.kv_transfer import netns as kvnetns
from pdcluster.kv_transfer import wire
from pdcluster.kv_transfer.errors import KVTransferError
from pdcluster.kv_transfer.tcp import protocol as proto
from pdcluster.kv_transfer.throttle import TokenBucket

MAX_ADDRESS = 300     # characters of a "host:port" address


def parse_address(address) -> tuple[str, int]:
    """(host, port) of a KV server address "host:port" or "[v6 host]:port". A pull order carries a peer's address,
    so anything else (no port, a port that is not 1..65535 in ASCII digits, blanks or control characters in the
    host, an overlong string) is a ValueError, before a connection or a thread is made for it."""
    if not isinstance(address, str):
        raise ValueError(f"a KV address is a 'host:port' string, not {type(address).__name__}")
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if (not sep or not host or len(address) > MAX_ADDRESS or not (port.isascii() and port.isdigit())
            or not 0 < int(port) < 65536 or not all(c.isprintable() and not c.isspace() for c in host)):
        raise ValueError(f"not a KV address (host:port): {address[:80]!r}")
    return host, int(port)


if TYPE_CHECKING:
    from pdcluster.kv_transfer.tcp.transport import TcpKVTransport, TcpLayerwiseSender

END, CANCEL, STOP, PROBE = object(), object(), object(), object()  # besides (sender, layer, first, k, v)
_BATCH_BYTES = 1 << 20  # a sendmsg takes frames until it holds this much: each frame's crc32 has
# just read its bytes, so the kernel's copy finds them in L2 (crc32 of a whole layer, then one
# sendmsg, reads them from DRAM twice: 0.59-0.68 of a raw socket against 0.70-0.82, bench/transfer.py)
_BATCH_FRAMES = 256  # frames per sendmsg at most (3 buffers each; Linux takes at most 1024)
_READER_GRACE_S = 2.0  # after a failed write, how long the reader may take to report the server's reason


class Connection:
    """One socket to one decode address, with its writer and reader threads."""

    def __init__(self, transport: TcpKVTransport, address: str):
        self._host, self._port = parse_address(address)      # ValueError before any thread or cache entry
        self.transport, self.address = transport, address
        self.dead = False
        self.error: KVTransferError | None = None
        self._lock = threading.Lock()  # guards dead, error, inflight
        self._inflight: dict[str, TcpLayerwiseSender] = {}  # registered, no ACK/ERROR yet
        self._probes: collections.deque = collections.deque()  # (future, t0) of PROBEs sent, unanswered
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._sock: socket.socket | None = None
        self._reader: threading.Thread | None = None
        limit = transport.limit
        self._bucket = TokenBucket(limit, burst=transport.chunk_bytes) if limit is not None else None
        self._writer = threading.Thread(target=self._write_loop, name=f"kv-tcp-send-{address}", daemon=True)
        self._writer.start()

    def register(self, sender: TcpLayerwiseSender) -> None:
        with self._lock:
            error = self.error
            if error is None and sender.request_id in self._inflight:
                error = KVTransferError(f"request {sender.request_id!r} is already being sent to "
                                        f"{self.address}", "ALREADY_EXISTS")
            elif error is None:
                self._inflight[sender.request_id] = sender
        if error is not None:
            sender._settle(KVTransferError(str(error), error.status))

    def put(self, item: tuple) -> bool:
        """Queue an item for the writer; False once the connection is dead (nothing queued)."""
        with self._lock:
            if not self.dead:
                self._queue.put(item)
            return not self.dead

    def close(self) -> None:
        self._fail_all(KVTransferError(f"KV transport to {self.address} closed", "CANCELLED"))
        for thread in (self._writer, self._reader):
            if thread is not None and thread is not threading.current_thread():
                thread.join(5.0)

    def _fail_all(self, error: KVTransferError) -> None:
        """Fail every registered request with `error` (the first reason wins) and cut the socket."""
        with self._lock:
            if self.dead:
                return
            self.dead, self.error = True, error
            senders, self._inflight = list(self._inflight.values()), {}
            probes, self._probes = list(self._probes), collections.deque()
            while True:   # probes still queued: nobody else will answer them
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not STOP and len(item) == 3 and item[1] is PROBE:
                    probes.append((item[0], 0.0))
        for sender in senders:
            sender._settle(KVTransferError(str(error), error.status))
        for result, _ in probes:
            if not result.done():
                result.set_exception(KVTransferError(str(error), error.status))
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._queue.put(STOP)

    def _pop(self, rid, sender: TcpLayerwiseSender | None = None) -> TcpLayerwiseSender | None:
        """Unregister rid (only if registered by `sender`, when given)."""
        with self._lock:
            found = self._inflight.get(rid)
            if found is None or (sender is not None and found is not sender):
                return None
            return self._inflight.pop(rid)

    # writer thread
    def _connect(self) -> socket.socket:
        timeout = self.transport.connect_timeout_s
        sock = kvnetns.create_connection(self.transport.netns, (self._host, self._port), timeout=timeout)
        try:
            proto.tune(sock)
            msg = proto.recv_control(sock, expect=(proto.HELLO, proto.CLOSE))
            if msg is None or msg[0] == proto.CLOSE:
                body = msg[1] if msg else {}
                raise KVTransferError(f"KV server {self.address} refused the connection: "
                                      f"{body.get('message', 'closed')}", body.get("status", "UNAVAILABLE"))
            hello = msg[1]
            if hello.get("proto") != proto.PROTO or hello.get("v") != proto.VERSION:
                raise KVTransferError(f"{self.address} speaks {hello.get('proto')!r} "
                                      f"v{hello.get('v')!r}, not {proto.PROTO} v{proto.VERSION}", "UNAVAILABLE")
            proto.send_control(sock, proto.AUTH, {"v": proto.VERSION,
                                                  "mac": proto.mac(self.transport.secret, hello["nonce"])})
            kind, body = proto.recv_control(sock, expect=(proto.WELCOME, proto.CLOSE)) or (proto.CLOSE, {})
            if kind == proto.CLOSE:
                raise KVTransferError(f"KV server {self.address} refused the connection: "
                                      f"{body.get('message', 'closed')}", body.get("status", "UNAVAILABLE"))
            sock.settimeout(None)           # the reader waits for answers as long as it likes,
            proto.send_deadline(sock)       # the writer not: a peer that stops reading fails it
            return sock
        except BaseException:
            sock.close()
            raise

    def _write_loop(self) -> None:
        try:
            sock = self._connect()
        except KVTransferError as e:
            if e.status == "INVALID_ARGUMENT":  # not our protocol on the other end
                e = KVTransferError(f"{self.address} is not a KV TCP server: {e}", "UNAVAILABLE")
            self._fail_all(e)
            return
        except Exception as e:      # noqa: BLE001 - whatever the connect raised, every sender hears of it
            self._fail_all(KVTransferError(f"cannot connect to KV server {self.address}: {e!r}", "UNAVAILABLE"))
            return
        with self._lock:
            self._sock = sock
            dead = self.dead
        if dead:  # closed while connecting
            sock.close()
            return
        self._reader = threading.Thread(target=self._read_loop, args=(sock,),
                                        name=f"kv-tcp-recv-{self.address}", daemon=True)
        self._reader.start()
        try:
            while (item := self._queue.get()) is not STOP:
                sender = item[0]
                if item[1] is PROBE:
                    self._probe(sock, sender, item[2])
                elif item[1] is END:
                    self._end(sock, sender, cancel=sender._future.cancelled())
                elif item[1] is CANCEL:
                    self._end(sock, sender, cancel=True)
                elif not sender._future.done():
                    try:
                        self._write_piece(sock, *item)
                    except OSError:
                        raise
                    except Exception as e:      # noqa: BLE001 - this piece's own failure (its encoding, memory):
                        # frames go out whole, so the stream stays readable; only this sender fails (its END
                        # follows, and the server fails its reservation), not every sender on the connection
                        sender._settle(KVTransferError(f"KV transfer of {sender.request_id!r} to {self.address}: "
                                                       f"a piece could not be sent: {e!r}", "INTERNAL"))
                del item, sender  # free the piece's tensors while waiting for the next one
        except OSError as e:
            self._reader.join(_READER_GRACE_S)  # it reports the server's CLOSE reason, if any
            self._fail_all(KVTransferError(f"KV connection to {self.address} broke: {e!r}", "UNAVAILABLE"))
        finally:
            self._fail_all(KVTransferError(f"KV transport to {self.address} closed", "CANCELLED"))
            sock.close()

    def _write_piece(self, sock: socket.socket, sender: TcpLayerwiseSender, layer: int, first: int,
                     k: torch.Tensor, v: torch.Tensor) -> None:
        """Frames of one piece, written by the batch: about _BATCH_BYTES per sendmsg when
        unthrottled, one frame at a time when paced."""
        k, v = wire._cpu_contiguous(k), wire._cpu_contiguous(v)
        ids = sender._dst[first:first + k.shape[0]]
        n, codec = k.shape[0], sender.codec
        per_frame = wire.blocks_per_frame(k, self.transport.chunk_bytes, codec)
        chunks = -(-n // per_frame)
        batch_frames = 1 if self._bucket is not None else _BATCH_FRAMES
        sender._wire = "open"
        c = 0
        while c < chunks:
            if sender._future.done():  # failed or aborted meanwhile: END/CANCEL follows
                return
            parts, payload, size, c0 = [], 0, 0, c
            while c < chunks and c - c0 < batch_frames and size < _BATCH_BYTES:
                lo, hi = c * per_frame, min(n, (c + 1) * per_frame)
                frame, nbytes, nwire = proto.frame_parts(sender.request_id, layer, ids[lo:hi],
                                                         k[lo:hi], v[lo:hi], c, chunks, codec)
                parts += frame
                payload, size, c = payload + nbytes, size + nwire, c + 1
            t0 = time.perf_counter()
            if self._bucket is not None and (delay := self._bucket.reserve(size)) > 0:
                time.sleep(delay)  # the emulated link is busy with earlier bytes
            proto.send_all(sock, parts)
            sender._busy += time.perf_counter() - t0
            sender._wire_bytes += size
            sender._sent += payload

    def _probe(self, sock: socket.socket, result: concurrent.futures.Future, nbytes: int) -> None:
        """PROBE with nbytes of zeros; the reader resolves `result` with the seconds to PROBED."""
        t0 = time.perf_counter()
        with self._lock:
            self._probes.append((result, t0))
        if self._bucket is not None and (delay := self._bucket.reserve(nbytes)) > 0:
            time.sleep(delay)
        proto.send_all(sock, [proto.ENVELOPE.pack(proto.PROBE, nbytes), bytes(nbytes)])

    def _end(self, sock: socket.socket, sender: TcpLayerwiseSender, cancel: bool) -> None:
        """Close sender's stream on the wire: END (the server answers ACK or ERROR), or CANCEL
        after abort() (never answered). Nothing is sent for a stream the server never saw."""
        if sender._wire == "closed":
            if cancel:          # aborted after its END (no ACK in time): forget it, an answer is dropped
                self._pop(sender.request_id, sender)
            return
        was_open, sender._wire = sender._wire == "open", "closed"
        if cancel:
            self._pop(sender.request_id, sender)
            if was_open:
                proto.send_control(sock, proto.CANCEL, {"rid": sender.request_id})
        elif was_open or not sender._future.done():  # after an ERROR, END clears the server's state
            sender._t_end = time.perf_counter()
            proto.send_control(sock, proto.END, {"rid": sender.request_id})
        else:  # failed before its first frame (e.g. a duplicate id): the server knows nothing of it
            self._pop(sender.request_id, sender)

    # reader thread
    def _read_loop(self, sock: socket.socket) -> None:
        error = KVTransferError(f"KV server {self.address} closed the connection", "UNAVAILABLE")
        try:
            expect = (proto.ACK, proto.ERROR, proto.CLOSE, proto.PROBED)
            while (msg := proto.recv_control(sock, expect=expect)) is not None:
                kind, body = msg
                if kind == proto.PROBED:   # answered in the order sent
                    with self._lock:
                        result, t0 = self._probes.popleft() if self._probes else (None, 0.0)
                    if result is not None and not result.done():
                        result.set_result(time.perf_counter() - t0)
                    continue
                if kind == proto.CLOSE:
                    error = KVTransferError(f"KV server {self.address} closed the connection: "
                                            f"{body.get('message')}", body.get("status", "UNAVAILABLE"))
                    break
                sender = self._pop(body.get("rid"))
                if sender is None:
                    continue  # aborted meanwhile
                if kind == proto.ACK:
                    t_ack = time.perf_counter()
                    stats = sender._stats(t_ack, body["seconds"])
                    meter = self.transport.meter
                    if meter is not None and stats.bytes:  # wire bytes/s: what a codec's choice divides
                        meter.record(self.transport.src_id, sender.dst_id, stats.wire_bytes, stats.busy_s)
                    sender._settle(stats)
                else:
                    sender._settle(KVTransferError(
                        f"KV transfer of {sender.request_id!r} to {self.address} failed: "
                        f"{body.get('status')}: {body.get('message')}", body.get("status", "UNKNOWN")))
        except Exception as e:  # reset, or a message we cannot read: the connection is unusable
            error = KVTransferError(f"KV connection to {self.address} broke: {e!r}", "UNAVAILABLE")
        self._fail_all(error)
