"""The KV transports by name: each a decode-side server class and a prefill-side sender class.

Pure Python and lazy: `TRANSPORTS` (the names, e.g. the CLI's `--kv-transport` choices) imports
neither torch nor gRPC, and a transport's classes are imported only when asked for, so "mooncake"
(which needs libibverbs) costs nothing on a host that never picks it.
"""
from __future__ import annotations

import importlib

# name -> ("module:DecodeSideServer", "module:PrefillSideTransport"), modules under kv_transfer/
_CLASSES = {
    "tcp": ("tcp.server:KVTcpServer", "tcp.transport:TcpKVTransport"),
    "grpc": ("grpc.server:KVServer", "grpc.transport:GrpcKVTransport"),
    "mooncake": ("mooncake.server:MooncakeKVServer", "mooncake.transport:MooncakeKVTransport"),
}
TRANSPORTS = tuple(_CLASSES)        # the default ("tcp") first
CODEC_TRANSPORTS = ("tcp", "grpc")  # those whose senders compress (a `codecs` attribute); Mooncake moves raw bytes
TRANSFER_TIMEOUT_S = 30.0           # default bound on one request's KV transfer, on either end


def check(name: str) -> str:
    if name not in _CLASSES:
        raise ValueError(f"kv transport must be one of {TRANSPORTS}, got {name!r}")
    return name


def check_compression(name: str, compression: str) -> None:
    """ValueError when KV compression is asked of a transport that cannot compress."""
    if compression != "off" and check(name) not in CODEC_TRANSPORTS:
        raise ValueError(f"kv_compression {compression!r} needs the tcp or grpc transport, not {name!r}")


def server_class(name: str) -> type:
    """The decode side's server of transport `name`: serves a KVReceiver (see KVServerBase)."""
    return _load(_CLASSES[check(name)][0])


def sender_class(name: str) -> type:
    """The prefill side's KVTransport of transport `name`."""
    return _load(_CLASSES[check(name)][1])


def _load(path: str) -> type:
    module, _, cls = path.partition(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), cls)
