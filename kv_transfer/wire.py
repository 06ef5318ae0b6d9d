"""KV frame wire format: a msgpack header plus the raw bytes of K and V for a run of blocks.

One frame (one gRPC message) carries K and V of `n` blocks of one layer:

    0       4        8              8+H         P (16-aligned)    P+nbytes/2       P+nbytes
    | "PDKV" | H u32le | msgpack header | zero pad |  K bytes [n,...] |  V bytes [n,...] |

Header keys (all required):
    v       format version (VERSION)
    rid     request id (str)
    layer   layer index (int >= 0)
    blocks  destination block ids on the decode worker, one per block in this frame (len n)
    dtype   torch dtype name, one of DTYPES
    shape   shape of K (== shape of V), shape[0] == n; a KV block is shape[1:]
    nbytes  payload length in bytes == 2 * prod(shape) * itemsize
    crc     zlib.crc32 of the payload (K bytes then V bytes)
    chunk   index of this frame within its send_layer piece, 0 <= chunk < chunks
    chunks  number of frames the piece was split into
Optional (absent means "none"; codec.py):
    codec   "none" | "int8" | "fp8": how K and V are encoded. "none": raw `dtype` bytes. Otherwise
            the payload is K, V quantized to 1-byte elements, `dtype` is the cache dtype they
            decode into, `shape` is [n, block_size, num_kv_heads, head_dim] and
            nbytes == 2 * prod(shape)
    scales  (quantized codecs only) float32 little-endian bytes [2, n, num_kv_heads]: K's scales
            then V's; crc covers them: crc == crc32(payload, crc32(scales))

A piece (one `send_layer` call) is split on block boundaries into frames of at most `chunk_bytes`
payload (at least one block per frame), so every frame stays below gRPC's message limit and the
receiver writes each frame straight into its cache without reassembling anything.

Zero-copy: the sender builds each frame with a single copy (`bytes.join` over the header and the
tensors' numpy memoryviews: gRPC Python needs a `bytes` message). The receiver's K/V tensors are
`torch.frombuffer` views into the received message; the only copy on that side is into the cache.
The payload starts 16-byte aligned inside the message so those views are aligned for any dtype.
A compressed frame (codec "int8" / "fp8") costs one more pass on each side: quantizing on the
sender, dequantizing into new tensors on the receiver.
No pickle: the header is msgpack of plain ints, strings and lists.
"""
from __future__ import annotations

import math
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import msgpack
import numpy as np
import torch

from pdcluster.kv_transfer import codec as kvcodec
from pdcluster.kv_transfer.errors import DataLoss, MalformedFrame

MAGIC = b"PDKV"
VERSION = 1
_PREFIX = struct.Struct("<4sI")  # magic, msgpack header length in bytes
_ALIGN = 16  # payload offset alignment inside a frame, bytes
MAX_RID_CHARS = 1024  # a frame's request id (the router's are at most ~270: echoed in statuses, kept small)
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int8": torch.int8,
    "uint8": torch.uint8,
}
_DTYPE_NAMES = {dt: name for name, dt in DTYPES.items()}
DEFAULT_CHUNK_BYTES = 1 << 20  # payload bytes per frame
DEFAULT_MAX_MESSAGE_BYTES = 4 << 20  # set explicitly on server and channel; > chunk + header

# gRPC names shared by the server and the client (a generic handler: no .proto, see __init__).
SERVICE = "pdcluster.kv.v1.KVTransfer"
PUSH_METHOD = f"/{SERVICE}/Push"
SECRET_METADATA_KEY = "x-pdcluster-secret"
# Sent by the server as initial metadata the moment it rejects a stream: "stop writing, half-close,
# then read my status". Ending the RPC while the client still writes would instead race the
# client's in-flight write, whose failure gRPC Python reports as a local INTERNAL error.
REJECTED_METADATA_KEY = "x-pdcluster-kv-rejected"

# Received frames are immutable `bytes`; the tensors viewing them are only ever read (copied into
# the cache), so torch's one-time "buffer is not writable" warning carries no information here.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


@dataclass(frozen=True)
class FrameHeader:
    request_id: str
    layer: int
    block_ids: tuple[int, ...]
    dtype: str
    shape: tuple[int, ...]  # of K (== V); shape[0] == len(block_ids)
    nbytes: int  # payload bytes (K + V)
    crc: int
    chunk: int
    chunks: int
    codec: str = "none"  # one of codec.CODECS
    scales: bytes = b""  # float32 LE [2, n, num_kv_heads] for a quantized codec, else b""


@dataclass(frozen=True)
class Ack:
    """The receiver's reply to a completed stream: payload bytes landed, first frame to last, seconds."""

    bytes_received: int
    receiver_seconds: float


def _raw(t: torch.Tensor) -> memoryview:
    """Bytes of a contiguous CPU tensor, without copying (works for bf16: viewed as uint8)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _cpu_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


def check_blocks(block_ids: Sequence[int], k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ValueError unless K and V match, hold len(block_ids) blocks and have a wire dtype."""
    if k.shape != v.shape or k.dtype != v.dtype:
        raise ValueError(f"K {k.dtype}{list(k.shape)} and V {v.dtype}{list(v.shape)} differ")
    if k.dim() < 1 or k.shape[0] != len(block_ids):
        raise ValueError(f"K shape {list(k.shape)} does not hold {len(block_ids)} blocks")
    if k.dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype {k.dtype} is not one of {sorted(DTYPES)}")


def pack(codec: str, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bytes]:
    """K, V as they go on the wire under `codec` (contiguous CPU tensors) and the header's scales
    bytes (b"" for "none"). Raises ValueError for a codec that cannot encode these blocks."""
    kvcodec.check_codec(codec)
    k, v = _cpu_contiguous(k), _cpu_contiguous(v)
    if codec == "none":
        return k, v, b""
    if k.dim() != 4 or k.dtype not in kvcodec.FLOAT_DTYPES:
        raise ValueError(f"codec {codec!r} needs float K/V [n, block_size, kv_heads, head_dim], "
                         f"got {k.dtype}{list(k.shape)}")
    (kq, ks), (vq, vs) = kvcodec.encode(codec, k), kvcodec.encode(codec, v)
    return kq, vq, torch.stack((ks, vs)).numpy().astype("<f4", copy=False).tobytes()


def encode_frame(request_id: str, layer: int, block_ids: Sequence[int], k: torch.Tensor,
                 v: torch.Tensor, chunk: int = 0, chunks: int = 1, codec: str = "none") -> bytes:
    """One frame for K/V blocks `k`, `v` (same shape and dtype, shape[0] == len(block_ids))."""
    check_blocks(block_ids, k, v)
    dtype, shape = k.dtype, list(k.shape)
    k, v, scales = pack(codec, k, v)
    kb, vb = _raw(k), _raw(v)
    fields = {
        "v": VERSION, "rid": request_id, "layer": layer, "blocks": list(block_ids),
        "dtype": _DTYPE_NAMES[dtype], "shape": shape, "nbytes": kb.nbytes + vb.nbytes,
        "crc": zlib.crc32(vb, zlib.crc32(kb, zlib.crc32(scales))), "chunk": chunk, "chunks": chunks,
        "codec": codec,
    }
    if scales:
        fields["scales"] = scales
    header = msgpack.packb(fields)
    pad = -(_PREFIX.size + len(header)) % _ALIGN
    return b"".join((_PREFIX.pack(MAGIC, len(header)), header, bytes(pad), kb, vb))


def blocks_per_frame(k: torch.Tensor, chunk_bytes: int, codec: str = "none") -> int:
    """Blocks of K/V `k` [n, ...] per frame: payload (+ scales) <= chunk_bytes, >= 1 block."""
    block_bytes = kvcodec.block_wire_bytes(k[0], codec) if k.shape[0] else 0
    return max(1, chunk_bytes // block_bytes) if block_bytes else max(1, k.shape[0])


def encode_chunks(request_id: str, layer: int, block_ids: Sequence[int], k: torch.Tensor,
                  v: torch.Tensor, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                  codec: str = "none") -> Iterator[bytes]:
    """Frames for one piece: blocks split so each frame's payload (+ scales) is <= chunk_bytes
    (>= 1 block)."""
    check_blocks(block_ids, k, v)
    k, v = _cpu_contiguous(k), _cpu_contiguous(v)
    n = k.shape[0]
    per_frame = blocks_per_frame(k, chunk_bytes, codec)
    chunks = max(1, math.ceil(n / per_frame))
    for c in range(chunks):
        lo, hi = c * per_frame, min(n, (c + 1) * per_frame)
        yield encode_frame(request_id, layer, block_ids[lo:hi], k[lo:hi], v[lo:hi], c, chunks, codec)


def _field(h: dict, key: str, kind: type):
    value = h.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise MalformedFrame(f"header field {key!r} must be {kind.__name__}, got {value!r:.80}")
    return value


def _parse_header(h: object) -> FrameHeader:
    if not isinstance(h, dict):
        raise MalformedFrame("header is not a msgpack map")
    if h.get("v") != VERSION:
        raise MalformedFrame(f"unsupported frame version {h.get('v')!r}, expected {VERSION}")
    blocks, shape = _field(h, "blocks", list), _field(h, "shape", list)
    if not all(isinstance(b, int) and b >= 0 for b in blocks):
        raise MalformedFrame("header 'blocks' must be non-negative ints")
    if not shape or len(shape) > 8 or not all(isinstance(s, int) and 0 <= s < 1 << 31 for s in shape):
        raise MalformedFrame(f"header 'shape' {shape!r:.80} must be 1-8 ints in [0, 2**31)")
    if shape[0] != len(blocks):
        raise MalformedFrame(f"shape {shape} does not hold {len(blocks)} blocks")
    dtype = _field(h, "dtype", str)
    if dtype not in DTYPES:
        raise MalformedFrame(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    codec, scales = h.get("codec", "none"), h.get("scales", b"")
    if codec not in kvcodec.CODECS:
        raise MalformedFrame(f"codec {codec!r:.40} is not one of {kvcodec.CODECS}")
    if codec != "none":
        _check_quantized(dtype, shape, scales, codec)
    elif scales != b"":
        raise MalformedFrame("header 'scales' given for an unquantized frame")
    header = FrameHeader(
        request_id=_field(h, "rid", str), layer=_field(h, "layer", int), block_ids=tuple(blocks),
        dtype=dtype, shape=tuple(shape), nbytes=_field(h, "nbytes", int), crc=_field(h, "crc", int),
        chunk=_field(h, "chunk", int), chunks=_field(h, "chunks", int), codec=codec, scales=scales)
    if len(header.request_id) > MAX_RID_CHARS:
        raise MalformedFrame(f"a request id of {len(header.request_id)} characters (at most {MAX_RID_CHARS})")
    if header.layer < 0 or not 0 <= header.chunk < header.chunks:
        raise MalformedFrame(f"bad layer {header.layer} or chunk {header.chunk} of {header.chunks}")
    expected = kvcodec.payload_bytes(codec, shape, DTYPES[dtype])
    if header.nbytes != expected:
        raise MalformedFrame(f"header nbytes {header.nbytes} != {expected} for 2 x {codec} {dtype}{shape}")
    return header


def _check_quantized(dtype: str, shape: list, scales: object, codec: str) -> None:
    """A quantized frame decodes into a float cache of 4-D blocks and carries one finite scale >= 0
    per (K/V, block, kv_head)."""
    if DTYPES[dtype] not in kvcodec.FLOAT_DTYPES or len(shape) != 4:
        raise MalformedFrame(f"a quantized frame needs float [n, block_size, kv_heads, head_dim] "
                             f"blocks, got {dtype}{shape}")
    want = kvcodec.num_scales(shape) * kvcodec.SCALE_BYTES
    if not isinstance(scales, bytes) or len(scales) != want:
        got = len(scales) if isinstance(scales, bytes) else type(scales).__name__
        raise MalformedFrame(f"header 'scales' must be {want} bytes (2 x {shape[0]} blocks x "
                             f"{shape[2]} kv heads x float32), got {got}")
    if (why := kvcodec.check_scales(_scales(scales), codec, DTYPES[dtype])) is not None:
        raise MalformedFrame(f"header 'scales': {why}")


def _scales(scales: bytes) -> torch.Tensor:
    """The header's scales bytes as float32 [2 * n * kv_heads] (a copy: the header is transient)."""
    return torch.from_numpy(np.frombuffer(scales, dtype="<f4").astype(np.float32))


def payload_tensors(header: FrameHeader, payload: torch.Tensor, keep_codes: bool = False):
    """K, V of a checked frame from its payload (uint8 tensor of header.nbytes, 16-byte aligned):
    views for codec "none", new tensors of header.dtype dequantized from it otherwise; with
    keep_codes, a quantized frame's K, V as codec.Encoded (code views + scales, not decoded: a
    quantized cache of that codec lands them as they are)."""
    dtype, half = DTYPES[header.dtype], header.nbytes // 2
    if half == 0:
        return torch.empty(header.shape, dtype=dtype), torch.empty(header.shape, dtype=dtype)
    if header.codec == "none":
        return (payload[:half].view(dtype).view(header.shape),
                payload[half:2 * half].view(dtype).view(header.shape))
    q = payload[:2 * half].view(kvcodec.QUANT[header.codec]).view(2, *header.shape)
    s = _scales(header.scales).view(2, header.shape[0], header.shape[2])
    if keep_codes:
        return (kvcodec.Encoded(header.codec, q[0], s[0], dtype), kvcodec.Encoded(header.codec, q[1], s[1], dtype))
    return kvcodec.decode(q[0], s[0], dtype), kvcodec.decode(q[1], s[1], dtype)


def decode_frame(frame: bytes, keep_codes: bool = False) -> tuple[FrameHeader, torch.Tensor, torch.Tensor]:
    """Validate one frame; return its header and K, V as zero-copy views into `frame` (read-only);
    keep_codes: see payload_tensors."""
    if len(frame) < _PREFIX.size:
        raise DataLoss(f"frame of {len(frame)} bytes is shorter than its {_PREFIX.size}-byte prefix")
    magic, hlen = _PREFIX.unpack_from(frame)
    if magic != MAGIC:
        raise MalformedFrame(f"bad magic {magic!r}, expected {MAGIC!r}")
    off = _PREFIX.size + hlen
    if off > len(frame):
        raise DataLoss(f"header length {hlen} runs past the {len(frame)}-byte frame")
    try:
        raw_header = msgpack.unpackb(memoryview(frame)[_PREFIX.size:off], raw=False)
    except (ValueError, msgpack.UnpackException) as e:
        raise MalformedFrame(f"header is not valid msgpack: {e}") from None
    header = _parse_header(raw_header)
    off += -off % _ALIGN
    if len(frame) - off != header.nbytes:
        raise DataLoss(f"payload is {len(frame) - off} bytes, header says {header.nbytes}")
    crc = zlib.crc32(memoryview(frame)[off:], zlib.crc32(header.scales))
    if crc != header.crc:
        raise DataLoss(f"checksum mismatch in layer {header.layer} chunk {header.chunk}: "
                       f"crc32 {crc:#010x}, header says {header.crc:#010x}")
    dtype, half = DTYPES[header.dtype], header.nbytes // 2
    if half == 0:
        return header, torch.empty(header.shape, dtype=dtype), torch.empty(header.shape, dtype=dtype)
    if header.codec != "none":
        payload = torch.frombuffer(frame, dtype=torch.uint8, count=header.nbytes, offset=off)
        return header, *payload_tensors(header, payload, keep_codes)
    count = half // dtype.itemsize
    k = torch.frombuffer(frame, dtype=dtype, count=count, offset=off).view(header.shape)
    v = torch.frombuffer(frame, dtype=dtype, count=count, offset=off + half).view(header.shape)
    return header, k, v


def encode_ack(ack: Ack) -> bytes:
    return msgpack.packb({"bytes": ack.bytes_received, "seconds": ack.receiver_seconds})


def decode_ack(data: bytes) -> Ack:
    d = msgpack.unpackb(data, raw=False)
    return Ack(bytes_received=d["bytes"], receiver_seconds=d["seconds"])
