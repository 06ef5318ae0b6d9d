"""The KV transport conformance suite: the same cases over every registered transport
(kv_transfer/registry.py), each its decode-side server over a KVReceiver and its prefill-side
KVTransport on 127.0.0.1, ephemeral ports. Mooncake cases skip where its library is missing.
Transport-specific cases live in test_kv_tcp.py, test_kv_grpc.py and test_kv_mooncake.py."""
import threading
import time

import pytest
import torch

from pdcluster.kv_transfer import BandwidthMeter, KVReceiver, KVTransferError, TransferState, cache_writer
from pdcluster.kv_transfer.mooncake import engine as mooncake_engine
from pdcluster.kv_transfer.registry import TRANSPORTS, sender_class, server_class
from tests.unit.kv_blocks import BLOCK, BLOCK_BYTES, L, NB, SECRET, assert_landed, layers, new_caches, serving

# received frames are read-only bytes viewed by torch; wire.py silences this outside pytest
pytestmark = [pytest.mark.timeout(60), pytest.mark.filterwarnings("ignore:The given buffer is not writable")]

# each transport's small-frame settings: several frames (or staged chunks) per layer
SMALL = {"tcp": dict(chunk_bytes=64 << 10), "grpc": dict(chunk_bytes=64 << 10),
         "mooncake": dict(arena_bytes=64 * BLOCK_BYTES, slot_bytes=4 * BLOCK_BYTES, stage_timeout_s=10.0)}


def make_transport(kind, **kw):
    return sender_class(kind)(**SMALL[kind] | kw)


@pytest.fixture(params=TRANSPORTS)
def kind(request):
    if request.param == "mooncake" and (why := mooncake_engine.available()) is not None:
        pytest.skip(why)
    return request.param


@pytest.fixture
def caches():
    return new_caches()


@pytest.fixture
def server(kind, caches):
    yield from serving(server_class(kind).for_worker(KVReceiver(), *caches, host="127.0.0.1", secret=SECRET))


@pytest.fixture
def transport(kind):
    tr = make_transport(kind, secret=SECRET, meter=BandwidthMeter(), src_id="p0")
    yield tr
    tr.close()


def test_every_transport_is_registered():
    assert TRANSPORTS == ("tcp", "grpc", "mooncake")


def test_server_binds_loopback_ephemeral_port(server):
    assert server.host == "127.0.0.1" and server.port > 0 and server.address.startswith("127.0.0.1:")


def test_multi_layer_transfer_lands_exactly(kind, server, transport, caches):
    ids = [17, 3, 8, 30, 0, 21, 9]  # scattered destination blocks, 7 x 6 KiB x 2 per layer
    pending = server.receiver.expect("req", ids, L, cache_writer(*caches))
    data = layers(len(ids))
    sender = transport.open(server.address, "req", ids, dst_id="d0")
    for layer, (k, v) in enumerate(data):
        sender.send_layer(layer, k.clone(), v.clone())
    stats = sender.finish(timeout=20)
    assert pending.wait(5) is TransferState.COMPLETE
    assert_landed(caches, ids, data)
    assert caches[0][0][[b for b in range(NB) if b not in ids]].abs().sum() == 0
    payload = L * len(ids) * BLOCK_BYTES
    assert stats.bytes == payload == pending.bytes_received
    # push transports add frame headers; Mooncake READs the payload bytes alone
    assert stats.wire_bytes > payload if kind != "mooncake" else stats.wire_bytes == payload
    assert stats.wall_s >= stats.exposed_s >= 0 and stats.busy_s > 0 and stats.receiver_s > 0
    (link,) = transport.meter.snapshot()
    assert (link["src_id"], link["dst_id"], link["total_bytes"], link["count"]) == ("p0", "d0", stats.wire_bytes, 1)


def test_layers_stream_from_a_compute_thread_in_pieces(server, transport, caches):
    ids = list(range(10, 22))
    pending = server.receiver.expect("req", ids, L, cache_writer(*caches))
    data = layers(len(ids), seed=1)
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
    assert_landed(caches, ids, data)
    # send_layer only enqueues: the typical call takes well under the 20 ms "compute" (the median, so
    # one scheduling hiccup on a loaded host does not count)
    assert sorted(enqueue_s)[len(enqueue_s) // 2] < 0.01
    assert stats.exposed_s < stats.wall_s  # earlier layers moved while later ones computed


def test_concurrent_requests_from_several_threads(kind, server, transport, caches):
    reservations = {f"r{i}": list(range(8 * i, 8 * i + 8)) for i in range(4)}
    pending = {rid: server.receiver.expect(rid, ids, L, cache_writer(*caches))
               for rid, ids in reservations.items()}
    data = {rid: layers(8, seed=i) for i, rid in enumerate(reservations)}
    results, start = {}, threading.Barrier(len(reservations))

    def prefill(rid):
        sender = transport.open(server.address, rid, reservations[rid])
        start.wait()
        for layer, (k, v) in enumerate(data[rid]):
            sender.send_layer(layer, k[:4], v[:4])  # two pieces a layer, interleaved across requests
            sender.send_layer(layer, k[4:], v[4:], first=4)
        results[rid] = sender.finish(timeout=20)

    threads = [threading.Thread(target=prefill, args=(rid,)) for rid in reservations]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == sorted(reservations)
    for rid, ids in reservations.items():
        assert pending[rid].state is TransferState.COMPLETE
        assert_landed(caches, ids, data[rid])
    if kind == "tcp":  # every request to one address shares one connection
        assert len(transport._conns) == 1 and len(server._conns) == 1


def test_send_layer_checks_shapes_and_range(server, transport):
    server.receiver.expect("req", [1, 2], L, lambda *a: None)
    sender = transport.open(server.address, "req", [1, 2])
    k = torch.zeros(2, *BLOCK)
    with pytest.raises(ValueError):
        sender.send_layer(0, k, k, first=1)  # blocks [1, 3) of 2 reserved
    with pytest.raises(ValueError):
        sender.send_layer(0, k, torch.zeros(2, 16, 3, 32))
    sender.abort()


def test_unknown_request_is_not_found_and_not_written(kind, server, transport, caches):
    sender = transport.open(server.address, "nobody-expects-me", [1, 2])
    for layer, (k, v) in enumerate(layers(2)):
        sender.send_layer(layer, k, v)
    with pytest.raises(KVTransferError) as e:
        sender.finish(timeout=20)
    assert e.value.status == "NOT_FOUND"
    assert all(c.abs().sum() == 0 for c in caches[0] + caches[1])
    # the link survives a failed request: the next one lands (over the same connection, for tcp)
    pending = server.receiver.expect("next", [3], L, cache_writer(*caches))
    sender = transport.open(server.address, "next", [3])
    for layer, (k, v) in enumerate(layers(1)):
        sender.send_layer(layer, k, v)
    sender.finish(timeout=20)
    assert pending.state is TransferState.COMPLETE
    if kind == "tcp":
        assert len(server._conns) == 1


def test_receiver_abort_fences_the_rest_of_the_stream(server, transport, caches):
    kc, vc = caches
    ids = [4, 5, 6]
    pending = server.receiver.expect("req", ids, L, cache_writer(kc, vc))
    data = layers(len(ids), seed=2)
    sender = transport.open(server.address, "req", ids)
    sender.send_layer(0, *data[0])
    deadline = time.monotonic() + 10
    while pending.bytes_received < len(ids) * BLOCK_BYTES and time.monotonic() < deadline:
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
    sender.send_layer(0, *layers(2)[0])  # 1 layer of 4, then finish
    with pytest.raises(KVTransferError, match="truncated") as e:
        sender.finish(timeout=20)
    assert e.value.status == "DATA_LOSS"
    assert pending.wait(5) is TransferState.FAILED and "truncated" in pending.error


def test_sender_abort_fails_the_request(server, transport, caches):
    pending = server.receiver.expect("req", [1, 2], L, cache_writer(*caches))
    sender = transport.open(server.address, "req", [1, 2])
    sender.send_layer(0, *layers(2)[0])
    deadline = time.monotonic() + 10    # the frame reached the receiver (a busy host can take a while)
    while caches[0][0][1].abs().sum() == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    sender.abort()
    with pytest.raises(KVTransferError) as e:
        sender.finish(timeout=5)
    assert e.value.status == "CANCELLED"
    assert pending.wait(10) is TransferState.FAILED


@pytest.mark.parametrize("secret", [None, "wrong"])
def test_transport_with_wrong_secret_is_unauthenticated(kind, server, caches, secret):
    server.receiver.expect("req", [1], 1, cache_writer(*caches))
    tr = make_transport(kind, secret=secret)
    sender = tr.open(server.address, "req", [1])
    sender.send_layer(0, *(t[:1] for t in layers(1)[0]))
    with pytest.raises(KVTransferError) as e:
        sender.finish(timeout=20)
    tr.close()
    assert e.value.status == "UNAUTHENTICATED"
    assert caches[0][0].abs().sum() == 0


def test_empty_reservation_needs_no_connection(transport):
    sender = transport.open("127.0.0.1:1", "req", [])  # nothing listens there: nothing is opened
    sender.send_layer(0, torch.zeros(0, *BLOCK), torch.zeros(0, *BLOCK))
    stats = sender.finish(timeout=5)
    assert stats.bytes == 0 and stats.wire_bytes == 0


def test_bandwidth_limit_paces_the_stream(kind, server, caches):
    rate = 2e6  # bytes/s
    if kind == "mooncake":  # the decode side pulls: nothing here could pace it
        with pytest.raises(ValueError, match="cannot emulate a slow link"):
            make_transport(kind, bandwidth_limit_bytes_per_s=rate)
        return
    ids = list(range(8))  # 4 layers x 8 blocks x 12 KiB = 384 KiB
    pending = server.receiver.expect("req", ids, L, cache_writer(*caches))
    tr = make_transport(kind, chunk_bytes=32 << 10, secret=SECRET, bandwidth_limit_bytes_per_s=rate)
    sender = tr.open(server.address, "req", ids)
    for layer, (k, v) in enumerate(layers(len(ids))):
        sender.send_layer(layer, k, v)
    stats = sender.finish(timeout=20)
    tr.close()
    assert pending.state is TransferState.COMPLETE
    assert stats.wall_s >= (stats.wire_bytes - (32 << 10) - 4096) / rate  # one frame of burst
