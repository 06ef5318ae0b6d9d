"""Reset the TCP connection of one gRPC peer or HTTP client: the last resort against a slow reader.

A status (trailers) can only follow the data queued before it, so a client that grants no HTTP/2
window never receives one, and gRPC's Python server offers no way to reset a single stream. The
router then shuts down that client's connection: every stream on it ends (the client sees the
connection reset) and gRPC cancels the calls, which frees what they held. The HTTP API (uvicorn)
offers no handle on a response's connection either. Linux only (/proc).
"""
from __future__ import annotations

import ipaddress
import logging
import os
import socket
from urllib.parse import unquote

log = logging.getLogger(__name__)


def parse_peer(peer: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int] | None:
    """grpc's context.peer() ("ipv4:1.2.3.4:5", "ipv6:[::1]:5", "ipv6:%5B::1%5D:5") -> (ip, port)."""
    kind, _, rest = unquote(peer).partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    host, _, port = rest.rpartition(":")
    try:
        return _plain(ipaddress.ip_address(host.strip("[]"))), int(port)
    except ValueError:
        return None


def _plain(ip):
    """::ffff:1.2.3.4 -> 1.2.3.4, so both spellings of one IPv4 peer compare equal."""
    return ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip


def reset_connection(peer: str, local_port: int) -> bool:
    """Shut down this process's TCP socket from local_port to `peer` (grpc's context.peer()); True
    if one was found."""
    want = parse_peer(peer)
    return want is not None and _shut_down(want, local_port)


def reset_client(client: tuple[str, int], local_port: int) -> bool:
    """The same for an ASGI scope's "client": (host, port)."""
    try:
        want = _plain(ipaddress.ip_address(client[0])), int(client[1])
    except (ValueError, TypeError, IndexError):
        return False
    return _shut_down(want, local_port)


def _shut_down(want, local_port: int) -> bool:
    if not os.path.isdir("/proc/self/fd"):
        return False
    for name in os.listdir("/proc/self/fd"):
        try:
            dup = os.dup(int(name))
        except OSError:
            continue
        try:
            s = socket.socket(fileno=dup)       # owns the duplicate only; grpc's fd stays open
        except OSError:
            os.close(dup)
            continue
        try:
            if s.family not in (socket.AF_INET, socket.AF_INET6) or s.type != socket.SOCK_STREAM:
                continue
            local, remote = s.getsockname(), s.getpeername()
            if local[1] == local_port and (_plain(ipaddress.ip_address(remote[0])), remote[1]) == want:
                s.shutdown(socket.SHUT_RDWR)    # the connection itself, for grpc's fd as well
                return True
        except (OSError, ValueError):
            continue
        finally:
            s.close()
    return False
