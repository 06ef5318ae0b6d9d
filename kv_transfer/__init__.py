"""kv_transfer: a prefill worker streams a request's KV cache, layer by layer, to a decode worker.

Modules (one job each):
    wire.py            frame format: msgpack header + raw K/V bytes, chunking, crc32, ack
    codec.py           KV compression on the wire: int8 / fp8 (e4m3), a scale per (block, kv_head)
    codec_policy.py    CompressionPolicy: per transfer, off | int8 | fp8 | auto (link-bound -> int8)
    errors.py          KVTransferError and kin, each naming its gRPC status
    receiver.py        decode side: KVReceiver (reservations, fencing, completion), InboundStream
    server.py          KVServer: the thin grpc.aio service around a KVReceiver
    transport.py       KVTransport / LayerwiseSender interfaces, TransferStats
    grpc_transport.py  GrpcKVTransport: the gRPC implementation
    tcp_protocol.py    the plain-TCP socket protocol: length-prefixed wire frames, handshake, ACK
    tcp_transport.py   TcpKVTransport: the same frames over one persistent socket per decode address
    tcp_server.py      KVTcpServer: the decode side of it, beside KVServer
    mooncake_engine.py    the Mooncake TransferEngine (imported only when that transport is built)
    mooncake_arena.py     the prefill side's registered staging arena: fixed slots, back-pressure
    mooncake_protocol.py  the Pull control stream (gRPC, msgpack): hello / stage / read / ack
    mooncake_transport.py MooncakeKVTransport: stages chunks, the decode side READs them (RDMA/TCP)
    mooncake_server.py    MooncakeKVServer: READs staged chunks into reserved blocks, under fencing
    crc.py             crc32 == zlib.crc32, through libdeflate when the host has it
    loop_thread.py     the process's shared uvloop thread that drives streams
    malloc_tuning.py   glibc thresholds so ~1 MiB frames reuse heap instead of mmap per message
    throttle.py        token bucket for emulated slow links
    netns.py           make a socket inside a named network namespace (a real shaped link: deploy/netns.py)
    meter.py           BandwidthMeter: per-link bandwidth figures for the router

Push, not pull. The decode worker reserves its destination blocks before the prefill starts
(`KVReceiver.expect`), so nothing needs negotiating when KV is ready: the prefill worker opens one
client-streaming `Push` RPC per request and writes layer l's frames the moment layer l is computed,
while layer l+1 runs. Pull would add a round trip per layer (or a notify-then-fetch protocol) and
make the prefill side hold its blocks until the decode side got round to asking. The RPC's reply is
the handoff: when the prefill worker holds the ack, every (layer, block) landed and was checksummed
on the decode side, so it may free its copy; the decode side's completion fires at the same point.

Raw-bytes generic handler, not a .proto. The service has a single method whose messages are
already bytes (msgpack header + tensor bytes), so it is registered with
`grpc.method_handlers_generic_handler` and identity (de)serializers: gRPC hands the received
message to us as one `bytes` object, which `torch.frombuffer` views without copying, and sending
costs one copy (the frame join). A protobuf `bytes` field would add a parse/serialize copy of every
payload for no gain; the header keeps its own schema (wire.py) and version field.

Trust: the server binds 127.0.0.1 unless told otherwise; an optional shared secret travels as
`x-pdcluster-secret` metadata and is compared in constant time. No pickle crosses the socket.

Two byte movers, one receiver. gRPC Python costs ~1.5 CPU-s per GB in per-message handling, so
`TcpKVTransport` moves the same frames over a plain socket: one persistent connection per (prefill
process, decode address), frames of many requests multiplexed by their header's request id, each
request's stream closed by END and answered by ACK (the handoff, as the Push reply) or ERROR (the
same status names). Frames go out as sendmsg of [header, K, V] memoryviews and land by recv_into
straight into the reserved cache blocks (checked against the reservation first, checksummed in
place); crc32 runs once per frame on each side. The decode
worker runs `KVTcpServer` beside `KVServer` on the same `KVReceiver`, so reservations, fencing and
completion are shared. Its handshake is an HMAC of a server nonce with the shared secret.

Compression (optional, per transfer; TCP and gRPC). The prefill worker's policy picks a codec when
it opens a sender; the sender's writer quantizes each frame, whose header names the codec and
carries the scales. The receiver validates both with the rest of the header, before any payload
byte is read; such a frame is received into a staging buffer (not straight into the cache),
checksummed there, dequantized, and copied into the reserved blocks under the reservation's lock,
so fencing, bounds and checksums hold as for raw frames. Mooncake moves raw cache bytes only.

The one pull: RDMA. With Mooncake (`MooncakeKVTransport`) the bytes move by one-sided operations,
which the receiver's lock cannot fence when the prefill side issues them; so there the prefill side
stages each chunk in a registered arena and announces it on a gRPC control stream, and the decode
side READs it into the reserved blocks under the reservation's lock, or, for caches that are not
host memory (GPU), into a registered host buffer, checksums it there and copies it into the blocks
under that lock (mooncake_transport.py, mooncake_server.py).
"""
import importlib

# Public names -> their module, imported on first use (PEP 562): importing a pure-Python submodule
# (codec_policy, meter, errors) pulls in neither torch nor gRPC, so the router's cost model can share
# the workers' CompressionPolicy instead of mirroring it.
_EXPORTS = {
    "KVTransferError": "errors", "GrpcKVTransport": "grpc_transport", "BandwidthMeter": "meter",
    "MooncakeKVServer": "mooncake_server", "MooncakeKVTransport": "mooncake_transport",
    "KVReceiver": "receiver", "PendingTransfer": "receiver", "TransferState": "receiver",
    "cache_writer": "receiver", "KVServer": "server", "KVTcpServer": "tcp_server",
    "TcpKVTransport": "tcp_transport", "KVTransport": "transport", "LayerwiseSender": "transport",
    "TransferStats": "transport",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
