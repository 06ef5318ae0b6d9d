"""kv_transfer over real gRPC on 127.0.0.1 (ephemeral ports): KVServer + KVReceiver <- GrpcKVTransport."""
import asyncio
import threading
import time

import grpc
import pytest
import torch

from pdcluster.kv_transfer import (BandwidthMeter, GrpcKVTransport, KVReceiver, KVServer, KVTransferError,
                         TransferState, cache_writer, wire)
from pdcluster.kv_transfer.loop_thread import shared_loop

# received frames are read-only bytes viewed by torch; wire.py silences this outside pytest
pytestmark = [pytest.mark.timeout(60), pytest.mark.filterwarnings("ignore:The given buffer is not writable")]

L, NB, BLOCK = 4, 32, (16, 3, 64)  # layers, cache blocks, [block_size, kv_heads, head_dim]
SECRET = "s3cret"


@pytest.fixture
def caches():
    return ([torch.zeros(NB, *BLOCK, dtype=torch.bfloat16) for _ in range(L)],
            [torch.zeros(NB, *BLOCK, dtype=torch.bfloat16) for _ in range(L)])


@pytest.fixture
def server():
    srv = KVServer(KVReceiver(), secret=SECRET)  # 127.0.0.1, port 0
    srv.start_sync()
    yield srv
    srv.stop_sync(grace=None)


@pytest.fixture
def transport():
    tr = GrpcKVTransport(chunk_bytes=64 << 10, secret=SECRET, meter=BandwidthMeter(), src_id="p0")
    yield tr
    tr.close()


def _layers(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *BLOCK, generator=g).bfloat16(), torch.randn(n, *BLOCK, generator=g).bfloat16())
            for _ in range(L)]


def _push_raw(address, frames, metadata=()):
    """Push hand-made frames with a bare gRPC client; returns the ack bytes or raises AioRpcError."""
    async def go():
        async with grpc.aio.insecure_channel(address) as channel:
            return await channel.stream_unary(wire.PUSH_METHOD)(iter(frames), metadata=metadata)
    return asyncio.run_coroutine_threadsafe(go(), shared_loop()).result(20)


def test_server_binds_loopback_ephemeral_port(server):
    assert server.host == "127.0.0.1" and server.port > 0 and server.address.startswith("127.0.0.1:")


def test_multi_layer_transfer_lands_exactly(server, transport, caches):
    kc, vc = caches
    ids = [17, 3, 8, 30, 0, 21, 9]  # scattered destination blocks, 7 x 6 KiB x 2 per layer
    pending = server.receiver.expect("req", ids, L, cache_writer(kc, vc))
    data = _layers(len(ids))
    sender = transport.open(server.address, "req", ids, dst_id="d0")
    for layer, (k, v) in enumerate(data):
        sender.send_layer(layer, k.clone(), v.clone())
    stats = sender.finish(timeout=20)
    assert pending.wait(5) is TransferState.COMPLETE
    for layer, (k, v) in enumerate(data):
        assert torch.equal(kc[layer][ids], k) and torch.equal(vc[layer][ids], v)
    assert kc[0][[b for b in range(NB) if b not in ids]].abs().sum() == 0
    payload = L * 2 * len(ids) * 16 * 3 * 64 * 2
    assert stats.bytes == payload == pending.bytes_received and stats.wire_bytes > payload
    assert stats.wall_s >= stats.exposed_s >= 0 and stats.busy_s > 0 and stats.receiver_s > 0
    (link,) = transport.meter.snapshot()
    assert (link["src_id"], link["dst_id"], link["total_bytes"], link["count"]) == ("p0", "d0", stats.wire_bytes, 1)


def test_layers_stream_from_a_compute_thread_in_pieces(server, transport, caches):
    kc, vc = caches
    ids = list(range(10, 22))
    pending = server.receiver.expect("req", ids, L, cache_writer(kc, vc))
    data = _layers(len(ids), seed=1)
    sender = transport.open(server.address, "req", ids)
    enqueue_s = []

    def compute():  # each layer "computes" 20 ms, then hands over its blocks in two pieces
        for layer, (k, v) in enumerate(data):
            time.sleep(0.02)
            t0 = time.perf_counter()
            sender.send_layer(layer, k[:5].clone(), v[:5].clone())
            sender.send_layer(layer, k[5:].clone(), v[5:].clone(), first=5)
            enqueue_s.append(time.perf_counter() - t0)

    worker = threading.Thread(target=compute)
    worker.start()
    worker.join(20)
    stats = sender.finish(timeout=20)
    assert pending.state is TransferState.COMPLETE
    for layer, (k, v) in enumerate(data):
        assert torch.equal(kc[layer][ids], k) and torch.equal(vc[layer][ids], v)
    # send_layer only enqueues: the typical call takes well under the 20 ms "compute" (the median, so
    # one scheduling hiccup on a loaded host does not count)
    assert sorted(enqueue_s)[len(enqueue_s) // 2] < 0.01
    assert stats.exposed_s < stats.wall_s  # earlier layers moved while later ones computed


def test_concurrent_requests_from_several_threads(server, transport, caches):
    kc, vc = caches
    reservations = {f"r{i}": list(range(8 * i, 8 * i + 8)) for i in range(3)}
    pending = {rid: server.receiver.expect(rid, ids, L, cache_writer(kc, vc))
               for rid, ids in reservations.items()}
    data = {rid: _layers(8, seed=i) for i, rid in enumerate(reservations)}
    results = {}

    def prefill(rid):
        sender = transport.open(server.address, rid, reservations[rid])
        for layer, (k, v) in enumerate(data[rid]):
            sender.send_layer(layer, k, v)
        results[rid] = sender.finish(timeout=20)

    threads = [threading.Thread(target=prefill, args=(rid,)) for rid in reservations]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == sorted(reservations)
    for rid, ids in reservations.items():
        assert pending[rid].state is TransferState.COMPLETE
        for layer, (k, v) in enumerate(data[rid]):
            assert torch.equal(kc[layer][ids], k) and torch.equal(vc[layer][ids], v)


def test_send_layer_checks_shapes_and_range(server, transport):
    server.receiver.expect("req", [1, 2], L, lambda *a: None)
    sender = transport.open(server.address, "req", [1, 2])
    k = torch.zeros(2, *BLOCK)
    with pytest.raises(ValueError):
        sender.send_layer(0, k, k, first=1)  # blocks [1, 3) of 2 reserved
    with pytest.raises(ValueError):
        sender.send_layer(0, k, torch.zeros(2, 16, 3, 32))
    sender.abort()


def test_unknown_request_is_not_found_and_not_written(server, transport, caches):
    kc, vc = caches
    sender = transport.open(server.address, "nobody-expects-me", [1, 2])
    for layer, (k, v) in enumerate(_layers(2)):
        sender.send_layer(layer, k, v)
    with pytest.raises(KVTransferError) as e:
        sender.finish(timeout=20)
    assert e.value.status == "NOT_FOUND"
    assert all(c.abs().sum() == 0 for c in kc + vc)


def test_receiver_abort_fences_the_rest_of_the_stream(server, transport, caches):
    kc, vc = caches
    ids = [4, 5, 6]
    pending = server.receiver.expect("req", ids, L, cache_writer(kc, vc))
    data = _layers(len(ids), seed=2)
    sender = transport.open(server.address, "req", ids)
    sender.send_layer(0, *data[0])
    deadline = time.monotonic() + 10
    while pending.bytes_received < 2 * 3 * 16 * 3 * 64 * 2 and time.monotonic() < deadline:
        time.sleep(0.005)  # layer 0 landed
    assert server.receiver.abort("req")
    for layer in range(1, L):
        sender.send_layer(layer, *data[layer])
    with pytest.raises(KVTransferError) as e:
        sender.finish(timeout=20)
    assert e.value.status == "ABORTED" and pending.state is TransferState.ABORTED
    assert torch.equal(kc[0][ids], data[0][0])
    assert all(kc[l].abs().sum() == 0 and vc[l].abs().sum() == 0 for l in range(1, L))


def test_truncated_transfer_is_data_loss_and_fails_the_request(server, transport, caches):
    pending = server.receiver.expect("req", [1, 2], L, cache_writer(*caches))
    sender = transport.open(server.address, "req", [1, 2])
    sender.send_layer(0, *_layers(2)[0])  # 1 layer of 4, then finish
    with pytest.raises(KVTransferError, match="truncated") as e:
        sender.finish(timeout=20)
    assert e.value.status == "DATA_LOSS"
    assert pending.wait(5) is TransferState.FAILED and "truncated" in pending.error


def test_sender_abort_fails_the_request(server, transport, caches):
    pending = server.receiver.expect("req", [1, 2], L, cache_writer(*caches))
    sender = transport.open(server.address, "req", [1, 2])
    sender.send_layer(0, *_layers(2)[0])
    deadline = time.monotonic() + 10    # the frame reached the receiver (a busy host can take a while)
    while caches[0][0][1].abs().sum() == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    sender.abort()
    with pytest.raises(KVTransferError) as e:
        sender.finish(timeout=5)
    assert e.value.status == "CANCELLED"
    assert pending.wait(10) is TransferState.FAILED


def test_corrupt_frame_over_the_wire_is_data_loss(server, caches):
    pending = server.receiver.expect("req", [1], 1, cache_writer(*caches))
    k = torch.ones(1, *BLOCK, dtype=torch.bfloat16)
    frame = bytearray(wire.encode_frame("req", 0, [1], k, k))
    frame[-3] ^= 0xFF
    with pytest.raises(grpc.aio.AioRpcError) as e:
        _push_raw(server.address, [bytes(frame)], metadata=(("x-pdcluster-secret", SECRET),))
    assert e.value.code() == grpc.StatusCode.DATA_LOSS and "checksum" in e.value.details()
    assert caches[0][0].abs().sum() == 0 and pending.state is TransferState.PENDING


def test_malformed_frame_over_the_wire_is_invalid_argument(server):
    with pytest.raises(grpc.aio.AioRpcError) as e:
        _push_raw(server.address, [b"PDKV\x02\x00\x00\x00\xc1\xc1" + bytes(6)],
                  metadata=(("x-pdcluster-secret", SECRET),))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("metadata", [(), (("x-pdcluster-secret", "wrong"),)])
def test_secret_mismatch_is_unauthenticated(server, caches, metadata):
    server.receiver.expect("req", [1], 1, cache_writer(*caches))
    k = torch.ones(1, *BLOCK, dtype=torch.bfloat16)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        _push_raw(server.address, [wire.encode_frame("req", 0, [1], k, k)], metadata=metadata)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert caches[0][0].abs().sum() == 0


def test_transport_with_wrong_secret_is_unauthenticated(server, caches):
    server.receiver.expect("req", [1], 1, cache_writer(*caches))
    tr = GrpcKVTransport(secret="nope")
    sender = tr.open(server.address, "req", [1])
    sender.send_layer(0, *(t[:1] for t in _layers(1)[0]))
    with pytest.raises(KVTransferError) as e:
        sender.finish(timeout=20)
    tr.close()
    assert e.value.status == "UNAUTHENTICATED"


def test_empty_reservation_needs_no_rpc(transport):
    sender = transport.open("127.0.0.1:1", "req", [])  # nothing listens there: no RPC is made
    sender.send_layer(0, torch.zeros(0, *BLOCK), torch.zeros(0, *BLOCK))
    stats = sender.finish(timeout=5)
    assert stats.bytes == 0 and stats.wire_bytes == 0


def test_bandwidth_limit_paces_the_stream(server, caches):
    ids = list(range(8))  # 4 layers x 8 blocks x 12 KiB = 384 KiB
    pending = server.receiver.expect("req", ids, L, cache_writer(*caches))
    rate = 2e6  # bytes/s
    tr = GrpcKVTransport(chunk_bytes=32 << 10, secret=SECRET, bandwidth_limit_bytes_per_s=rate)
    sender = tr.open(server.address, "req", ids)
    for layer, (k, v) in enumerate(_layers(len(ids))):
        sender.send_layer(layer, k, v)
    stats = sender.finish(timeout=20)
    tr.close()
    assert pending.state is TransferState.COMPLETE
    assert stats.wall_s >= (stats.wire_bytes - (32 << 10) - 4096) / rate  # one frame of burst
