"""The TCP transport's own cases on 127.0.0.1 (ephemeral ports): KVTcpServer + KVReceiver <- TcpKVTransport,
one shared connection per address, its socket protocol, direct landing, probes. The cases every
transport shares: test_kv_transports.py."""
import socket
import threading
import time

import msgpack
import pytest
import torch

from pdcluster.kv_transfer import (BandwidthMeter, KVReceiver, KVTcpServer, KVTransferError, TcpKVTransport,
                         TransferState, cache_writer, wire)
from pdcluster.kv_transfer.tcp import protocol as proto
from pdcluster.kv_transfer.tcp.connection import parse_address
from pdcluster.kv_transfer.crc import crc32
from tests.unit.kv_blocks import BLOCK, BLOCK_BYTES, L, NB, SECRET, assert_landed, layers, new_caches, serving

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def caches():
    return new_caches()


@pytest.fixture
def server():
    yield from serving(KVTcpServer(KVReceiver(), secret=SECRET))  # 127.0.0.1, port 0


@pytest.fixture
def transport():
    tr = TcpKVTransport(chunk_bytes=64 << 10, secret=SECRET, meter=BandwidthMeter(), src_id="p0")
    yield tr
    tr.close()


class RawClient:
    """A bare protocol client: handshake, then hand-made messages."""

    def __init__(self, address, secret=SECRET):
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        kind, hello = proto.recv_control(self.sock)
        assert kind == proto.HELLO and hello["proto"] == proto.PROTO
        proto.send_control(self.sock, proto.AUTH, {"v": proto.VERSION, "mac": proto.mac(secret, hello["nonce"])})
        self.welcome = proto.recv_control(self.sock)

    def frame(self, frame: bytes):
        self.sock.sendall(proto.ENVELOPE.pack(proto.FRAME, len(frame)) + frame)

    def end(self, rid):
        proto.send_control(self.sock, proto.END, {"rid": rid})

    def reply(self):
        return proto.recv_control(self.sock)

    def close(self):
        self.sock.close()


def test_protocol_frame_is_the_wire_frame():
    k, v = layers(3)[0]
    parts, nbytes, size = proto.frame_parts("r", 2, [5, 6, 7], k, v, 1, 4)
    message = b"".join(bytes(memoryview(p).cast("B")) for p in parts)
    assert len(message) == size and nbytes == 3 * BLOCK_BYTES
    assert proto.ENVELOPE.unpack_from(message) == (proto.FRAME, size - proto.ENVELOPE.size)
    assert message[proto.ENVELOPE.size:] == wire.encode_frame("r", 2, [5, 6, 7], k, v, 1, 4)


def test_crc32_matches_zlib():
    import zlib
    data = torch.randn(10_000).numpy().tobytes()
    for piece in (b"", b"x", data, memoryview(data)[3:], bytearray(data[:777])):
        assert crc32(piece) == zlib.crc32(piece) and crc32(piece, 12345) == zlib.crc32(piece, 12345)


def test_pieces_are_chunked_into_frames(server, caches):
    ids = list(range(20))  # 20 x 12 KiB per layer; 32 KiB chunks -> 2 blocks per frame
    pending = server.receiver.expect("req", ids, L, cache_writer(*caches))
    data = layers(len(ids), seed=3)
    tr = TcpKVTransport(chunk_bytes=32 << 10, secret=SECRET)
    sender = tr.open(server.address, "req", ids)
    for layer, (k, v) in enumerate(data):
        sender.send_layer(layer, k, v)
    stats = sender.finish(timeout=20)
    tr.close()
    assert pending.state is TransferState.COMPLETE
    assert_landed(caches, ids, data)
    assert stats.wire_bytes - stats.bytes >= L * 10 * (proto.ENVELOPE.size + 8 + 32)  # 10 frames a layer


def test_sequential_requests_reuse_the_connection(server, transport, caches):
    for i in range(3):
        ids = [i, 10 + i]
        pending = server.receiver.expect(f"q{i}", ids, L, cache_writer(*caches))
        sender = transport.open(server.address, f"q{i}", ids)
        for layer, (k, v) in enumerate(layers(2, seed=i)):
            sender.send_layer(layer, k, v)
        sender.finish(timeout=20)
        assert pending.state is TransferState.COMPLETE
    assert len(server._conns) == 1


def test_duplicate_request_on_one_connection_is_already_exists(server, transport, caches):
    pending = server.receiver.expect("req", [1, 2], L, cache_writer(*caches))
    first = transport.open(server.address, "req", [1, 2])
    second = transport.open(server.address, "req", [1, 2])
    with pytest.raises(KVTransferError) as e:
        second.finish(timeout=5)
    assert e.value.status == "ALREADY_EXISTS"
    data = layers(2)
    for layer, (k, v) in enumerate(data):
        first.send_layer(layer, k, v)
    first.finish(timeout=20)
    assert pending.state is TransferState.COMPLETE
    assert_landed(caches, [1, 2], data)


def test_connection_cut_mid_frame_fails_the_request(server, caches):
    pending = server.receiver.expect("req", [1, 2], 1, cache_writer(*caches))
    k = torch.ones(1, *BLOCK, dtype=torch.bfloat16)
    second = wire.encode_frame("req", 0, [2], k, k, 1, 2)
    client = RawClient(server.address)
    client.frame(wire.encode_frame("req", 0, [1], k, k, 0, 2))
    client.sock.sendall(proto.ENVELOPE.pack(proto.FRAME, len(second)) + second[:len(second) // 2])
    client.close()
    assert pending.wait(10) is TransferState.FAILED and "truncated" in pending.error
    assert caches[0][0][1].abs().sum() > 0  # half of block 2 may have landed: it is reserved, never committed
    assert caches[0][0][0].abs().sum() == 0 and caches[0][0][3:].abs().sum() == 0


def test_cut_between_frames_fails_the_request(server, caches):
    pending = server.receiver.expect("req", [1, 2], 1, cache_writer(*caches))
    k = torch.ones(1, *BLOCK, dtype=torch.bfloat16)
    client = RawClient(server.address)
    client.frame(wire.encode_frame("req", 0, [1], k, k, 0, 2))  # chunk 0 of 2, then the socket closes
    deadline = time.monotonic() + 10
    while not pending.claimed:                                  # the server has read the frame's header
        assert time.monotonic() < deadline
        time.sleep(0.01)
    client.close()
    assert pending.wait(10) is TransferState.FAILED and "truncated" in pending.error


def test_bad_checksum_is_data_loss_in_finish(server, transport, caches, monkeypatch):
    pending = server.receiver.expect("req", [1, 2], L, cache_writer(*caches))
    encode = proto.frame_parts

    def corrupt(*args):
        parts, nbytes, size = encode(*args)
        v = bytearray(memoryview(parts[2]).cast("B"))
        v[7] ^= 0xFF
        return [parts[0], parts[1], bytes(v)], nbytes, size

    monkeypatch.setattr(proto, "frame_parts", corrupt)
    sender = transport.open(server.address, "req", [1, 2])
    for layer, (k, v) in enumerate(layers(2)):
        sender.send_layer(layer, k, v)
    with pytest.raises(KVTransferError, match="checksum") as e:
        sender.finish(timeout=20)
    assert e.value.status == "DATA_LOSS"
    # the corrupt first frame landed in its own reserved blocks only, and was never committed
    assert pending.state is not TransferState.COMPLETE and pending.bytes_received == 0
    assert all(c[[b for b in range(NB) if b not in (1, 2)]].abs().sum() == 0 for c in caches[0] + caches[1])


def test_corrupt_frame_over_the_wire_is_data_loss(server, caches):
    pending = server.receiver.expect("req", [1], 1, cache_writer(*caches))
    k = torch.ones(1, *BLOCK, dtype=torch.bfloat16)
    frame = bytearray(wire.encode_frame("req", 0, [1], k, k))
    frame[-3] ^= 0xFF
    client = RawClient(server.address)
    client.frame(bytes(frame))
    kind, body = client.reply()
    assert kind == proto.ERROR and body["rid"] == "req" and body["status"] == "DATA_LOSS"
    assert "checksum" in body["message"]
    client.end("req")  # clears the server's state for req; no second answer
    client.close()
    # a first frame's request id is untrusted when its checksum fails: the reservation stays pending
    # (the decode worker aborts it), with nothing committed and nothing outside block 1 written
    assert pending.state is TransferState.PENDING and pending.bytes_received == 0
    assert caches[0][0][2:].abs().sum() == 0 and caches[1][0][2:].abs().sum() == 0
    # and unclaimed: the request's real sender lands it (before, ALREADY_EXISTS: the corrupt frame held it)
    tr = TcpKVTransport(secret=SECRET)
    try:
        data = [(torch.randn(1, *BLOCK).bfloat16(), torch.randn(1, *BLOCK).bfloat16())]
        sender = tr.open(server.address, "req", [1])
        sender.send_layer(0, *data[0])
        sender.finish(timeout=20)
    finally:
        tr.close()
    assert pending.state is TransferState.COMPLETE
    assert_landed(caches, [1], data)


def test_malformed_header_is_invalid_argument(server, caches):
    client = RawClient(server.address)
    header = msgpack.packb({"v": wire.VERSION, "rid": "req", "dtype": "complex64"})
    bad = wire._PREFIX.pack(wire.MAGIC, len(header)) + header
    client.frame(bad + bytes(-len(bad) % 16))  # a request id, but an invalid header: that request fails
    kind, body = client.reply()
    assert (kind, body["rid"], body["status"]) == (proto.ERROR, "req", "INVALID_ARGUMENT")
    client.frame(b"PDKV\x02\x00\x00\x00\xc1\xc1" + bytes(6))  # no request to blame: the connection fails
    kind, body = client.reply()
    assert (kind, body["status"]) == (proto.CLOSE, "INVALID_ARGUMENT")
    assert client.reply() is None  # closed
    client.close()
    assert caches[0][0].abs().sum() == 0


def test_end_without_frames_is_invalid_argument(server, transport, caches):
    server.receiver.expect("req", [1], 1, cache_writer(*caches))
    sender = transport.open(server.address, "req", [1])
    with pytest.raises(KVTransferError) as e:
        sender.finish(timeout=20)
    assert e.value.status == "INVALID_ARGUMENT"


def test_a_wrong_secret_is_answered_close_unauthenticated(server):
    client = RawClient(server.address, secret="wrong")
    assert client.welcome[0] == proto.CLOSE and client.welcome[1]["status"] == "UNAUTHENTICATED"
    client.close()


def test_server_without_secret_accepts_any_client(caches):
    srv = KVTcpServer(KVReceiver())
    srv.start_sync()
    try:
        pending = srv.receiver.expect("req", [1], L, cache_writer(*caches))
        tr = TcpKVTransport(secret="anything")
        sender = tr.open(srv.address, "req", [1])
        for layer, (k, v) in enumerate(layers(1)):
            sender.send_layer(layer, k, v)
        sender.finish(timeout=20)
        tr.close()
        assert pending.state is TransferState.COMPLETE
    finally:
        srv.stop_sync()


def test_unreachable_server_is_unavailable(transport):
    with socket.socket() as held:       # bound, never listening: refused, and no one else can take it
        held.bind(("127.0.0.1", 0))
        sender = transport.open(f"127.0.0.1:{held.getsockname()[1]}", "req", [1])
        with pytest.raises(KVTransferError) as e:
            sender.finish(timeout=20)
    assert e.value.status == "UNAVAILABLE"


def test_a_broken_connection_is_replaced(caches):
    srv = KVTcpServer(KVReceiver(), secret=SECRET)
    srv.start_sync()
    port = srv.port
    tr = TcpKVTransport(secret=SECRET)
    try:
        srv.receiver.expect("a", [1], L, cache_writer(*caches))
        sender = tr.open(srv.address, "a", [1])
        for layer, (k, v) in enumerate(layers(1)):
            sender.send_layer(layer, k, v)
        sender.finish(timeout=20)
        srv.stop_sync()  # cuts the connection
        srv = KVTcpServer(KVReceiver(), secret=SECRET, port=port)
        srv.start_sync()
        pending = srv.receiver.expect("b", [2], L, cache_writer(*caches))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the old connection's failure may take a moment to be seen
            sender = tr.open(srv.address, "b", [2])
            for layer, (k, v) in enumerate(layers(1, seed=5)):
                sender.send_layer(layer, k, v)
            try:
                sender.finish(timeout=20)
                break
            except KVTransferError as e:
                assert e.status == "UNAVAILABLE"
                time.sleep(0.05)
        assert pending.state is TransferState.COMPLETE
    finally:
        tr.close()
        srv.stop_sync()


def test_empty_reservation_opens_no_connection(transport):
    sender = transport.open("127.0.0.1:1", "req", [])  # nothing listens there: no connection is made
    assert sender.finish(timeout=5).wire_bytes == 0 and not transport._conns


def test_close_fails_open_senders(server, caches):
    server.receiver.expect("req", [1, 2], L, cache_writer(*caches))
    tr = TcpKVTransport(secret=SECRET)
    sender = tr.open(server.address, "req", [1, 2])
    sender.send_layer(0, *layers(2)[0])
    tr.close()
    with pytest.raises(KVTransferError):
        sender.finish(timeout=5)


# Direct landing: payloads are read straight into the reserved cache blocks.
BIG_NB = 512  # blocks of a cache for 3 MiB frames


def _frame_message(rid, layer, ids, k, v, chunk=0, chunks=1) -> bytes:
    frame = wire.encode_frame(rid, layer, ids, k, v, chunk, chunks)
    return proto.ENVELOPE.pack(proto.FRAME, len(frame)) + frame


@pytest.mark.parametrize("when", ["before the payload", "mid-payload"])
def test_abort_during_a_large_frame_never_touches_the_reused_blocks(server, when):
    kc = [torch.zeros(BIG_NB, *BLOCK, dtype=torch.bfloat16)]
    vc = [torch.zeros(BIG_NB, *BLOCK, dtype=torch.bfloat16)]
    ids = list(range(256))  # one 3 MiB frame
    pending = server.receiver.expect("req", ids, 1, cache_writer(kc, vc))
    ones = torch.ones(len(ids), *BLOCK, dtype=torch.bfloat16)
    message = _frame_message("req", 0, ids, ones, ones)
    cut = len(message) - ones.numel() * 2 * 2 + (0 if when == "before the payload" else 1 << 20)
    client = RawClient(server.address)
    client.sock.sendall(message[:cut])
    deadline = time.monotonic() + 10
    while not pending.claimed or (when == "mid-payload" and kc[0].abs().sum() == 0):
        assert time.monotonic() < deadline
        time.sleep(0.005)  # the header was read (and, mid-payload, the first MiB is landing)
    t0 = time.monotonic()
    assert server.receiver.abort("req")
    assert time.monotonic() - t0 < 1.0  # abort waits for one bounded copy, never for the peer
    for c in kc + vc:  # the blocks are freed and reused by another request
        c.fill_(7.0)
    client.sock.sendall(message[cut:])
    kind, body = client.reply()
    assert (kind, body["rid"], body["status"]) == (proto.ERROR, "req", "ABORTED")
    assert all(bool((c == 7.0).all()) for c in kc + vc)
    # the connection stays in sync: the next request on it lands and is acknowledged
    server.receiver.expect("next", [300], 1, cache_writer(kc, vc))
    client.sock.sendall(_frame_message("next", 0, [300], ones[:1] * 2, ones[:1] * 3))
    client.end("next")
    kind, body = client.reply()
    assert (kind, body["rid"]) == (proto.ACK, "next") and bool((kc[0][300] == 2).all())
    client.close()
    assert pending.state is TransferState.ABORTED


def test_abort_racing_full_speed_frames_never_writes_after_it_returns(server):
    """Abort at random moments while frames stream at full speed; whatever abort() returned
    before, nothing of that request lands in the (reused) blocks afterwards."""
    import random
    rng = random.Random(0)
    kc = [torch.zeros(BIG_NB, *BLOCK, dtype=torch.bfloat16)]
    vc = [torch.zeros(BIG_NB, *BLOCK, dtype=torch.bfloat16)]
    ones = torch.ones(128, *BLOCK, dtype=torch.bfloat16)
    client = RawClient(server.address)
    outcomes = []
    for i in range(12):
        rid, ids = f"r{i}", list(range(128 * (i % 4), 128 * (i % 4 + 1)))
        for c in kc + vc:
            c.zero_()
        server.receiver.expect(rid, ids, 1, cache_writer(kc, vc))
        frames = b"".join(_frame_message(rid, 0, ids[j:j + 32], ones[:32], ones[:32], j // 32, 4)
                          for j in range(0, 128, 32))  # 4 frames of 768 KiB
        writer = threading.Thread(target=_trickle, args=(client.sock, frames))  # ~25 ms
        writer.start()
        time.sleep(rng.uniform(0, 0.03))
        aborted = server.receiver.abort(rid)
        outcomes.append(aborted)
        for c in kc + vc:  # reused at once
            c.fill_(7.0)
        writer.join(10)
        client.end(rid)
        kind, body = client.reply()
        if aborted:  # NOT_FOUND when abort() came before the first header was read
            assert kind == proto.ERROR and body["status"] in ("ABORTED", "NOT_FOUND"), body
        else:  # every block landed before the abort
            assert kind == proto.ACK
        time.sleep(0.05)  # anything still in flight would have landed by now
        assert all(bool((c == 7.0).all()) for c in kc + vc), f"write after abort in {rid}"
    client.close()
    assert any(outcomes), "no abort raced a transfer"


def _trickle(sock, data: bytes, piece: int = 64 << 10) -> None:
    for i in range(0, len(data), piece):
        sock.sendall(data[i:i + piece])
        time.sleep(0.0005)


@pytest.mark.parametrize("ids", [[1, 40], [1, 9], [1, 1]])  # beyond the cache, not reserved, twice
def test_blocks_are_checked_before_any_byte_lands(server, caches, ids):
    kc, vc = caches
    pending = server.receiver.expect("req", [1, 2], 1, cache_writer(kc, vc))
    ones = torch.ones(len(ids), *BLOCK, dtype=torch.bfloat16)
    client = RawClient(server.address)
    client.sock.sendall(_frame_message("req", 0, ids, ones, ones))
    kind, body = client.reply()
    assert (kind, body["rid"], body["status"]) == (proto.ERROR, "req", "INVALID_ARGUMENT")
    assert all(c.abs().sum() == 0 for c in kc + vc) and pending.state is TransferState.FAILED
    client.end("req")
    server.receiver.expect("next", [3], 1, cache_writer(kc, vc))  # the stream stayed in sync
    client.sock.sendall(_frame_message("next", 0, [3], ones[:1], ones[:1]))
    client.end("next")
    assert client.reply()[:1] == (proto.ACK,) and kc[0][3].abs().sum() > 0
    client.close()


def test_shape_mismatch_with_the_cache_is_rejected_unwritten(server, caches):
    kc, vc = caches
    pending = server.receiver.expect("req", [1], 1, cache_writer(kc, vc))
    k = torch.ones(1, BLOCK[0], BLOCK[1], BLOCK[2] + 1, dtype=torch.bfloat16)  # head_dim off by one
    client = RawClient(server.address)
    client.sock.sendall(_frame_message("req", 0, [1], k, k))
    kind, body = client.reply()
    assert (kind, body["status"]) == (proto.ERROR, "INVALID_ARGUMENT") and "cache blocks are" in body["message"]
    client.close()
    assert all(c.abs().sum() == 0 for c in kc + vc) and pending.state is TransferState.FAILED


def test_another_float_dtype_lands_cast_through_the_staging_buffer(server, transport, caches):
    """Pools tuned apart (float16 prefill, bfloat16 decode): the frame is cast at the boundary."""
    kc, vc = caches
    pending = server.receiver.expect("req", [1], 1, cache_writer(kc, vc))
    k = torch.randn(1, *BLOCK, dtype=torch.float16)
    sender = transport.open(server.address, "req", [1])
    sender.send_layer(0, k, -k)
    sender.finish(timeout=20)
    assert pending.state is TransferState.COMPLETE
    assert torch.equal(kc[0][1], k[0].to(torch.bfloat16)) and torch.equal(vc[0][1], -k[0].to(torch.bfloat16))


def test_a_cache_that_cannot_be_viewed_lands_through_the_staging_buffer(server, transport, caches):
    writer = cache_writer(*caches)
    staged = lambda *args: writer(*args)  # noqa: E731  a plain WriteFn: no views
    ids = [5, 6, 9]
    pending = server.receiver.expect("req", ids, L, staged)
    data = layers(len(ids), seed=4)
    sender = transport.open(server.address, "req", ids)
    for layer, (k, v) in enumerate(data):
        sender.send_layer(layer, k, v)
    sender.finish(timeout=20)
    assert pending.state is TransferState.COMPLETE
    assert_landed(caches, ids, data)


def test_idle_link_probe_measures_and_shares_the_connection(server, transport, caches):
    """A probe's filler is read and dropped by the server; the probe is one meter sample of the
    link, and transfers on the same connection before and after it land exactly."""
    bps = transport.probe(server.address, "d0", nbytes=1 << 20, timeout=20)
    (link,) = transport.meter.snapshot()
    assert bps > 0 and (link["dst_id"], link["total_bytes"], link["count"]) == ("d0", 1 << 20, 1)
    ids = [4, 5]
    pending = server.receiver.expect("after", ids, L, cache_writer(*caches))
    data = layers(len(ids), seed=3)
    sender = transport.open(server.address, "after", ids, dst_id="d0")
    for layer, (k, v) in enumerate(data):
        sender.send_layer(layer, k.clone(), v.clone())
    bps2 = transport.probe(server.address, "d0", nbytes=64 << 10, timeout=20)   # queued behind the frames
    sender.finish(timeout=20)
    assert pending.wait(5) is TransferState.COMPLETE and bps2 > 0
    assert_landed(caches, ids, data)
    assert transport.meter.snapshot()[0]["count"] == 3
    with pytest.raises(ValueError):
        transport.probe(server.address, nbytes=proto.MAX_PROBE_BYTES + 1)


def test_probe_of_a_throttled_link_reads_at_most_its_rate(server):
    limit = 8e6   # bytes/s
    tr = TcpKVTransport(secret=SECRET, bandwidth_limit_bytes_per_s=limit)
    try:
        assert tr.probe(server.address, nbytes=2 << 20, timeout=20) <= limit * 1.001
    finally:
        tr.close()


def test_probe_of_a_dead_address_fails_cleanly():
    from pdcluster.kv_transfer import KVTransferError
    tr = TcpKVTransport(secret=SECRET, connect_timeout_s=2)
    try:
        with pytest.raises(KVTransferError):
            tr.probe("127.0.0.1:1", timeout=10)
    finally:
        tr.close()


@pytest.mark.parametrize("address", ["127.0.0.1:notaport", "127.0.0.1", ":5000", "127.0.0.1:0", "127.0.0.1:70000",
                                     "127.0.0.1:\u00b2", "evil\nCRITICAL forged:1", "a\x1b[31m:1", 12345,
                                     "h" * 400 + ":1"])
def test_a_malformed_address_is_a_value_error_and_leaves_no_connection(address):
    """A pull order carries the puller's address: the holder's transport refuses one it cannot connect to as an
    address at once, with no connection cached and no thread started for it (a later valid one still works)."""
    tr = TcpKVTransport(secret=SECRET, connect_timeout_s=2)
    try:
        threads = threading.active_count()
        with pytest.raises(ValueError, match="KV address"):
            tr.open(address, "r", [0, 1])
        with pytest.raises(ValueError, match="KV address"):
            tr.probe(address, timeout=5)
        assert not tr._conns and threading.active_count() == threads
        assert parse_address("[::1]:5000") == ("::1", 5000) and parse_address("node-1.local:80") == ("node-1.local", 80)
    finally:
        tr.close()
