"""kv_transfer: a prefill worker streams a request's KV cache, layer by layer, to a decode worker.

Why it looks as it does:
- Push, not pull: the decode worker reserves the destination blocks before the prefill starts, so
  layer l goes out the moment it is computed; the request's ack is the handoff of ownership.
- Raw bytes, not protobuf: a frame is a msgpack header + tensor bytes (wire.py), received with
  one copy at most; the header has its own schema, version and crc32.
- A shared core (wire, receiver, codec, crc, meter, the two interfaces transport.py and serving.py)
  and one sub-package per transport, registered by name (registry.py); a worker starts only its
  transport's half. Byte movers over one KVReceiver (reservations, fencing, completion): a plain TCP
  socket (tcp/, ~1.5 CPU-s/GB cheaper than gRPC Python) and gRPC (grpc/).
- The one pull is RDMA (mooncake/): one-sided writes could not be fenced, so the decode side
  READs staged chunks under the reservation's lock.
- Trust: loopback unless told otherwise; a shared secret (HMAC handshake / metadata); no pickle.
connectors.py plugs all of it into the engine (engine/kv_connector.py). README's module map lists
each module's job.
"""
import importlib

# Public names -> their module, imported on first use (PEP 562): importing a pure-Python submodule
# (codec_policy, meter, errors) pulls in neither torch nor gRPC, so the router's cost model can share
# the workers' CompressionPolicy instead of mirroring it.
_EXPORTS = {
    "KVTransferError": "errors", "GrpcKVTransport": "grpc.transport", "BandwidthMeter": "meter",
    "MooncakeKVServer": "mooncake.server", "MooncakeKVTransport": "mooncake.transport",
    "KVReceiver": "receiver", "PendingTransfer": "receiver", "TransferState": "receiver",
    "cache_writer": "receiver", "KVServer": "grpc.server", "KVTcpServer": "tcp.server",
    "TcpKVTransport": "tcp.transport", "KVTransport": "transport", "LayerwiseSender": "transport",
    "TransferStats": "transport", "KVServerBase": "serving", "ReceiveConnector": "connectors",
    "SendConnector": "connectors", "TRANSPORTS": "registry",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
