"""The KV TCP socket protocol: length-prefixed messages carrying wire.py frames, plus control.

Every message on the socket, both directions:

    0      1     4          8
    | type | pad | length u32le | body (length bytes) |

    type     dir  body
    HELLO    s>c  msgpack {proto, v, nonce}      first message on a connection
    AUTH     c>s  msgpack {v, mac}               mac = HMAC-SHA256(secret, AUTH_CONTEXT + nonce)
    WELCOME  s>c  msgpack {}                     the connection is open for frames
    CLOSE    s>c  msgpack {status, message}      connection-level failure (bad secret, protocol
                                                 error); the server closes after it
    FRAME    c>s  one wire.py frame, unchanged   "PDKV" | H | msgpack header | pad | K | V
    END      c>s  msgpack {rid}                  the sender finished rid's stream (half-close)
    CANCEL   c>s  msgpack {rid}                  the sender aborted rid; the reservation fails
    ACK      s>c  msgpack {rid, bytes, seconds}  every (layer, block) of rid landed: ownership
                                                 handoff, as the gRPC Push reply
    ERROR    s>c  msgpack {rid, status, message} rid failed (status: a grpc.StatusCode name);
                                                 its later frames are dropped unread-into-cache
    PROBE    c>s  n filler bytes (n <= 16 MiB)   a bandwidth probe of an idle link: read, dropped
    PROBED   s>c  msgpack {bytes}                the PROBE's n bytes arrived (answered in order)

One connection carries many requests: frames name their request id (wire header "rid"), a piece's
chunks are contiguous on the socket, and each request's stream ends with exactly one END or
CANCEL from the sender; the server answers each END with one ACK or ERROR (or has already sent
ERROR, in which case END only clears its state). The receiver reads a FRAME's prefix and header
first, checks them against the reservation, then reads the payload straight into the destination
cache blocks (K runs, then V runs) and checksums it there; a compressed frame (header codec "int8" /
"fp8", wire.py) is read into a staging buffer instead and dequantized into those blocks.
"""
from __future__ import annotations

import hashlib
import hmac
import select
import socket
import struct
import time

import msgpack
import torch

from pdcluster.kv_transfer import wire
from pdcluster.kv_transfer.crc import crc32
from pdcluster.kv_transfer.errors import KVTransferError, MalformedFrame

PROTO = "pdkv-tcp"
VERSION = 1
AUTH_CONTEXT = b"pdcluster-kv-tcp-v1:"
ENVELOPE = struct.Struct("<BxxxI")  # message type, body length in bytes
HELLO, AUTH, WELCOME, CLOSE, FRAME, END, CANCEL, ACK, ERROR, PROBE, PROBED = range(1, 12)
MAX_CONTROL_BYTES = 64 << 10  # body limit of every message but FRAME
DEFAULT_MAX_FRAME_BYTES = 64 << 20  # server's FRAME body limit (client chunks stay far below)
DEFAULT_CHUNK_BYTES = 2 << 20  # payload bytes per frame (1, 2 and 4 MiB measured: 2 MiB fastest, bench/transfer.py)
MAX_PROBE_BYTES = 16 << 20  # PROBE body limit
HANDSHAKE_TIMEOUT_S = 10.0  # HELLO to WELCOME, all of it (not per read: a byte a second would hold it forever)
MAX_AUTH_BYTES = 256  # an AUTH body (a version and a 32-byte MAC: ~50 bytes)
STALL_TIMEOUT_S = 30.0  # a server's read or write inside a message, or its reply, making no progress this long ends
                        # the connection (between messages an idle link waits as long as it likes)
MAX_RID_CHARS = wire.MAX_RID_CHARS  # a frame's request id


class ConnectionLost(KVTransferError):
    """The peer closed the connection or it broke (a truncated stream, seen from the receiver)."""

    status = "UNAVAILABLE"


def mac(secret: str | None, nonce: bytes) -> bytes:
    """The AUTH proof for `nonce`: b"" without a secret (accepted only by a secret-less server)."""
    if secret is None:
        return b""
    return hmac.new(secret.encode(), AUTH_CONTEXT + nonce, hashlib.sha256).digest()


def tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # END / ACK are tiny and urgent
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


def send_deadline(sock: socket.socket, seconds: float | None = None) -> None:
    """A blocking socket's writes fail (OSError) after `seconds` without progress, its reads wait
    as long as they like: a sender whose peer stops reading (alive, or gone with bytes unacked)
    fails its transfers instead of wedging its writer. SO_SNDTIMEO; TCP_USER_TIMEOUT where Linux has it.
    seconds: STALL_TIMEOUT_S by default."""
    seconds = STALL_TIMEOUT_S if seconds is None else seconds
    sec = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", sec, int((seconds - sec) * 1e6)))
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(seconds * 1000))


# sending: the caller serializes writers on one socket
def send_all(sock: socket.socket, parts: list) -> int:
    """Write every buffer in `parts` (bytes / memoryviews, no join), looping over partial writes."""
    total = sum(memoryview(p).nbytes for p in parts)
    left = total
    while left:
        n = sock.sendmsg(parts)
        left -= n
        if not left:
            break
        while n:  # drop what went out
            size = memoryview(parts[0]).nbytes
            if n >= size:
                n -= size
                parts = parts[1:]
            else:
                parts = [memoryview(parts[0]).cast("B")[n:], *parts[1:]]
                n = 0
    return total


def send_control(sock: socket.socket, kind: int, body: dict) -> None:
    data = msgpack.packb(body)
    send_all(sock, [ENVELOPE.pack(kind, len(data)), data])


def frame_parts(request_id: str, layer: int, block_ids, k: torch.Tensor, v: torch.Tensor,
                chunk: int, chunks: int, codec: str = "none") -> tuple[list, int, int]:
    """FRAME message for K, V (contiguous CPU tensors, shape[0] == len(block_ids)) as buffers to
    write in order: [envelope + wire prefix + header + pad, K bytes, V bytes]; its payload bytes
    and message bytes. Same frame as wire.encode_frame, with the crc computed once and no join.
    A quantizing codec encodes K, V here (wire.pack): on the writer thread, not the compute one."""
    dtype, shape = k.dtype, list(k.shape)
    scales = b""
    if codec != "none":
        k, v, scales = wire.pack(codec, k, v)
    kb, vb = wire._raw(k), wire._raw(v)
    nbytes = kb.nbytes + vb.nbytes
    fields = {
        "v": wire.VERSION, "rid": request_id, "layer": layer, "blocks": list(block_ids),
        "dtype": wire._DTYPE_NAMES[dtype], "shape": shape, "nbytes": nbytes,
        "crc": crc32(vb, crc32(kb, crc32(scales) if scales else 0)), "chunk": chunk, "chunks": chunks,
        "codec": codec,
    }
    if scales:
        fields["scales"] = scales
    header = msgpack.packb(fields)
    pad = -(wire._PREFIX.size + len(header)) % wire._ALIGN
    size = wire._PREFIX.size + len(header) + pad + nbytes
    head = b"".join((ENVELOPE.pack(FRAME, size), wire._PREFIX.pack(wire.MAGIC, len(header)),
                     header, bytes(pad)))
    return [head, kb, vb], nbytes, len(head) + nbytes


# receiving
def recv_exact(sock: socket.socket, buf: memoryview, deadline: float | None = None) -> bool:
    """Fill buf; False if the peer closed before the first byte, ConnectionLost if mid-way. deadline (time.monotonic):
    a socket timeout (OSError) once it passes, however the bytes trickle in."""
    want, got = buf.nbytes, 0
    while got < want:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout(f"{got} of {want} bytes by the deadline")
            sock.settimeout(left)
        n = sock.recv_into(buf[got:])
        if n == 0:
            if got == 0:
                return False
            raise ConnectionLost(f"connection closed {got} bytes into a {want}-byte read")
        got += n
    return True


def recv_control(sock: socket.socket, expect: tuple[int, ...] | None = None, deadline: float | None = None,
                 max_bytes: int = MAX_CONTROL_BYTES) -> tuple[int, dict] | None:
    """Read one control message: (type, body dict), or None on a clean close between messages.
    Raises MalformedFrame for an unexpected type, an oversized or undecodable body; deadline as recv_exact's."""
    env = bytearray(ENVELOPE.size)
    if not recv_exact(sock, memoryview(env), deadline):
        return None
    kind, length = ENVELOPE.unpack(env)
    if (expect is not None and kind not in expect) or length > max_bytes:
        raise MalformedFrame(f"unexpected message type {kind} of {length} bytes")
    body = bytearray(length)
    if length and not recv_exact(sock, memoryview(body), deadline):
        raise ConnectionLost("connection closed inside a message")
    try:
        data = msgpack.unpackb(body, raw=False) if length else {}
    except (ValueError, msgpack.UnpackException) as e:
        raise MalformedFrame(f"control message is not valid msgpack: {e}") from None
    if not isinstance(data, dict):
        raise MalformedFrame("control message is not a msgpack map")
    return kind, data


def parse_header(prefix: bytes, header: memoryview) -> tuple[str | None, wire.FrameHeader | None, KVTransferError | None]:
    """Validate a FRAME's wire prefix and msgpack header: (rid, header, error). The rid is known as
    soon as the header is a map with a string "rid" (errors then fail that request alone); the
    error, if any, is what wire.decode_frame would raise for the same header."""
    magic, _ = wire._PREFIX.unpack(prefix)
    if magic != wire.MAGIC:
        return None, None, MalformedFrame(f"bad magic {bytes(magic)!r}, expected {wire.MAGIC!r}")
    try:
        raw = msgpack.unpackb(header, raw=False)
    except (ValueError, msgpack.UnpackException) as e:
        return None, None, MalformedFrame(f"header is not valid msgpack: {e}")
    rid = raw.get("rid") if isinstance(raw, dict) and isinstance(raw.get("rid"), str) else None
    try:
        return rid, wire._parse_header(raw), None
    except KVTransferError as e:
        return rid, None, e


def recv_guarded(sock: socket.socket, poller: select.poll, views: list[memoryview], guard,
                 scratch: memoryview) -> None:
    """Fill `views` in order from sock. Every recv_into runs as guard(sock.recv_into, ...) (the
    reservation's lock: PendingTransfer.locked) and only takes bytes already queued on the socket
    (MSG_DONTWAIT), so whoever waits on that lock waits for one bounded copy, never for the peer;
    waiting for data (poller: sock registered for POLLIN) happens outside it. If guard raises
    (the reservation closed), the rest of the payload is read through `scratch` and dropped, and
    the error re-raised; ConnectionLost if the peer closes."""
    timeout = sock.gettimeout()
    sock.settimeout(0.0)  # a socket with a timeout waits for data inside recv_into, MSG_DONTWAIT or not: the lock held
    try:
        closed, done = _fill_guarded(sock, poller, views, guard)
    finally:
        sock.settimeout(timeout)
    if closed is not None:
        skip(sock, sum(v.nbytes for v in views) - done, scratch)
        raise closed


def _fill_guarded(sock: socket.socket, poller: select.poll, views: list[memoryview],
                  guard) -> tuple[KVTransferError | None, int]:
    """recv_guarded's reads, the socket non-blocking: (what guard raised or None, bytes landed). ConnectionLost if
    the peer closes, or sends no byte for STALL_TIMEOUT_S."""
    done = 0
    for view in views:
        got, want = 0, view.nbytes
        while got < want:
            try:
                n = guard(sock.recv_into, view[got:], 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if not poller.poll(STALL_TIMEOUT_S * 1000):
                    raise ConnectionLost(f"no byte of a payload for {STALL_TIMEOUT_S:g} s") from None
                continue
            except KVTransferError as e:
                return e, done
            if n == 0:
                raise ConnectionLost(f"connection closed {got} bytes into a {want}-byte payload run")
            got += n
            done += n
    return None, done


def skip(sock: socket.socket, nbytes: int, scratch: memoryview) -> None:
    """Read and drop nbytes (a payload not to be landed), through `scratch`."""
    while nbytes > 0:
        n = sock.recv_into(scratch[:nbytes])
        if n == 0:
            raise ConnectionLost(f"connection closed with {nbytes} bytes of a frame unread")
        nbytes -= n
