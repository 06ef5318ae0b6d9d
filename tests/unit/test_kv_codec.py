"""KV compression on the wire: codec round trip and error bounds, header validation (nothing lands
from a bad compressed frame), TCP and gRPC transfers with int8 / fp8, and the per-link policy."""
import struct
import zlib

import msgpack
import pytest
import torch

from pdcluster.kernels.pack_kv import pack_kv_ref
from pdcluster.kv_transfer import (BandwidthMeter, GrpcKVTransport, KVReceiver, KVServer, KVTcpServer, TcpKVTransport,
                         TransferState, cache_writer, wire)
from pdcluster.kv_transfer import codec as kvcodec
from pdcluster.kv_transfer.tcp import protocol as proto
from pdcluster.kv_transfer.codec_policy import AUTO_CODEC, CompressionPolicy, prefill_seconds
from pdcluster.kv_transfer.errors import DataLoss, MalformedFrame

pytestmark = pytest.mark.timeout(60)

L, NB, BLOCK = 3, 24, (16, 3, 64)  # layers, cache blocks, [block_size, kv_heads, head_dim]


def _lossy(codec, x):
    """x after the codec's round trip (what must land on the decode side, bit for bit)."""
    return kvcodec.decode(*kvcodec.encode(codec, x), x.dtype)


def _kv(n, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n, *BLOCK, generator=g) * torch.tensor([0.1, 1.0, 20.0])[None, None, :, None]  # heads apart
    return k.to(dtype), torch.randn(n, *BLOCK, generator=g).to(dtype)


# codec
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("codec", ["int8", "fp8"])
def test_round_trip_within_the_error_bound(codec, dtype):
    x, _ = _kv(5, dtype)
    q, scales = kvcodec.encode(codec, x)
    assert q.dtype == kvcodec.QUANT[codec] and q.shape == x.shape and scales.shape == (5, 3)
    y = kvcodec.decode(q, scales, dtype)
    assert y.dtype == dtype and y.shape == x.shape
    xf, err, s = x.float(), (y.float() - x.float()).abs(), scales[:, None, :, None]
    bound = s / 2 if codec == "int8" else xf.abs() / 16 + s * 2**-10
    bound = bound + xf.abs() * (2**-8 if dtype == torch.bfloat16 else 1e-6)  # the cast back to dtype
    assert (err <= bound + 1e-12).all()
    if codec == "int8":  # per (block, kv head) scales: the small head keeps its own precision,
        block_step = xf.abs().amax(dim=(1, 2, 3)).min() / 127  # 10x finer than one scale per block
        assert err[:, :, 0].max() < block_step / 20


def test_same_rounding_as_the_pack_kv_reference():
    """With one kv head a (block, head) scale is pack_kv's per-block scale: identical bytes."""
    for codec in ("int8", "fp8"):
        g = torch.Generator().manual_seed(1)
        k, v = torch.randn(6, 16, 1, 64, generator=g), torch.randn(6, 16, 1, 64, generator=g)
        buf, scales = pack_kv_ref(k, v, list(range(6)), codec)
        (kq, ks), (vq, vs) = kvcodec.encode(codec, k), kvcodec.encode(codec, v)
        assert torch.equal(buf[0].view(torch.uint8), kq.view(torch.uint8))
        assert torch.equal(buf[1].view(torch.uint8), vq.view(torch.uint8))
        assert torch.equal(scales, torch.stack((ks[:, 0], vs[:, 0])))


def test_zero_blocks_encode_to_zero_scales_and_decode_exactly():
    q, s = kvcodec.encode("int8", torch.zeros(2, *BLOCK))
    assert (s == 0).all() and (kvcodec.decode(q, s, torch.float32) == 0).all()


# wire frames
@pytest.mark.parametrize("codec", ["int8", "fp8"])
def test_frame_round_trip_and_size(codec):
    k, v = _kv(4)
    frame = wire.encode_frame("r", 2, [7, 8, 9, 10], k, v, codec=codec)
    plain = wire.encode_frame("r", 2, [7, 8, 9, 10], k, v)
    assert len(frame) < len(plain) / 3.5  # fp32 -> 1 byte + scales
    h, k2, v2 = wire.decode_frame(frame)
    assert (h.codec, h.dtype, h.shape, h.nbytes) == (codec, "float32", (4, *BLOCK), 2 * k.numel())
    assert len(h.scales) == 2 * 4 * 3 * 4 and k2.dtype == torch.float32
    assert torch.equal(k2, _lossy(codec, k)) and torch.equal(v2, _lossy(codec, v))
    assert wire.decode_frame(plain)[0].codec == "none"


def test_chunks_count_the_compressed_size():
    k, v = _kv(12)
    block = kvcodec.block_wire_bytes(k[0], "int8")  # 2 * 3072 + 24 scale bytes
    frames = list(wire.encode_chunks("r", 0, list(range(12)), k, v, chunk_bytes=4 * block, codec="int8"))
    assert len(frames) == 3 and all(wire.decode_frame(f)[0].shape[0] == 4 for f in frames)


def _reframe(frame: bytes, fix_crc: bool = True, **changes) -> bytes:
    """The frame with header fields replaced (None: removed), crc recomputed over scales + payload."""
    _, hlen = wire._PREFIX.unpack_from(frame)
    off = wire._PREFIX.size + hlen
    h = msgpack.unpackb(frame[wire._PREFIX.size:off])
    payload = frame[off + -off % 16:]
    for key, value in changes.items():
        if value is None:
            h.pop(key, None)
        else:
            h[key] = value
    if fix_crc:
        h["crc"] = zlib.crc32(payload, zlib.crc32(h.get("scales", b"") if isinstance(h.get("scales"), bytes) else b""))
    header = msgpack.packb(h)
    pad = -(wire._PREFIX.size + len(header)) % 16
    return wire._PREFIX.pack(wire.MAGIC, len(header)) + header + bytes(pad) + payload


def _bad_frames():
    k, v = _kv(2)
    good = wire.encode_frame("req", 0, [1, 2], k, v, codec="int8")
    scales = msgpack.unpackb(good[8:8 + wire._PREFIX.unpack_from(good)[1]])["scales"]
    nan = bytearray(scales)
    nan[:4] = bytes.fromhex("0000c07f")  # float32 NaN
    return {
        "unknown codec": _reframe(good, codec="zstd"),
        "too few scales": _reframe(good, scales=scales[:-4]),
        "too many scales": _reframe(good, scales=scales + bytes(4)),
        "no scales": _reframe(good, scales=None),
        "scales not bytes": _reframe(good, scales=[1.0] * 12),
        "NaN scale": _reframe(good, scales=bytes(nan)),
        "negative scale": _reframe(good, scales=bytes.fromhex("000080bf") + scales[4:]),
        "scales on a plain frame": _reframe(wire.encode_frame("req", 0, [1, 2], k, v), scales=scales),
        "integer cache dtype": _reframe(good, dtype="int8"),
        "3-D blocks": _reframe(good, shape=[2, 16, 192], nbytes=2 * 2 * 16 * 192,
                               scales=scales[:2 * 2 * 192 * 4]),
        "payload of the unquantized size": _reframe(good, codec="none", scales=None),
        # finite, but code x scale past bf16's range: the transfer completed with inf in the cache
        "scale past the cache dtype's range": _reframe(good, scales=struct.pack("<f", 1e37) + scales[4:]),
    }


@pytest.mark.parametrize("case", list(_bad_frames()))
def test_bad_compressed_header_is_rejected(case):
    with pytest.raises(MalformedFrame):
        wire.decode_frame(_bad_frames()[case])


def test_crc_covers_the_scales():
    k, v = _kv(2)
    good = wire.encode_frame("req", 0, [1, 2], k, v, codec="fp8")
    h = msgpack.unpackb(good[8:8 + wire._PREFIX.unpack_from(good)[1]])
    flipped = bytes([h["scales"][0] ^ 1]) + h["scales"][1:]
    with pytest.raises(DataLoss):
        wire.decode_frame(_reframe(good, fix_crc=False, scales=flipped))


# transports: a real KVTcpServer / KVServer and cache
@pytest.fixture
def caches():
    return ([torch.zeros(NB, *BLOCK) for _ in range(L)], [torch.zeros(NB, *BLOCK) for _ in range(L)])


@pytest.fixture
def tcp_server():
    srv = KVTcpServer(KVReceiver())
    srv.start_sync()
    yield srv
    srv.stop_sync()


def _send(transport, address, rid, ids, data):
    sender = transport.open(address, rid, ids, codec="int8")
    for layer, (k, v) in enumerate(data):
        sender.send_layer(layer, k, v)
    return sender.finish(timeout=20)


def _check_landed(caches, ids, data, codec):
    for layer, (k, v) in enumerate(data):
        for cache, x in zip(caches, (k, v)):
            assert torch.equal(cache[layer][ids], _lossy(codec, x)) and not torch.equal(cache[layer][ids], x)


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 7000])  # one frame per layer; one block per frame
def test_tcp_transfer_int8_lands_dequantized(tcp_server, caches, chunk_bytes):
    ids = [3, 4, 5, 9, 11]
    pending = tcp_server.receiver.expect("req", ids, L, cache_writer(*caches))
    data = [_kv(len(ids), seed=s) for s in range(L)]
    tr = TcpKVTransport(chunk_bytes=chunk_bytes)
    try:
        stats = _send(tr, tcp_server.address, "req", ids, data)
    finally:
        tr.close()
    assert pending.state is TransferState.COMPLETE
    assert stats.bytes == L * 2 * len(ids) * 16 * 3 * 64  # 1 byte per element
    _check_landed(caches, ids, data, "int8")
    untouched = [i for i in range(NB) if i not in ids]
    assert caches[0][0][untouched].abs().sum() == 0


def test_grpc_transfer_fp8_lands_dequantized(caches):
    receiver = KVReceiver()
    server = KVServer(receiver)
    server.start_sync()
    tr = GrpcKVTransport()
    try:
        ids = [2, 6]
        pending = receiver.expect("req", ids, L, cache_writer(*caches))
        data = [_kv(len(ids), seed=s) for s in range(L)]
        sender = tr.open(server.address, "req", ids, codec="fp8")
        for layer, (k, v) in enumerate(data):
            sender.send_layer(layer, k, v)
        assert sender.finish(timeout=20).bytes == L * 2 * len(ids) * 16 * 3 * 64
        assert pending.state is TransferState.COMPLETE
        _check_landed(caches, ids, data, "fp8")
    finally:
        tr.close()
        server.stop_sync(grace=None)


def test_tcp_rejects_a_bad_compressed_frame_before_anything_lands(tcp_server, caches):
    from tests.unit.test_kv_tcp import RawClient
    pending = tcp_server.receiver.expect("req", [1, 2], 1, cache_writer(*caches))
    client = RawClient(tcp_server.address, secret=None)
    client.frame(_bad_frames()["too few scales"])
    kind, body = client.reply()
    assert (kind, body["rid"], body["status"]) == (proto.ERROR, "req", "INVALID_ARGUMENT")
    assert "scales" in body["message"]
    client.end("req")
    client.close()
    # an invalid header binds no stream: the reservation is not failed on its word (the decode
    # worker aborts it once the prefill side reports the error), and nothing landed
    assert pending.state is TransferState.PENDING and pending.bytes_received == 0
    assert caches[0][0].abs().sum() == 0 and caches[1][0].abs().sum() == 0


def test_throttled_link_is_metered_at_its_rate_even_within_one_burst(tcp_server, caches):
    """What "auto" reads: an emulated link is never faster than its limit, however small the
    transfer (the token bucket's one-chunk burst is pacing slack, not capacity)."""
    meter = BandwidthMeter()
    tr = TcpKVTransport(bandwidth_limit_bytes_per_s=5e6, meter=meter, src_id="p")  # 4 MiB burst
    try:
        ids = [1, 2]
        tcp_server.receiver.expect("req", ids, L, cache_writer(*caches))
        stats = _send(tr, tcp_server.address, "req", ids, [_kv(2, seed=s) for s in range(L)])
    finally:
        tr.close()
    assert stats.busy_s >= stats.wire_bytes / 5e6
    assert meter.bandwidth("p", tcp_server.address) <= 5e6


def test_open_rejects_an_unknown_codec():
    tr = TcpKVTransport()
    try:
        with pytest.raises(ValueError):
            tr.open("127.0.0.1:1", "r", [1], codec="zstd")
    finally:
        tr.close()


# policy
def test_policy_fixed_modes():
    assert CompressionPolicy("off").choose(10**9, 0.001, 1.0) == "none"
    assert CompressionPolicy("int8").choose(1, 100.0, 1e12) == "int8"
    assert CompressionPolicy("fp8").choose(0, None, None) == "fp8"
    with pytest.raises(ValueError):
        CompressionPolicy("zstd")


def test_policy_auto_compresses_only_when_the_link_is_the_bottleneck():
    auto = CompressionPolicy("auto")
    # 46 MB of KV for a prompt that computes in 1 s
    assert auto.choose(46_000_000, 1.0, 10e6) == AUTO_CODEC      # 4.6 s on a 10 MB/s link
    assert auto.choose(46_000_000, 1.0, 1e9) == "none"           # 0.046 s on 1 GB/s: compute-bound
    assert auto.choose(46_000_000, 1.0, None) == "none"          # link not measured yet
    assert auto.choose(46_000_000, None, 10e6) == "none"         # prefill rate not learned yet
    assert auto.choose(0, 1.0, 10e6) == "none"


def test_prefill_seconds_from_the_step_counters():
    assert prefill_seconds(500, 0, 0.0) is None
    assert prefill_seconds(500, 1000, 2.0) == pytest.approx(1.0)


def test_the_registry_names_the_transports_whose_senders_compress():
    """kv_transfer/registry.CODEC_TRANSPORTS (checked in the config tree, before any actor starts) and the
    senders' own `codecs` attribute (what the prefill worker used to ask) say the same."""
    from pdcluster.kv_transfer.registry import CODEC_TRANSPORTS, check_compression, sender_class
    assert all(hasattr(sender_class(t), "codecs") for t in CODEC_TRANSPORTS)
    for t in CODEC_TRANSPORTS:
        check_compression(t, "int8")
    with pytest.raises(ValueError, match="tcp or grpc"):
        check_compression("mooncake", "fp8")
