"""KVTcpServer: serves a KVReceiver over plain TCP (protocol: tcp_protocol.py). Runs beside KVServer.

Threads, not the event loop: one acceptor, and two threads per connection (a connection per
prefill process). The reader recv_into()s each FRAME straight into one of a few reusable
64-byte-aligned buffers; the lander checks its crc32 once and lets the reservation copy K, V
(tensor views of that buffer) into the cache, while the reader fills the next buffer. Blocking
recv_into, crc32 and the copy release the GIL, so the decode engine keeps running.

Per connection: `streams` holds an InboundStream per request id mid-stream, `rejected` the ids
answered with ERROR whose END/CANCEL has not arrived yet (their frames are read and dropped).
"""
from __future__ import annotations

import hmac
import logging
import os
import queue
import socket
import threading
import time

import msgpack
import torch

from kv_transfer import tcp_protocol as proto
from kv_transfer.errors import DataLoss, KVTransferError, MalformedFrame
from kv_transfer.malloc_tuning import keep_large_buffers
from kv_transfer.receiver import InboundStream, KVReceiver

log = logging.getLogger(__name__)

CLOSE_DRAIN_S = 10.0  # after CLOSE, how long a peer may keep writing before the socket is cut
_BUFFERS = 3  # frame buffers per connection: one being read, the others landing / queued
_FATAL = object()  # inbox item kind: the reader hit a connection-level error


class _Inbound(InboundStream):
    """InboundStream fed frames that are already parsed and checksummed (tcp_protocol.parse_frame)."""

    def feed_parsed(self, header, k: torch.Tensor, v: torch.Tensor) -> None:
        if self._entry is None:
            self._t_first = time.perf_counter()
            self._entry = self._receiver.claim(header.request_id)
        self._check_order(header)
        self._entry.write(header, k, v)


class KVTcpServer:
    """Binds host:port (port 0 = ephemeral; `port` holds the bound one after start). With a
    secret, a connection must prove it (HMAC of a fresh nonce) or is closed with UNAUTHENTICATED.
    pipeline=False lands frames on the reading thread: one thread per connection and no
    read-ahead (in one A/B run on the 2-core bench host it used slightly more receiver CPU)."""

    def __init__(self, receiver: KVReceiver, *, host: str = "127.0.0.1", port: int = 0,
                 secret: str | None = None, max_frame_bytes: int = proto.DEFAULT_MAX_FRAME_BYTES,
                 pipeline: bool = True):
        self.receiver, self.host, self.port = receiver, host, port
        self._secret = secret
        self._max_frame_bytes = max_frame_bytes
        self._pipeline = pipeline
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._acceptor: threading.Thread | None = None
        keep_large_buffers()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start_sync(self) -> None:
        """Bind and serve on background threads (named like KVServer's, which needs a loop)."""
        self._listener = socket.create_server((self.host, self.port), backlog=64)
        self.port = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept_loop, args=(self._listener,),
                                          name=f"kv-tcp-accept-{self.port}", daemon=True)
        self._acceptor.start()

    def stop_sync(self, grace: float | None = None) -> None:
        """Stop accepting, cut every connection (their open streams fail), join the threads."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        _shutdown(listener)
        listener.close()
        with self._lock:
            conns = dict(self._conns)
        for sock in conns:
            _shutdown(sock)
        for thread in [self._acceptor, *conns.values()]:
            thread.join(grace if grace is not None else 5.0)

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, peer = listener.accept()
            except OSError:
                return  # stop_sync shut the listener down
            thread = threading.Thread(target=self._serve, args=(sock, peer),
                                      name=f"kv-tcp-conn-{peer[1]}", daemon=True)
            with self._lock:
                if self._listener is None:
                    sock.close()
                    return
                self._conns[sock] = thread
            thread.start()

    def _serve(self, sock: socket.socket, peer) -> None:
        conn = _Connection(self, sock)
        try:
            if conn.handshake():
                conn.run()
        except Exception:
            log.exception("KV TCP connection from %s failed", peer)
        finally:
            conn.fail_open_streams()
            with self._lock:
                self._conns.pop(sock, None)
            sock.close()


class _Connection:
    def __init__(self, server: KVTcpServer, sock: socket.socket):
        self.server, self.sock = server, sock
        self.receiver = server.receiver
        self.streams: dict[str, _Inbound] = {}
        self.rejected: set[str] = set()
        self.env = bytearray(proto.ENVELOPE.size)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()  # reader -> lander, in arrival order
        self.free: queue.SimpleQueue = queue.SimpleQueue()  # FRAME bodies land in these, at offset 0
        for _ in range(_BUFFERS):
            self.free.put(torch.empty(0, dtype=torch.uint8))
        self.closing = False  # CLOSE sent (or the socket failed): read no more, answer nothing

    def handshake(self) -> bool:
        sock, secret = self.sock, self.server._secret
        proto.tune(sock)
        sock.settimeout(proto.HANDSHAKE_TIMEOUT_S)
        nonce = os.urandom(32)
        try:
            proto.send_control(sock, proto.HELLO, {"proto": proto.PROTO, "v": proto.VERSION, "nonce": nonce})
            msg = proto.recv_control(sock, expect=(proto.AUTH,))
        except KVTransferError as e:
            self.close_with(e)
            return False
        except OSError:  # timed out or reset: nothing to answer
            return False
        if msg is None:
            return False
        got = msg[1].get("mac")
        if msg[1].get("v") != proto.VERSION or not isinstance(got, bytes):
            self.close_with(MalformedFrame(f"bad AUTH message (version {msg[1].get('v')!r})"))
            return False
        if secret is not None and not hmac.compare_digest(got, proto.mac(secret, nonce)):
            self.close_with(KVTransferError("wrong or missing KV secret", "UNAUTHENTICATED"))
            return False
        proto.send_control(sock, proto.WELCOME, {})
        sock.settimeout(None)
        return True

    def run(self) -> None:
        """Read messages on this thread; land them here (inline) or on a second thread."""
        lander = None
        if self.server._pipeline:
            lander = threading.Thread(target=self._land_loop, daemon=True,
                                      name=f"{threading.current_thread().name}-land")
            lander.start()
        try:
            self._read_loop()
        except (proto.ConnectionLost, OSError):
            pass  # open streams fail as truncated, below
        except KVTransferError as e:  # the byte stream cannot be resynchronized: close it
            self._deliver((_FATAL, e))
        finally:
            if lander is not None:
                self.inbox.put(None)
                lander.join()
        self.fail_open_streams()
        if self.closing:
            self._drain()

    def _deliver(self, item: tuple) -> None:
        if self.server._pipeline:
            self.inbox.put(item)
        else:
            self._land(item)

    def _read_loop(self) -> None:
        sock, env = self.sock, memoryview(self.env)
        while not self.closing and proto.recv_exact(sock, env):
            kind, length = proto.ENVELOPE.unpack(self.env)
            if kind == proto.FRAME:
                if length > self.server._max_frame_bytes:
                    raise MalformedFrame(f"frame of {length} bytes exceeds the server's "
                                         f"{self.server._max_frame_bytes}-byte limit")
                buf = self.free.get()  # back-pressure: at most _BUFFERS frames read ahead
                if buf.numel() < length:
                    buf = torch.empty(max(length, 2 * buf.numel()), dtype=torch.uint8)
                try:
                    if not proto.recv_exact(sock, memoryview(buf.numpy())[:length]):
                        raise proto.ConnectionLost("connection closed before a frame")
                except BaseException:
                    self.free.put(buf)
                    raise
                self._deliver((buf, length))
            elif kind in (proto.END, proto.CANCEL) and length <= proto.MAX_CONTROL_BYTES:
                body = bytearray(length)
                if length and not proto.recv_exact(sock, memoryview(body)):
                    raise proto.ConnectionLost("connection closed inside a message")
                self._deliver((kind, body))
            else:
                raise MalformedFrame(f"unexpected message type {kind} of {length} bytes")

    def _land_loop(self) -> None:
        """The lander thread: messages in arrival order, while the reader fills the next buffer
        (recv_into, crc32 and the cache copy all release the GIL)."""
        while (item := self.inbox.get()) is not None:
            self._land(item)

    def _land(self, item: tuple) -> None:
        """Check and land a frame, or answer END / CANCEL; the buffer goes back to `free`."""
        kind, arg = item
        try:
            if isinstance(kind, torch.Tensor):
                if not self.closing:
                    self._frame(kind, arg)
            elif kind is _FATAL:
                self._close_with(arg)
            elif not self.closing:
                self._control(kind, arg)
        except KVTransferError as e:
            self._close_with(e)
        except OSError:
            self.closing = True  # cannot answer: stop
        except Exception as e:  # a bug: never leave the reader waiting for a buffer
            log.exception("KV TCP connection failed")
            self._close_with(KVTransferError(f"internal error: {e!r}", "INTERNAL"))
        finally:
            if isinstance(kind, torch.Tensor):
                self.free.put(kind)

    def _frame(self, buf: torch.Tensor, length: int) -> None:
        rid, header, error, off = proto.parse_frame(memoryview(buf.numpy())[:length])
        if rid is None:
            raise error  # no request to blame: the connection fails
        if rid in self.rejected:
            return
        stream = self.streams.get(rid)
        try:
            if error is not None:
                raise error
            if stream is None:
                stream = self.streams[rid] = _Inbound(self.receiver)
            stream.feed_parsed(header, *proto.frame_tensors(buf, header, off))
        except Exception as e:  # the reservation fails, the sender gets the status
            if not isinstance(e, KVTransferError):
                log.exception("landing a frame of %r failed", rid)
                e = KVTransferError(f"internal error: {e!r}", "INTERNAL")
            if stream is not None:
                stream.fail(e)
            self._reject(rid, e)

    def _control(self, kind: int, body: bytearray) -> None:
        try:
            msg = msgpack.unpackb(body, raw=False)
            rid = msg["rid"]
            if not isinstance(rid, str):
                raise TypeError
        except Exception:
            raise MalformedFrame("END/CANCEL without a request id") from None
        if rid in self.rejected:
            self.rejected.discard(rid)
            self.streams.pop(rid, None)
            return
        stream = self.streams.pop(rid, None)
        if kind == proto.CANCEL:
            if stream is not None:
                stream.fail(KVTransferError("the sender cancelled the transfer", "CANCELLED"))
            return
        if stream is None:  # as an RPC with no frames
            self._reject(rid, MalformedFrame("stream ended before its first frame"), remember=False)
            return
        try:
            ack = stream.close()
        except KVTransferError as e:
            stream.fail(e)
            self._reject(rid, e, remember=False)
            return
        proto.send_control(self.sock, proto.ACK, {"rid": rid, "bytes": ack.bytes_received,
                                                  "seconds": ack.receiver_seconds})

    def _reject(self, rid: str, error: KVTransferError, remember: bool = True) -> None:
        self.streams.pop(rid, None)
        if remember:  # until the sender's END/CANCEL for rid
            self.rejected.add(rid)
        proto.send_control(self.sock, proto.ERROR, {"rid": rid, "status": error.status,
                                                    "message": str(error)})

    def _close_with(self, error: KVTransferError) -> None:
        """Connection-level failure: send CLOSE, stop writing; the reader then drains (_drain)."""
        self.closing = True
        try:
            proto.send_control(self.sock, proto.CLOSE, {"status": error.status, "message": str(error)})
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close_with(self, error: KVTransferError) -> None:
        """Send CLOSE from the only thread left, then drain."""
        self._close_with(error)
        self._drain()

    def _drain(self) -> None:
        """Drop what the peer still sends until it closes (so it reads CLOSE rather than a
        reset), for at most CLOSE_DRAIN_S."""
        try:
            self.sock.settimeout(CLOSE_DRAIN_S)
            scratch = bytearray(1 << 16)
            deadline = time.monotonic() + CLOSE_DRAIN_S
            while time.monotonic() < deadline and self.sock.recv_into(scratch):
                pass
        except OSError:
            pass

    def fail_open_streams(self) -> None:
        for rid, stream in self.streams.items():
            stream.fail(DataLoss(f"truncated: connection closed mid-stream of {rid!r}"))
        self.streams.clear()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
