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

A piece (one `send_layer` call) is split on block boundaries into frames of at most `chunk_bytes`
payload (at least one block per frame), so every frame stays below gRPC's message limit and the
receiver writes each frame straight into its cache without reassembling anything.

Zero-copy: the sender builds each frame with a single copy (`bytes.join` over the header and the
tensors' numpy memoryviews: gRPC Python needs a `bytes` message). The receiver's K/V tensors are
`torch.frombuffer` views into the received message; the only copy on that side is into the cache.
The payload starts 16-byte aligned inside the message so those views are aligned for any dtype.
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
import torch

from kv_transfer.errors import DataLoss, MalformedFrame

MAGIC = b"PDKV"
VERSION = 1
_PREFIX = struct.Struct("<4sI")  # magic, msgpack header length in bytes
_ALIGN = 16  # payload offset alignment inside a frame, bytes
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


def encode_frame(request_id: str, layer: int, block_ids: Sequence[int], k: torch.Tensor,
                 v: torch.Tensor, chunk: int = 0, chunks: int = 1) -> bytes:
    """One frame for K/V blocks `k`, `v` (same shape and dtype, shape[0] == len(block_ids))."""
    check_blocks(block_ids, k, v)
    k, v = _cpu_contiguous(k), _cpu_contiguous(v)
    kb, vb = _raw(k), _raw(v)
    header = msgpack.packb({
        "v": VERSION, "rid": request_id, "layer": layer, "blocks": list(block_ids),
        "dtype": _DTYPE_NAMES[k.dtype], "shape": list(k.shape), "nbytes": kb.nbytes + vb.nbytes,
        "crc": zlib.crc32(vb, zlib.crc32(kb)), "chunk": chunk, "chunks": chunks,
    })
    pad = -(_PREFIX.size + len(header)) % _ALIGN
    return b"".join((_PREFIX.pack(MAGIC, len(header)), header, bytes(pad), kb, vb))


def encode_chunks(request_id: str, layer: int, block_ids: Sequence[int], k: torch.Tensor,
                  v: torch.Tensor, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
    """Frames for one piece: blocks split so each frame's payload is <= chunk_bytes (>= 1 block)."""
    check_blocks(block_ids, k, v)
    k, v = _cpu_contiguous(k), _cpu_contiguous(v)
    n = k.shape[0]
    block_bytes = 2 * k[:1].numel() * k.element_size()  # K + V of one block
    per_frame = max(1, chunk_bytes // block_bytes) if block_bytes else max(1, n)
    chunks = max(1, math.ceil(n / per_frame))
    for c in range(chunks):
        lo, hi = c * per_frame, min(n, (c + 1) * per_frame)
        yield encode_frame(request_id, layer, block_ids[lo:hi], k[lo:hi], v[lo:hi], c, chunks)


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
    if not shape or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise MalformedFrame(f"header 'shape' {shape!r:.80} must be non-negative ints, >= 1 dim")
    if shape[0] != len(blocks):
        raise MalformedFrame(f"shape {shape} does not hold {len(blocks)} blocks")
    dtype = _field(h, "dtype", str)
    if dtype not in DTYPES:
        raise MalformedFrame(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    header = FrameHeader(
        request_id=_field(h, "rid", str), layer=_field(h, "layer", int), block_ids=tuple(blocks),
        dtype=dtype, shape=tuple(shape), nbytes=_field(h, "nbytes", int), crc=_field(h, "crc", int),
        chunk=_field(h, "chunk", int), chunks=_field(h, "chunks", int))
    if header.layer < 0 or not 0 <= header.chunk < header.chunks:
        raise MalformedFrame(f"bad layer {header.layer} or chunk {header.chunk} of {header.chunks}")
    expected = 2 * math.prod(shape) * DTYPES[dtype].itemsize
    if header.nbytes != expected:
        raise MalformedFrame(f"header nbytes {header.nbytes} != {expected} for 2 x {dtype}{shape}")
    return header


def decode_frame(frame: bytes) -> tuple[FrameHeader, torch.Tensor, torch.Tensor]:
    """Validate one frame; return its header and K, V as zero-copy views into `frame` (read-only)."""
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
    crc = zlib.crc32(memoryview(frame)[off:])
    if crc != header.crc:
        raise DataLoss(f"checksum mismatch in layer {header.layer} chunk {header.chunk}: "
                       f"crc32 {crc:#010x}, header says {header.crc:#010x}")
    dtype, half = DTYPES[header.dtype], header.nbytes // 2
    if half == 0:
        return header, torch.empty(header.shape, dtype=dtype), torch.empty(header.shape, dtype=dtype)
    count = half // dtype.itemsize
    k = torch.frombuffer(frame, dtype=dtype, count=count, offset=off).view(header.shape)
    v = torch.frombuffer(frame, dtype=dtype, count=count, offset=off + half).view(header.shape)
    return header, k, v


def encode_ack(ack: Ack) -> bytes:
    return msgpack.packb({"bytes": ack.bytes_received, "seconds": ack.receiver_seconds})


def decode_ack(data: bytes) -> Ack:
    d = msgpack.unpackb(data, raw=False)
    return Ack(bytes_received=d["bytes"], receiver_seconds=d["seconds"])
