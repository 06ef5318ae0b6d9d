"""kv_transfer: a prefill worker streams a request's KV cache, layer by layer, to a decode worker.

Why it looks as it does:
- Push, not pull: the decode worker reserves the destination blocks before the prefill starts, so
  layer l goes out the moment it is computed; the request's ack is the handoff of ownership.
- Raw bytes, not protobuf: a frame is a msgpack header + tensor bytes (wire.py), received with
  one copy at most; the header has its own schema, version and crc32.
- Two byte movers on one KVReceiver (reservations, fencing, completion): gRPC (server.py,
  grpc_transport.py) and a plain TCP socket (tcp_*.py, ~1.5 CPU-s/GB cheaper than gRPC Python).
- The one pull is RDMA (mooncake_*.py): one-sided writes could not be fenced, so the decode side
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
    "KVTransferError": "errors", "GrpcKVTransport": "grpc_transport", "BandwidthMeter": "meter",
    "MooncakeKVServer": "mooncake_server", "MooncakeKVTransport": "mooncake_transport",
    "KVReceiver": "receiver", "PendingTransfer": "receiver", "TransferState": "receiver",
    "cache_writer": "receiver", "KVServer": "server", "KVTcpServer": "tcp_server",
    "TcpKVTransport": "tcp_transport", "KVTransport": "transport", "LayerwiseSender": "transport",
    "TransferStats": "transport", "ReceiveConnector": "connectors", "SendConnector": "connectors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
