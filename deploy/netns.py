"""A real shaped prefill->decode link on one machine: two network namespaces joined by a veth pair,
with a tbf (token bucket filter) qdisc on the prefill end, so KV bytes cross a kernel-shaped link.

    netns <base>p                                   netns <base>d
    PREFILL_IP/30 on "kvp"  <=== veth pair ===>  DECODE_IP/30 on "kvd"
    egress of kvp: tbf at `rate` (prefill -> decode: the KV bytes)
    egress of kvd: unshaped (ACKs, replies, probe answers)

Workers join it per socket, not per process (kv_transfer/netns.py): the decode worker's KV TCP
listener is created in netns <base>d on DECODE_IP, the prefill worker's KV connection in <base>p.
Everything lives only inside the two namespaces (the veth ends are created there, the addresses
are private); `shaped_link()` removes both namespaces (and with them the veth pair and the qdisc)
when its body ends, raises or is interrupted. Names carry the pid (<base> = "pdkv<pid>x<n>"), so
concurrent processes never collide, and namespaces left by a dead process are removed on the next
create. Needs root, `ip` and `tc` (iproute2); `available()` says whether this machine allows it.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Iterator

PREFILL_IP, DECODE_IP, PREFIX_LEN = "10.231.0.1", "10.231.0.2", 30  # private, visible only inside the pair
LATENCY_MS = 50.0        # tbf queue bound: a packet waits at most this long (queue = rate * latency + burst)
PAYLOAD_FRACTION = 1448 / 1514  # TCP payload per byte tbf counts: MSS 1448 (MTU 1500, timestamps) in a
                                #   1514-byte frame; measured goodput 0.954-0.960 of the rate at 5-12 MB/s
MIN_BURST_BYTES = 64 << 10  # tbf bucket: >= one 64 KiB GSO packet (else tbf must split it), and >= 1 ms of
                            #   traffic at high rates; at 7 MB/s it lets ~9 ms through at veth speed
_NAME = re.compile(r"^pdkv(\d+)x\d+[pd]$")
_seq = itertools.count()


@dataclass(frozen=True)
class ShapedLink:
    prefill_ns: str          # `ip netns` names
    decode_ns: str
    prefill_ip: str          # kvp's address in prefill_ns (the KV connection's source)
    decode_ip: str           # kvd's address in decode_ns (the decode workers' KV listeners)
    rate_bytes_per_s: float  # tbf rate on prefill -> decode, in frame bytes (headers included)
    burst_bytes: int
    latency_ms: float

    @property
    def goodput_bytes_per_s(self) -> float:
        """What one TCP stream moves across it (payload bytes/s)."""
        return self.rate_bytes_per_s * PAYLOAD_FRACTION

    def describe(self) -> str:
        return (f"veth+tbf at {self.goodput_bytes_per_s / 1e6:.1f} MB/s of TCP payload "
                f"(tbf rate {self.rate_bytes_per_s * 8e-6:.1f} Mbit/s, "
                f"burst {self.burst_bytes >> 10} KiB, latency {self.latency_ms:g} ms) "
                f"in netns {self.prefill_ns} -> {self.decode_ns}")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"`{' '.join(args)}` failed ({r.returncode}): {r.stderr.strip()}")
    return r


def line_rate(goodput_bytes_per_s: float) -> float:
    """The tbf rate at which one TCP stream's payload moves goodput_bytes_per_s."""
    return goodput_bytes_per_s / PAYLOAD_FRACTION


def plan(rate_bytes_per_s: float, latency_ms: float = LATENCY_MS, burst_bytes: int | None = None) -> ShapedLink:
    """A fresh link description (nothing created yet): unique names, the tbf settings."""
    if not rate_bytes_per_s > 0:
        raise ValueError(f"rate must be > 0 bytes/s, got {rate_bytes_per_s}")
    base = f"pdkv{os.getpid()}x{next(_seq)}"
    burst = burst_bytes if burst_bytes is not None else max(MIN_BURST_BYTES, int(rate_bytes_per_s / 1000))
    return ShapedLink(prefill_ns=base + "p", decode_ns=base + "d", prefill_ip=PREFILL_IP, decode_ip=DECODE_IP,
                      rate_bytes_per_s=float(rate_bytes_per_s), burst_bytes=burst, latency_ms=latency_ms)


def create(link: ShapedLink) -> None:
    """Make the namespaces, the veth pair inside them, the addresses and the qdisc. On failure what
    was made stays: call remove(link) (shaped_link() does)."""
    remove_stale()
    p, d = link.prefill_ns, link.decode_ns
    _ip("ip", "netns", "add", p)
    _ip("ip", "netns", "add", d)
    _ip("ip", "link", "add", "kvp", "netns", p, "type", "veth", "peer", "name", "kvd", "netns", d)
    _ip("ip", "-n", p, "addr", "add", f"{link.prefill_ip}/{PREFIX_LEN}", "dev", "kvp")
    _ip("ip", "-n", d, "addr", "add", f"{link.decode_ip}/{PREFIX_LEN}", "dev", "kvd")
    for ns, dev in ((p, "kvp"), (d, "kvd")):
        _ip("ip", "-n", ns, "link", "set", dev, "up")
    _ip("tc", "-n", p, "qdisc", "add", "dev", "kvp", "root", "tbf", "rate", f"{int(link.rate_bytes_per_s * 8)}bit",
        "burst", str(link.burst_bytes), "latency", f"{link.latency_ms:g}ms")


def remove(link: ShapedLink) -> None:
    """Delete both namespaces (the veth pair and qdisc go with them). Idempotent."""
    for ns in (link.prefill_ns, link.decode_ns):
        _delete(ns)


def _delete(ns: str) -> None:
    if os.path.exists(os.path.join("/var/run/netns", ns)):
        _ip("ip", "netns", "del", ns)


def names() -> list[str]:
    """`ip netns list` names."""
    return [line.split()[0] for line in _ip("ip", "netns", "list").stdout.splitlines() if line.strip()]


def remove_stale() -> None:
    """Delete this module's namespaces whose creating process is gone."""
    for ns in names():
        m = _NAME.match(ns)
        if m and not _alive(int(m.group(1))):
            _ip("ip", "netns", "del", ns, check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def shaped_link(rate_bytes_per_s: float, latency_ms: float = LATENCY_MS,
                burst_bytes: int | None = None) -> Iterator[ShapedLink]:
    """Create a link shaped to rate_bytes_per_s for the body; removed after it, however it ends."""
    link = plan(rate_bytes_per_s, latency_ms, burst_bytes)
    try:
        create(link)
        yield link
    finally:
        remove(link)


_available: tuple[bool, str] | None = None


def available() -> tuple[bool, str]:
    """(True, "") if this machine can make a shaped link (tried once per process: a 1 MB/s link is
    created, a socket opened in it, and removed), else (False, why)."""
    global _available
    if _available is None:
        _available = _check()
    return _available


def _check() -> tuple[bool, str]:
    if not os.path.isdir("/proc/self/ns") or os.uname().sysname != "Linux":
        return False, "network namespaces need Linux"
    if os.geteuid() != 0:
        return False, "network namespaces and tc need root (euid 0)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"`{tool}` (iproute2) is not installed"
    try:
        from pdcluster.kv_transfer.netns import run_in
        with shaped_link(1e6) as link:
            run_in(link.prefill_ns, lambda: None)
    except Exception as e:
        return False, f"creating a shaped link failed: {e}"
    return True, ""
