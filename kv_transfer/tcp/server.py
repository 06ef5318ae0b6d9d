"""KVTcpServer: serves a KVReceiver over plain TCP (protocol: tcp/protocol.py). The tcp transport's decode side.

Threads, not the event loop: one acceptor, and one thread per connection (a connection per
prefill process). That thread reads each FRAME's header, validates it against the reservation
(PendingTransfer.target), then recv_into()s the payload straight into the destination cache
blocks, checksums the landed bytes and commits them: no staging buffer, no copy. A cache that is
not a contiguous CPU tensor (CUDA), or a compressed frame (header codec "int8" / "fp8", codec.py),
gets the payload through a staging buffer: checksummed there, dequantized into new tensors, then
copied into the cache by write() under the reservation's lock (the header, scales included, was
validated and the reservation checked by target() before any payload byte was read).
Blocking recv_into and crc32 release the GIL, so the decode engine keeps running.

Per connection: `streams` holds an InboundStream per request id mid-stream, `rejected` the ids
answered with ERROR whose END/CANCEL has not arrived yet (their frames are read and dropped).
"""
from __future__ import annotations

import hmac
import logging
import os
import select
import socket
import threading
import time

import msgpack
import torch

from pdcluster.kv_transfer import netns as kvnetns
from pdcluster.kv_transfer.tcp import protocol as proto
from pdcluster.kv_transfer import wire
from pdcluster.kv_transfer.crc import crc32
from pdcluster.kv_transfer.errors import DataLoss, KVTransferError, MalformedFrame, TransferClosed
from pdcluster.kv_transfer.malloc_tuning import keep_large_buffers
from pdcluster.kv_transfer.receiver import InboundStream, KVReceiver, PendingTransfer, TransferState
from pdcluster.kv_transfer.serving import KVServerBase
from pdcluster.ports import bind_tcp

log = logging.getLogger(__name__)

CLOSE_DRAIN_S = 10.0  # after CLOSE, how long a peer may keep writing before the socket is cut
_SCRATCH_BYTES = 1 << 20  # buffer that dropped payloads are read through
MAX_CONNECTIONS = 256  # connections at once (one per prefill process, and per pulling peer): more are closed at once
MAX_HANDSHAKING = 32  # of them not yet authenticated (each holds a thread and nothing else until WELCOME)
MAX_HANDSHAKING_PER_HOST = 8  # of those from one address: one host's idle sockets cannot lock every peer out
HANDSHAKE_S = 3.0  # HELLO to AUTH, all of it (one round trip; a silent socket holds its slot no longer)
HANDSHAKE_DRAIN_S = 1.0  # after a failed handshake's CLOSE, the drain (the slot is free by then)
# failed handshakes drained at once, per address and in all: past them a failed one is closed without its
# drain (the peer may miss why), so one host's failing handshakes cannot fill MAX_CONNECTIONS with drains
MAX_DRAINING, MAX_DRAINING_PER_HOST = 32, 8
MAX_REJECTED = 4096  # request ids answered with ERROR awaiting their END/CANCEL, per connection
ACCEPT_RETRY_S = 0.1  # after a failed accept (out of file descriptors, say): try again this much later


class _Inbound(InboundStream):
    """InboundStream whose frames land straight into the cache: begin(), the payload, then
    PendingTransfer.commit() (or write() for a staged payload)."""

    trusted = False  # a frame of this stream passed its checksum: its request id is the sender's

    def begin(self, header: wire.FrameHeader) -> tuple[PendingTransfer, list[int], list[memoryview] | None]:
        """Bind (first frame), check order, validate against the reservation: (entry, *target())."""
        if self._entry is None:
            self._t_first = time.perf_counter()
            self._entry = self._receiver.claim(header.request_id)
        self._check_order(header)
        return (self._entry, *self._entry.target(header))


class KVTcpServer(KVServerBase):
    """Binds host:port (port 0 = ephemeral; `port` holds the bound one after start). With a
    secret, a connection must prove it (HMAC of a fresh nonce) or is closed with UNAUTHENTICATED.
    With `netns` (an `ip netns` name) the listener, hence every connection, lives in that network
    namespace (kv_transfer/netns.py): `host` is an address there."""
    namespaced = True

    def __init__(self, receiver: KVReceiver, *, host: str = "127.0.0.1", port: int = 0,
                 secret: str | None = None, max_frame_bytes: int = proto.DEFAULT_MAX_FRAME_BYTES,
                 netns: str | None = None):
        super().__init__(receiver, host=host, port=port)
        self.netns = netns
        self._secret = secret
        self._max_frame_bytes = max_frame_bytes
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._handshaking = 0  # of _conns, not yet through the handshake
        self._handshaking_from: dict[str, int] = {}  # ... by peer address
        self._draining: dict[str, int] = {}  # peer address -> failed handshakes in their drain
        self._refused, self._refused_logged = 0, 0.0  # connections refused since the last warning, and its time
        self._acceptor: threading.Thread | None = None
        keep_large_buffers()

    def start_sync(self) -> None:
        """Bind and serve on background threads (named like KVServer's, which needs a loop)."""
        self._listener = bind_tcp(lambda: kvnetns.create_server(self.netns, (self.host, self.port), backlog=64),
                                  self.host, self.port, "a decode worker's TCP KV listener",
                                  "its kv_tcp_port (0, the default, takes any free port)")
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
            except OSError as e:
                if self._listener is None:
                    return  # stop_sync shut the listener down
                log.warning("KV TCP listener on port %d: accept failed (%s); retrying", self.port, e.strerror or e)
                time.sleep(ACCEPT_RETRY_S)  # (out of file descriptors: connections are closing meanwhile)
                continue
            thread = threading.Thread(target=self._serve, args=(sock, peer),
                                      name=f"kv-tcp-conn-{peer[1]}", daemon=True)
            with self._lock:
                if self._listener is None:
                    sock.close()
                    return
                host = peer[0] if isinstance(peer, tuple) else str(peer)
                full = (len(self._conns) >= MAX_CONNECTIONS or self._handshaking >= MAX_HANDSHAKING
                        or self._handshaking_from.get(host, 0) >= MAX_HANDSHAKING_PER_HOST)
                if not full:
                    self._conns[sock] = thread
                    self._handshake_slot(host, +1)
            if full:  # nothing allocated for it: closed at once (one warning per 10 s of a flood)
                sock.close()
                self._refused += 1
                if time.monotonic() - self._refused_logged > 10.0:
                    log.warning("KV TCP listener on port %d: %d connections refused (%d open, %d authenticating; "
                                "the last from %s)", self.port, self._refused, len(self._conns), self._handshaking,
                                peer)
                    self._refused, self._refused_logged = 0, time.monotonic()
                continue
            try:
                thread.start()
            except RuntimeError as e:  # no thread to be had
                log.warning("KV TCP listener on port %d: no thread for %s (%s)", self.port, peer, e)
                with self._lock:
                    self._conns.pop(sock, None)
                    self._handshake_slot(host, -1)
                sock.close()

    def _handshake_slot(self, host: str, delta: int) -> None:
        """Take (+1) or give back (-1) one handshake slot of `host` (under _lock)."""
        self._handshaking += delta
        n = self._handshaking_from.get(host, 0) + delta
        if n > 0:
            self._handshaking_from[host] = n
        else:
            self._handshaking_from.pop(host, None)

    def _drain_slot(self, host: str) -> bool:
        """Take one of host's drain slots (under _lock); False when it or the server has none left."""
        if self._draining.get(host, 0) >= MAX_DRAINING_PER_HOST or sum(self._draining.values()) >= MAX_DRAINING:
            return False
        self._draining[host] = self._draining.get(host, 0) + 1
        return True

    def _serve(self, sock: socket.socket, peer) -> None:
        conn = _Connection(self, sock)
        host = peer[0] if isinstance(peer, tuple) else str(peer)
        try:
            try:
                welcome = conn.handshake()
            finally:
                with self._lock:
                    self._handshake_slot(host, -1)
            if not welcome and conn.closing:
                with self._lock:
                    drain = self._drain_slot(host)
                if drain:                           # the peer reads why (CLOSE), its handshake slot already free
                    try:
                        conn._drain(HANDSHAKE_DRAIN_S)
                    finally:
                        with self._lock:
                            n = self._draining.pop(host) - 1
                            if n:
                                self._draining[host] = n
            if welcome:
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
        self.prefix = bytearray(wire._PREFIX.size)
        self.scratch: memoryview | None = None  # buffers made after WELCOME (run): none for an unauthenticated peer
        self.staging = torch.empty(0, dtype=torch.uint8)  # staged payloads (see the module doc), at offset 0
        self.poller: select.poll | None = None  # readable: the wait between messages and of proto.recv_guarded
        self.closing = False  # CLOSE sent (or the socket failed): read no more, answer nothing

    def handshake(self) -> bool:
        sock, secret = self.sock, self.server._secret
        proto.tune(sock)
        deadline = time.monotonic() + HANDSHAKE_S  # for all of it, however slowly bytes come
        sock.settimeout(HANDSHAKE_S)
        nonce = os.urandom(32)
        try:
            proto.send_control(sock, proto.HELLO, {"proto": proto.PROTO, "v": proto.VERSION, "nonce": nonce})
            msg = proto.recv_control(sock, expect=(proto.AUTH,), deadline=deadline, max_bytes=proto.MAX_AUTH_BYTES)
        except KVTransferError as e:
            self._close_with(e)     # (drained by _serve, once the handshake slot is free)
            return False
        except OSError:  # timed out or reset: nothing to answer
            return False
        if msg is None:
            return False
        got = msg[1].get("mac")
        if msg[1].get("v") != proto.VERSION or not isinstance(got, bytes):
            self._close_with(MalformedFrame(f"bad AUTH message (version {msg[1].get('v')!r})"))
            return False
        if secret is not None and not hmac.compare_digest(got, proto.mac(secret, nonce)):
            self._close_with(KVTransferError("wrong or missing KV secret", "UNAUTHENTICATED"))
            return False
        proto.send_control(sock, proto.WELCOME, {})
        # every read and write from here: no progress for STALL_TIMEOUT_S ends the connection (the wait for the next
        # message is a poll without one: _read_loop)
        sock.settimeout(proto.STALL_TIMEOUT_S)
        return True

    def run(self) -> None:
        """Read and land messages until the peer closes or the connection fails."""
        self.scratch = memoryview(bytearray(_SCRATCH_BYTES))
        self.poller = select.poll()
        self.poller.register(self.sock, select.POLLIN)
        try:
            self._read_loop()
        except (proto.ConnectionLost, OSError):
            pass  # open streams fail as truncated, below
        except KVTransferError as e:  # the byte stream cannot be resynchronized: close it
            self._close_with(e)
        except Exception as e:  # a bug
            log.exception("KV TCP connection failed")
            self._close_with(KVTransferError(f"internal error: {e!r}", "INTERNAL"))
        self.fail_open_streams()
        if self.closing:
            self._drain()

    def _read_loop(self) -> None:
        sock, env = self.sock, memoryview(self.env)
        while not self.closing and self.poller.poll() and proto.recv_exact(sock, env):
            kind, length = proto.ENVELOPE.unpack(self.env)
            if kind == proto.FRAME:
                if length > self.server._max_frame_bytes:
                    raise MalformedFrame(f"frame of {length} bytes exceeds the server's "
                                         f"{self.server._max_frame_bytes}-byte limit")
                self._frame(length)
            elif kind in (proto.END, proto.CANCEL) and length <= proto.MAX_CONTROL_BYTES:
                body = bytearray(length)
                if length and not proto.recv_exact(sock, memoryview(body)):
                    raise proto.ConnectionLost("connection closed inside a message")
                self._control(kind, body)
            elif kind == proto.PROBE and length <= proto.MAX_PROBE_BYTES:
                proto.skip(sock, length, self.scratch)
                proto.send_control(sock, proto.PROBED, {"bytes": length})
            else:
                raise MalformedFrame(f"unexpected message type {kind} of {length} bytes")

    def _frame(self, length: int) -> None:
        """One FRAME body of `length` bytes: header, then the payload into the cache (or dropped).
        Raises only for connection-level failures; a request's failure is answered with ERROR."""
        sock, psize = self.sock, wire._PREFIX.size
        if length < psize:
            raise DataLoss(f"frame of {length} bytes is shorter than its {psize}-byte prefix")
        self._recv(memoryview(self.prefix))
        hlen = wire._PREFIX.unpack(self.prefix)[1]
        if psize + hlen > length:
            raise DataLoss(f"header length {hlen} runs past the {length}-byte frame")
        off = psize + hlen + -(psize + hlen) % wire._ALIGN  # payload offset in the frame
        header_buf = bytearray(min(off, length) - psize)
        self._recv(memoryview(header_buf))
        rid, header, error = proto.parse_header(self.prefix, memoryview(header_buf)[:hlen])
        if rid is None:
            raise error  # no request to blame: the connection fails
        if len(rid) > proto.MAX_RID_CHARS:
            raise MalformedFrame(f"a request id of {len(rid)} characters (at most {proto.MAX_RID_CHARS})")
        payload = length - min(off, length)
        if error is None and length - off != header.nbytes:
            error = DataLoss(f"payload is {length - off} bytes, header says {header.nbytes}")
        if rid in self.rejected or error is not None:
            proto.skip(sock, payload, self.scratch)
            if error is not None and rid not in self.rejected:
                self._fail(rid, self.streams.get(rid), error)
            return
        stream = self.streams.get(rid)
        try:
            if stream is None:
                stream = self.streams[rid] = _Inbound(self.receiver)
            entry, positions, views = stream.begin(header)  # bounds checked before any byte lands
        except Exception as e:
            proto.skip(sock, payload, self.scratch)
            self._fail(rid, stream, e)
            return
        staged = views is None or header.codec != "none"  # landed by write() below
        try:
            if staged:
                crc = self._recv_staged(header.nbytes, header.scales)
            else:
                proto.recv_guarded(sock, self.poller, views, entry.locked, self.scratch)
                crc = 0
                for view in views:
                    crc = crc32(view, crc)
        except proto.ConnectionLost:
            raise
        except KVTransferError as e:  # aborted or failed mid-payload: the rest was dropped
            self._fail(rid, stream, e)
            return
        if crc != header.crc and entry.state is not TransferState.PENDING:  # not corruption: its
            self._fail(rid, stream, TransferClosed(  # blocks were freed meanwhile and may be reused
                f"request {rid!r} is {entry.state.value}: frame for layer {header.layer} dropped"))
            return
        if crc != header.crc:  # the bytes sit in rid's own reserved blocks, never committed
            error = DataLoss(f"checksum mismatch in layer {header.layer} chunk {header.chunk}: "
                             f"crc32 {crc:#010x}, header says {header.crc:#010x}")
            # A first frame that fails its checksum may carry a corrupt request id: then fail
            # only the sender's stream, not the reservation it names, which it unclaims (its
            # real sender may still come; the bytes written are overwritten, never committed).
            if not stream.trusted:
                self.receiver.unclaim(entry)
            self._fail(rid, stream if stream.trusted else None, error)
            return
        stream.trusted = True
        try:
            if staged:
                entry.write(header, *wire.payload_tensors(header, self.staging[:header.nbytes], keep_codes=True))
            else:
                entry.commit(header, positions)
        except Exception as e:  # noqa: BLE001 - this request fails (INTERNAL if not a KVTransferError), not the link
            self._fail(rid, stream, e)

    def _recv(self, buf: memoryview) -> None:
        if not proto.recv_exact(self.sock, buf):
            raise proto.ConnectionLost("connection closed inside a frame")

    def _recv_staged(self, nbytes: int, scales: bytes) -> int:
        """Read a payload into the staging buffer (at offset 0: aligned for any dtype); the frame's
        crc32 (over the header's scales, then the payload)."""
        if self.staging.numel() < nbytes:
            self.staging = torch.empty(max(nbytes, 2 * self.staging.numel()), dtype=torch.uint8)
        view = memoryview(self.staging.numpy())[:nbytes]
        self._recv(view)
        return crc32(view, crc32(scales) if scales else 0)

    def _fail(self, rid: str, stream: _Inbound | None, error: BaseException) -> None:
        """rid failed: so does its reservation (if `stream` is bound to one); the sender gets ERROR."""
        if not isinstance(error, KVTransferError):
            log.error("landing a frame of %r failed", rid, exc_info=error)
            error = KVTransferError(f"internal error: {error!r}", "INTERNAL")
        if stream is not None:
            stream.fail(error)
        self._reject(rid, error)

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
            if len(self.rejected) >= MAX_REJECTED:
                raise MalformedFrame(f"{len(self.rejected)} failed streams never ended (END/CANCEL)")
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

    def _drain(self, seconds: float = CLOSE_DRAIN_S) -> None:
        """Drop what the peer still sends until it closes (so it reads CLOSE rather than a
        reset), for at most `seconds`."""
        try:
            self.sock.settimeout(seconds)
            scratch = bytearray(1 << 16)
            deadline = time.monotonic() + seconds
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
