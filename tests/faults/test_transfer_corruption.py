"""A KV transfer corrupted or cut on the wire is detected (crc32 / truncation), the reservation is
fenced and freed, and recomputing gives exactly the undisturbed tokens. Real workers (no Ray), real
sockets: a loopback proxy between the prefill and decode workers flips a byte or drops the link."""
import re
import socket
import threading

import pytest

from pdcluster.kv_transfer import KVTransferError
from tests.unit.kv_workers import GREEDY, remote, tokens


class Proxy:
    """Forwards one side of TCP connections to `target`; after `after` bytes from the client it
    flips one byte (mode "corrupt") or closes both sockets (mode "drop")."""

    def __init__(self, target: str, mode: str, after: int = 200_000):
        self.host, port = target.rsplit(":", 1)
        self.target = (self.host, int(port))
        self.mode, self.after, self.seen, self.fired = mode, after, 0, False
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            s = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(c, s, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(s, c, False), daemon=True).start()

    def _pipe(self, src, dst, upstream):
        try:
            while data := src.recv(1 << 16):
                if upstream and not self.fired and self.seen + len(data) > self.after:
                    self.fired = True
                    if self.mode == "drop":
                        src.close(), dst.close()
                        return
                    i = self.after - self.seen
                    data = data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1:]
                self.seen += len(data) if upstream else 0
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for x in (src, dst):
                try:
                    x.close()
                except OSError:
                    pass


@pytest.fixture(scope="module")
def workers(tcp_pair):
    """The session's TCP worker pair (tests/faults/conftest.py; transfer_timeout_s=10)."""
    return tcp_pair


@pytest.mark.parametrize("mode", ["corrupt", "drop"])
def test_bad_transfer_detected_fenced_and_recomputed_exactly(workers, mode):
    p, d = workers
    ids = d.engine.tokenizer.encode("Describe a lighthouse on a stormy night. " * 20, add_special_tokens=False)
    free = d.engine.figures()["free_blocks"]
    r = d.reserve(f"bad-{mode}", ids, GREEDY)
    proxy = Proxy(r.kv_address, mode)
    dest = r.destination(proxy.address)
    with pytest.raises(KVTransferError) as e:
        p.prefill(f"bad-{mode}", ids, GREEDY, dest)
    assert proxy.fired
    # detected as what it is, not as a timeout (DEADLINE_EXCEEDED): the frame's checksum, or the connection's
    # end, which the sender sees as an EOF or, when the proxy closes with bytes unread, as a reset (RST)
    status, says = {"corrupt": ("DATA_LOSS", r"checksum mismatch"),
                    "drop": ("UNAVAILABLE", r"closed the connection|broke: (ConnectionReset|BrokenPipe)Error")}[mode]
    assert e.value.status == status and re.search(says, str(e.value)), e.value
    what = {"corrupt": "corrupted", "drop": "cut"}[mode]
    print(f"\n[faults] transfer {what} on the wire: detected ({e.value.status}: {e.value})")
    # nothing landed as complete; the router's abort (here by hand) fences the id and frees the blocks.
    # (A frame that fails its checksum may carry a corrupted request id, so the receiver does not fail
    # a reservation on its word; the prefill side's error is what triggers the abort.)
    assert d.connector.transfer(f"bad-{mode}").state.value != "complete"
    d.abort(f"bad-{mode}")
    assert d.engine.figures()["free_blocks"] == free and not d.receiver.pending()   # fenced and freed
    # recompute (another transfer, a clean link): exactly the undisturbed tokens
    got, _ = remote(p, d, f"again-{mode}", ids)
    ref = tokens(d.generate(f"local-{mode}", ids, GREEDY), timeout=60)
    assert got == ref and len(got) == 12


def test_unclaimed_reservation_expires_and_frees_its_blocks(workers):
    """A reservation that its router never starts nor aborts (the router lost track of it, or its
    abort could not reach a hung worker in time) is freed by the worker's own sweep."""
    import time
    _, d = workers
    idle = d.status().engine.free_blocks
    ttl, d.reservation_ttl_s = d.reservation_ttl_s, 0.3
    try:
        d.reserve("orphan", list(range(1, 80)), GREEDY)
        assert d.status().reserved == 1 and d.status().engine.free_blocks < idle
        deadline = time.monotonic() + 10
        while (st := d.status()).reserved or st.engine.free_blocks != idle:
            assert time.monotonic() < deadline, st
            time.sleep(0.1)
    finally:
        d.reservation_ttl_s = ttl
    with pytest.raises(KeyError, match="orphan"):
        d.start("orphan", 5)   # gone: a late start fails instead of decoding freed blocks
