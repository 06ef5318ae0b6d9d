"""The TCP KV sender against peers that misbehave after the handshake (kv_transfer/tcp/connection.py):
one that stops reading fails the transfer within the stall bound instead of wedging the writer
thread, and one that never acknowledges END fails finish() at its timeout and leaves nothing
registered on the connection. The peers are raw sockets speaking the handshake only."""
import os
import socket
import threading
import time

import pytest
import torch

from pdcluster.kv_transfer.errors import KVTransferError
from pdcluster.kv_transfer.tcp import protocol as proto
from pdcluster.kv_transfer.tcp.transport import TcpKVTransport

pytestmark = pytest.mark.timeout(60)


def peer(read: bool):
    """A KV 'server' that answers the handshake, then reads everything (read) or nothing, and never answers."""
    ls = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        s, _ = ls.accept()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        proto.send_control(s, proto.HELLO, {"proto": proto.PROTO, "v": proto.VERSION, "nonce": os.urandom(32)})
        proto.recv_control(s, expect=(proto.AUTH,))
        proto.send_control(s, proto.WELCOME, {})
        s.settimeout(0.1)
        while not stop.is_set():
            try:
                if read and not s.recv(1 << 20):
                    break
            except (TimeoutError, OSError):
                pass
            if not read:
                time.sleep(0.05)
        s.close()
    threading.Thread(target=serve, daemon=True).start()
    return f"127.0.0.1:{ls.getsockname()[1]}", stop, ls


def test_a_peer_that_stops_reading_fails_the_transfer_and_the_connection_is_replaced(monkeypatch):
    monkeypatch.setattr(proto, "STALL_TIMEOUT_S", 0.5)
    addr, stop, ls = peer(read=False)
    t = TcpKVTransport()
    try:
        k = torch.randn(64, 16, 3, 64)                  # 1.5 MiB a layer: far past the socket buffers
        a = t.open(addr, "A", list(range(64)))
        for layer in range(8):
            a.send_layer(layer, k, k)
        t0 = time.monotonic()
        with pytest.raises(KVTransferError) as e:
            a.finish(timeout=20)
        assert time.monotonic() - t0 < 10 and e.value.status == "UNAVAILABLE", e.value
        conn = t._conns.get(addr)
        assert conn is None or conn.dead                # the next transfer opens a new connection
        b = t.open(addr, "B", [0])
        assert b._conn is not conn
        b.abort()
    finally:
        stop.set()
        t.close()
        ls.close()


def test_an_end_never_acknowledged_times_out_and_leaves_nothing_in_flight():
    addr, stop, ls = peer(read=True)
    t = TcpKVTransport()
    try:
        a = t.open(addr, "A", [0, 1])
        a.send_layer(0, torch.ones(2, 16, 3, 64), torch.ones(2, 16, 3, 64))
        with pytest.raises(KVTransferError) as e:
            a.finish(timeout=1.0)
        assert e.value.status == "DEADLINE_EXCEEDED" and "not acknowledged within 1 s" in str(e.value)
        conn = t._conns[addr]
        deadline = time.monotonic() + 5
        while "A" in conn._inflight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "A" not in conn._inflight and not conn.dead
    finally:
        stop.set()
        t.close()
        ls.close()


def test_a_piece_that_cannot_be_encoded_fails_its_own_transfer_not_the_connection_s_others():
    """The connection's one writer thread caught only OSError: a piece that failed to encode (here int8 on a
    2-D K, which send_layer accepts) killed it, and every transfer on the connection failed CANCELLED."""
    from pdcluster.kv_transfer import KVReceiver, KVTcpServer, cache_writer
    kc, vc = [torch.zeros(8, 16, 2, 8) for _ in range(2)], [torch.zeros(8, 16, 2, 8) for _ in range(2)]
    rx = KVReceiver()
    srv = KVTcpServer(rx, secret="s")
    srv.start_sync()
    tr = TcpKVTransport(secret="s")
    try:
        good = rx.expect("good", [0, 1], 2, cache_writer(kc, vc))
        bad = rx.expect("bad", [2], 2, cache_writer(kc, vc))
        sg = tr.open(srv.address, "good", [0, 1])
        conn = tr._conns[srv.address]                   # the one connection all three share
        sg.send_layer(0, torch.ones(2, 16, 2, 8), torch.ones(2, 16, 2, 8))
        sb = tr.open(srv.address, "bad", [2], codec="int8")
        sb.send_layer(0, torch.ones(1, 512), torch.ones(1, 512))
        with pytest.raises(KVTransferError) as e:
            sb.finish(timeout=10)
        assert e.value.status == "INTERNAL" and "could not be sent" in str(e.value)
        sg.send_layer(1, torch.ones(2, 16, 2, 8), torch.ones(2, 16, 2, 8))
        assert sg.finish(timeout=10).bytes > 0 and good.state.name == "COMPLETE"
        assert torch.equal(kc[1][:2], torch.ones(2, 16, 2, 8))
        assert bad.state.name == "PENDING"      # nothing reached it: the router's abort frees it, as for any send
        again = rx.expect("again", [3], 2, cache_writer(kc, vc))       # that failed before its first frame
        s3 = tr.open(srv.address, "again", [3])
        for layer in range(2):
            s3.send_layer(layer, torch.full((1, 16, 2, 8), 2.0), torch.full((1, 16, 2, 8), 2.0))
        assert s3.finish(timeout=10).bytes > 0 and again.state.name == "COMPLETE" and tr._conns[srv.address] is conn
        assert not conn.dead
    finally:
        tr.close()
        srv.stop_sync()
