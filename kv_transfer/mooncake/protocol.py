"""The mooncake transport's control plane: one bidirectional gRPC stream per request (Pull).

Bytes move by Mooncake READs issued by the decode side; this stream only says where they are.
Messages are msgpack maps (raw-bytes generic handler, as the Push service: see __init__.py):

    client (prefill) -> server (decode)
    {"t": "hello", "v", "rid", "session"}   first; session = the prefill engine's "host:rpc_port"
    {"t": "stage", "seq", "addr", **wire}  chunk `seq` of rid is staged at prefill address `addr`:
                                            K bytes then V bytes, nbytes long; `wire` = the keys of
                                            a wire.py frame header (layer, blocks, dtype, shape,
                                            nbytes, crc, chunk, chunks, v, rid)
    {"t": "end"}                            every chunk is staged; answer "ack" once all landed
    {"t": "cancel"}                         the sender aborted: fail the reservation and return

    server -> client
    {"t": "read", "seq"}                    chunk seq landed in the decode cache (checksummed,
                                            committed): its staging slot may be reused
    {"t": "ack", "bytes", "seconds"}        every (layer, block) landed: ownership handoff
    {"t": "error", "status", "message"}     rid failed (status: a grpc.StatusCode name); the
                                            server reads nothing more and ends the RPC (status OK)

The server handles one message at a time, so once it answers "ack"/"error" (or the RPC ends
without a cancel by the client) no READ of this stream is in flight: the client may then reuse
every slot it still holds. Authentication: `x-pdcluster-secret` metadata, compared in constant time.
"""
from __future__ import annotations

import msgpack

from pdcluster.kv_transfer import wire
from pdcluster.kv_transfer.errors import MalformedFrame

VERSION = 1
SERVICE = "pdcluster.kv.v1.MooncakePull"
PULL_METHOD = f"/{SERVICE}/Pull"
MAX_MESSAGE_BYTES = 1 << 20  # control messages only: headers, never payload
CANCEL_GRACE_S = 5.0  # after a cancel, how long the client waits for the server's reply


def pack(kind: str, **fields) -> bytes:
    return msgpack.packb({"t": kind, **fields})


def unpack(data: bytes) -> dict:
    """A control message as a dict with a str "t"; MalformedFrame otherwise."""
    try:
        msg = msgpack.unpackb(data, raw=False)
    except (ValueError, msgpack.UnpackException) as e:
        raise MalformedFrame(f"control message is not valid msgpack: {e}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
        raise MalformedFrame("control message is not a msgpack map with a type")
    return msg


def stage_message(seq: int, addr: int, header: wire.FrameHeader) -> bytes:
    return pack("stage", seq=seq, addr=addr, v=wire.VERSION, rid=header.request_id, layer=header.layer,
                blocks=list(header.block_ids), dtype=header.dtype, shape=list(header.shape),
                nbytes=header.nbytes, crc=header.crc, chunk=header.chunk, chunks=header.chunks)


def parse_stage(msg: dict) -> tuple[int, int, wire.FrameHeader]:
    """(seq, addr, header) of a "stage" message; MalformedFrame if any field is invalid. addr is a
    64-bit address in the sender's arena: it and the payload's end fit below 2^63 (the engine's int64)."""
    seq, addr = msg.get("seq"), msg.get("addr")
    if not isinstance(seq, int) or not isinstance(addr, int) or addr <= 0:
        raise MalformedFrame(f"stage message needs int seq and addr, got {seq!r:.40}, {addr!r:.40}")
    header = wire._parse_header(msg)
    if addr + header.nbytes >= 2**63:
        raise MalformedFrame(f"stage address {addr:#x} + {header.nbytes} bytes is past a 64-bit address space")
    return seq, addr, header
