"""The decode side's view of a KV transport: a server that feeds one KVReceiver.

Each registered transport (registry.py) has one: tcp/server.py, grpc/server.py, mooncake/server.py.
The decode worker builds its transport's server with `for_worker` and never knows which it holds.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

from pdcluster.kv_transfer.receiver import KVReceiver


class KVServerBase(ABC):
    """Serves a KVReceiver at host:port (port 0 = ephemeral; `port` holds the bound one after
    start_sync). Frames land only in blocks the receiver expects."""

    namespaced = False        # can listen inside an `ip netns` namespace (its constructor takes netns=)
    registers_caches = False  # its constructor takes (receiver, k_caches, v_caches) to register them

    def __init__(self, receiver: KVReceiver, *, host: str = "127.0.0.1", port: int = 0):
        self.receiver, self.host, self.port = receiver, host, port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def for_worker(cls, receiver: KVReceiver, k_caches: Sequence, v_caches: Sequence, *, host: str,
                   port: int = 0, secret: str | None = None, netns: str | None = None) -> "KVServerBase":
        """The decode worker's constructor: the caches are for a transport that registers them with
        its engine (Mooncake), netns for one that can listen inside a network namespace (TCP)."""
        if netns is not None and not cls.namespaced:
            raise ValueError(f"{cls.__name__} cannot listen inside a network namespace (tcp only)")
        kw = {"netns": netns} if netns is not None else {}
        caches = (k_caches, v_caches) if cls.registers_caches else ()
        return cls(receiver, *caches, host=host, port=port, secret=secret, **kw)

    @abstractmethod
    def start_sync(self) -> None:
        """Bind and serve in the background."""

    @abstractmethod
    def stop_sync(self, grace: float | None = None) -> None:
        """Stop serving; streams still open fail."""
