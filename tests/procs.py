"""Subprocess helpers of the tests that run the real CLI (`pdcluster serve`, `ray start`)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pdcluster.ports import free_port  # noqa: F401  (the tests import it from here)

BIN = Path(sys.executable).parent       # the venv's console scripts: pdcluster, ray


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for(pred, timeout_s: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Poll pred every 0.2 s until true; AssertionError (with the log's tail) if proc exits first or
    timeout_s passes."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited {proc.returncode}\n{log.read_text()[-3000:] if log else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f}s\n{log.read_text()[-3000:] if log else ''}")
        time.sleep(0.2)


def stop_group(proc: subprocess.Popen, sig: int, grace_s: float) -> None:
    """Signal the process; after grace_s SIGKILL its whole process group (it was started in its own)."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


def serving_port(log: Path) -> int:
    """The router port `pdcluster serve --port 0` bound, from its "pdcluster serving on HOST:PORT" line."""
    import re
    return int(re.search(r"pdcluster serving on [\w.\-\[\]:]*:(\d+) ", log.read_text())[1])
