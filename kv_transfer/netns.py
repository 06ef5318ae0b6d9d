"""Run a callable inside a named network namespace (`ip netns` name), on a dedicated thread.

Linux keeps network-namespace membership per thread, and a socket stays in the namespace it was
created in for its whole life. So `run_in(ns, fn)` starts a fresh thread, moves only that thread
into /var/run/netns/<ns> with setns(2), calls fn there and returns its result (or raises its
exception); the thread then exits. The calling thread (and every other one) never changes
namespace. Sockets that fn creates (a listener, a connected socket) keep working from any thread
afterwards; a listener's accepted sockets are in its namespace too. Needs CAP_SYS_ADMIN (root).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import socket
import threading
from typing import Any, Callable

CLONE_NEWNET = 0x40000000     # setns(2) nstype: a network namespace
NETNS_DIR = "/var/run/netns"  # where `ip netns add NAME` bind-mounts NAME

_libc = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")


def run_in(ns: str | None, fn: Callable[..., Any], *args, **kwargs) -> Any:
    """fn(*args, **kwargs) on a new thread inside namespace `ns` (None: here, on this thread)."""
    if ns is None:
        return fn(*args, **kwargs)
    out: dict[str, Any] = {}

    def body() -> None:
        try:
            fd = os.open(os.path.join(NETNS_DIR, ns), os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(fd)
            finally:
                os.close(fd)
            out["value"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the caller
            out["error"] = e

    thread = threading.Thread(target=body, name=f"netns-{ns}", daemon=True)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def create_server(ns: str | None, address: tuple[str, int], **kwargs) -> socket.socket:
    """socket.create_server(address, **kwargs), the listener created inside `ns`."""
    return run_in(ns, socket.create_server, address, **kwargs)


def create_connection(ns: str | None, address: tuple[str, int], timeout: float | None = None) -> socket.socket:
    """socket.create_connection(address, timeout), the socket created (and connected) inside `ns`."""
    return run_in(ns, socket.create_connection, address, timeout=timeout)
