"""kv_transfer.wire: frames round-trip every dtype and shape; corrupt or malformed frames are rejected."""
import struct
import zlib

import msgpack
import pytest
import torch

from pdcluster.kv_transfer import wire
from pdcluster.kv_transfer.errors import DataLoss, MalformedFrame

# received frames are read-only bytes viewed by torch; wire.py silences this outside pytest
pytestmark = [pytest.mark.timeout(60), pytest.mark.filterwarnings("ignore:The given buffer is not writable")]


def _blocks(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max + 1, shape, generator=g, dtype=torch.int64).to(dtype)


def _frame(header: dict, payload: bytes) -> bytes:
    """A frame with an arbitrary header (for malformed-header tests), laid out like encode_frame."""
    h = msgpack.packb(header)
    pad = -(8 + len(h)) % 16
    return struct.pack("<4sI", wire.MAGIC, len(h)) + h + bytes(pad) + payload


def _good_header(**over):
    payload = bytes(2 * 2 * 4)  # K + V of 2 blocks of float32[1]
    h = {"v": wire.VERSION, "rid": "r", "layer": 0, "blocks": [3, 4], "dtype": "float32",
         "shape": [2, 1], "nbytes": len(payload), "crc": zlib.crc32(payload), "chunk": 0, "chunks": 1}
    h.update(over)
    return h, payload


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.uint8])
@pytest.mark.parametrize("shape", [(3, 16, 3, 64), (1, 2, 1, 5), (0, 16, 3, 64), (2, 0, 3, 4), (4,)])
def test_round_trip_every_dtype_and_shape(dtype, shape):
    k, v = _blocks(shape, dtype, 1), _blocks(shape, dtype, 2)
    ids = list(range(10, 10 + shape[0]))
    frame = wire.encode_frame("req-1", 7, ids, k, v, chunk=2, chunks=5)
    h, k2, v2 = wire.decode_frame(frame)
    assert (h.request_id, h.layer, h.block_ids, h.chunk, h.chunks) == ("req-1", 7, tuple(ids), 2, 5)
    assert h.dtype == str(dtype).removeprefix("torch.") and h.shape == shape
    assert h.nbytes == 2 * k.numel() * k.element_size()
    assert k2.dtype == dtype and torch.equal(k2, k) and torch.equal(v2, v)


def test_round_trip_non_contiguous_inputs():
    base = _blocks((4, 16, 6, 64), torch.bfloat16)
    k = base[:, :, ::2]  # strided heads
    v = base.permute(0, 2, 1, 3)[:, :3].permute(0, 2, 1, 3)  # permuted view
    assert not k.is_contiguous() and not v.is_contiguous()
    h, k2, v2 = wire.decode_frame(wire.encode_frame("r", 0, [1, 2, 3, 4], k, v))
    assert torch.equal(k2, k) and torch.equal(v2, v)


def test_payload_is_aligned_in_frame():
    for rid in ("a", "ab" * 7, "x" * 33):
        frame = wire.encode_frame(rid, 0, [0], torch.ones(1, 3), torch.ones(1, 3))
        assert (len(frame) - 24) % 16 == 0  # K + V of float32[1, 3] = 24 bytes at a 16-aligned offset


def test_chunks_split_on_block_boundaries_and_reassemble():
    k, v = _blocks((10, 16, 3, 64), torch.float32, 1), _blocks((10, 16, 3, 64), torch.float32, 2)
    block_bytes = 2 * 16 * 3 * 64 * 4
    ids = [50 + 3 * i for i in range(10)]
    frames = list(wire.encode_chunks("r", 4, ids, k, v, chunk_bytes=3 * block_bytes + 1))
    assert len(frames) == 4  # 3 + 3 + 3 + 1 blocks
    got_ids, ks, vs = [], [], []
    for i, f in enumerate(frames):
        h, kk, vv = wire.decode_frame(f)
        assert (h.layer, h.chunk, h.chunks) == (4, i, 4) and h.nbytes <= 3 * block_bytes
        got_ids += h.block_ids
        ks.append(kk)
        vs.append(vv)
    assert got_ids == ids and torch.equal(torch.cat(ks), k) and torch.equal(torch.cat(vs), v)


def test_chunk_smaller_than_a_block_still_sends_one_block_per_frame():
    k = v = torch.zeros(3, 16, 3, 64)
    frames = list(wire.encode_chunks("r", 0, [0, 1, 2], k, v, chunk_bytes=100))
    assert [wire.decode_frame(f)[0].block_ids for f in frames] == [(0,), (1,), (2,)]


def test_empty_piece_is_one_empty_frame():
    k = v = torch.zeros(0, 16, 3, 64)
    (frame,) = wire.encode_chunks("r", 0, [], k, v)
    h, k2, _ = wire.decode_frame(frame)
    assert h.chunks == 1 and h.nbytes == 0 and k2.shape == (0, 16, 3, 64)


def test_encode_rejects_mismatched_inputs():
    k = torch.zeros(2, 4)
    with pytest.raises(ValueError):
        wire.encode_frame("r", 0, [0, 1], k, torch.zeros(2, 5))
    with pytest.raises(ValueError):
        wire.encode_frame("r", 0, [0], k, k)  # 2 blocks, 1 id
    with pytest.raises(ValueError):
        wire.encode_frame("r", 0, [0, 1], k.double(), k.double())


def test_bad_checksum_is_data_loss():
    frame = bytearray(wire.encode_frame("r", 0, [0], torch.ones(1, 8), torch.ones(1, 8)))
    frame[-1] ^= 0x40
    with pytest.raises(DataLoss, match="checksum"):
        wire.decode_frame(bytes(frame))


@pytest.mark.parametrize("cut", [1, 17, 64])
def test_truncated_frame_is_data_loss(cut):
    frame = wire.encode_frame("r", 0, [0, 1], torch.ones(2, 8), torch.ones(2, 8))
    with pytest.raises(DataLoss):
        wire.decode_frame(frame[:-cut])


def test_extra_bytes_are_data_loss():
    frame = wire.encode_frame("r", 0, [0], torch.ones(1, 8), torch.ones(1, 8))
    with pytest.raises(DataLoss, match="payload is"):
        wire.decode_frame(frame + b"\0" * 4)


def test_header_length_past_the_frame_is_data_loss():
    with pytest.raises(DataLoss):
        wire.decode_frame(struct.pack("<4sI", wire.MAGIC, 1000) + b"\x80")


@pytest.mark.parametrize("over", [
    {"v": 99}, {"rid": 5}, {"layer": -1}, {"layer": "0"}, {"layer": True}, {"blocks": [1, -2]},
    {"blocks": [1]}, {"dtype": "float64"}, {"dtype": "pickle"}, {"shape": []}, {"shape": [2, -1]},
    {"nbytes": 12}, {"chunk": 1}, {"chunks": 0}, {"crc": None},
])
def test_malformed_header_is_invalid_argument(over):
    h, payload = _good_header(**over)
    with pytest.raises(MalformedFrame):
        wire.decode_frame(_frame(h, payload))


def test_good_header_helper_is_accepted():
    h, payload = _good_header()
    assert wire.decode_frame(_frame(h, payload))[0].block_ids == (3, 4)


def test_bad_magic_and_garbage_header():
    with pytest.raises(MalformedFrame, match="magic"):
        wire.decode_frame(b"NOPE" + bytes(60))
    with pytest.raises(MalformedFrame):
        wire.decode_frame(struct.pack("<4sI", wire.MAGIC, 3) + b"\xc1\xc1\xc1" + bytes(16))
    with pytest.raises(MalformedFrame, match="map"):
        wire.decode_frame(_frame([1, 2], b""))


def test_ack_round_trip():
    ack = wire.Ack(bytes_received=123456789, receiver_seconds=0.25)
    assert wire.decode_ack(wire.encode_ack(ack)) == ack
