"""Listening ports: one clear error when a port is taken, naming the setting that changes it."""
from __future__ import annotations

import errno
import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now. The process it is for may lose it to another one before binding (then it
    fails at once, naming the port); prefer port 0 where the program reports what it bound."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class PortInUse(OSError):
    """host:port is taken; `what` is the listener, `flag` the setting that moves it."""

    def __init__(self, host: str, port: int, what: str, flag: str):
        self.host, self.port, self.what, self.flag = host, port, what, flag
        super().__init__(errno.EADDRINUSE, f"port {port} on {host} ({what}) is already in use: "
                                           f"pick another with {flag}")


def check_free(host: str, port: int, what: str, flag: str) -> None:
    """Raise PortInUse if a listener could not bind host:port now (port 0 is always free); OSError if it could
    not bind host at all (an address this host lacks), port 0 too.

    SO_REUSEADDR as every server here sets it, so a port in TIME_WAIT counts as free.
    """
    for family, _, _, _, addr in socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                    flags=socket.AI_PASSIVE):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(addr)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise PortInUse(host, port, what, flag) from None
                raise


# gRPC servers set SO_REUSEPORT by default: a second server on a taken port would bind and silently
# share its connections. Every grpc.aio.server here passes this option, so the bind fails instead.
GRPC_NO_REUSEPORT = ("grpc.so_reuseport", 0)


def host_port(host: str, port: int) -> str:
    """host:port as gRPC targets and clients read it: an IPv6 host in brackets ([::1]:50051)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def bind_grpc(server, host: str, port: int, what: str, flag: str, credentials=None) -> int:
    """server.add_(in)secure_port(host:port) -> the bound port; PortInUse when it is taken."""
    target = host_port(host, port)
    try:
        bound = (server.add_secure_port(target, credentials) if credentials is not None
                 else server.add_insecure_port(target))
    except RuntimeError:     # grpc >= 1.60 raises where older versions returned 0
        bound = 0
    if bound == 0:
        check_free(host, port, what, flag)
        raise RuntimeError(f"could not bind {target} ({what})")
    return bound


def bind_tcp(create, host: str, port: int, what: str, flag: str):
    """create() -> a listening socket; PortInUse when host:port is taken."""
    try:
        return create()
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise PortInUse(host, port, what, flag) from None
        raise
