"""The Mooncake Transfer Engine, imported only when the "mooncake" transport is chosen.

`mooncake.engine` ships in `mooncake-transfer-engine-non-cuda` (CPU hosts) or
`mooncake-transfer-engine` (CUDA hosts) and links libibverbs even for its TCP protocol. Nothing
else in the project imports this module, so a host without the package only fails when the
transport is selected, with MooncakeUnavailable's message.

Protocol "tcp" runs Mooncake's data plane over sockets (loopback tests, hosts without NICs);
"rdma" uses the verbs devices named by `device` ("" = every device found). The engine uses
P2PHANDSHAKE metadata: a peer is named by its session id "host:rpc_port", no etcd needed.

Trust: Mooncake's own listeners (handshake and data) bind every interface and authenticate
nobody; any host that reaches them can read or write registered memory. Run the mooncake
transport only on a trusted cluster network. The control plane (gRPC) requires the cluster secret.
"""
from __future__ import annotations

import os

import torch

HINT = "pip install 'pdcluster[rdma]' and apt install libibverbs1"
DEFAULT_TRANSFER_TIMEOUT_S = 30  # MC_TRANSFER_TIMEOUT unless set: bounds one batch read, seconds


class MooncakeUnavailable(RuntimeError):
    """The mooncake package cannot be imported or its engine cannot start here."""


def _engine_class():
    try:
        from mooncake.engine import TransferEngine
    except Exception as e:  # ImportError, or OSError from a missing libibverbs
        raise MooncakeUnavailable(f"mooncake transport unavailable: {e!r}; {HINT}") from None
    return TransferEngine


def available() -> str | None:
    """None if `mooncake.engine` imports here, else the reason it does not."""
    try:
        _engine_class()
    except MooncakeUnavailable as e:
        return str(e)
    return None


class Engine:
    """One TransferEngine per process side (one per transport / server), with its session id."""

    def __init__(self, host: str = "127.0.0.1", protocol: str = "tcp", device: str = ""):
        cls = _engine_class()
        os.environ.setdefault("MC_TRANSFER_TIMEOUT", str(DEFAULT_TRANSFER_TIMEOUT_S))
        self.te = cls()
        rc = self.te.initialize(host, "P2PHANDSHAKE", protocol, device)
        if rc != 0:
            raise MooncakeUnavailable(f"mooncake transport unavailable: TransferEngine.initialize("
                                      f"{host!r}, protocol={protocol!r}, device={device!r}) returned {rc}; {HINT}")
        self.session_id = f"{host}:{self.te.get_rpc_port()}"
        self.protocol = protocol
        self._registered: list[int] = []  # base addresses, unregistered by close()

    def register(self, t: torch.Tensor) -> None:
        """Register a contiguous tensor's bytes for remote access (it must outlive the engine)."""
        if not t.is_contiguous():
            raise ValueError("only contiguous tensors can be registered")
        ptr, nbytes = t.data_ptr(), t.numel() * t.element_size()
        if self.te.register_memory(ptr, nbytes) != 0:
            raise MooncakeUnavailable(f"mooncake could not register {nbytes} bytes at {ptr:#x}")
        self._registered.append(ptr)

    def read(self, session_id: str, local: list[int], remote: list[int], lengths: list[int]) -> None:
        """Blocking batch READ of remote[i] .. +lengths[i] on `session_id` into local[i]; releases
        the GIL. Raises OSError when Mooncake reports a failure (peer gone, address not registered
        there, timeout)."""
        rc = self.te.batch_transfer_sync_read(session_id, local, remote, lengths)
        if rc != 0:
            raise OSError(f"mooncake read of {sum(lengths)} bytes from {session_id} failed ({rc})")

    def close(self) -> None:
        for ptr in self._registered:
            self.te.unregister_memory(ptr)
        self._registered = []
