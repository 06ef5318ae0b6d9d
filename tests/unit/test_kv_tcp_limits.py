"""The KV TCP server's bounds against hostile or broken peers (kv_transfer/tcp/server.py): accept errors, connection
caps, the handshake's deadline and AUTH size, a peer that stalls inside a message, request ids, failed streams
never ended, frame shapes."""
import errno
import socket
import threading
import time

import pytest
import torch

from pdcluster.kv_transfer import KVReceiver, KVTcpServer, wire
from pdcluster.kv_transfer.errors import MalformedFrame
from pdcluster.kv_transfer.tcp import protocol as proto
from pdcluster.kv_transfer.tcp import server as server_mod
from tests.unit.kv_blocks import BLOCK, SECRET, serving
from tests.unit.test_kv_tcp import RawClient, _frame_message

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def server():
    yield from serving(KVTcpServer(KVReceiver(), secret=SECRET))


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server ends the connection within `seconds` (EOF or reset; a CLOSE message first is fine)."""
    sock.settimeout(seconds)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if not sock.recv(1 << 16):
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False
    return False


def _connect_from(addr: str, server) -> socket.socket:
    """A connection to server from loopback address `addr` (another host, as the server sees it)."""
    host, port = server.address.rsplit(":", 1)
    s = socket.socket()
    s.bind((addr, 0))
    s.connect((host, int(port)))
    return s


def _wait(cond, seconds=5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_failed_accept_is_retried_not_the_end_of_the_listener():
    """accept() failing (out of file descriptors: a connection flood) used to end the acceptor for good, silently."""
    srv = KVTcpServer(KVReceiver(), secret=SECRET)
    real = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(real.getsockname())
    accepted = real.accept()
    calls = []

    class Listener:
        def accept(self):
            calls.append(1)
            if len(calls) == 1:
                raise OSError(errno.EMFILE, "Too many open files")
            if len(calls) == 2:
                return accepted
            srv._listener = None                                # stop_sync's doing, in effect
            raise OSError(errno.EBADF, "closed")
    srv._listener = Listener()
    try:
        srv._accept_loop(srv._listener)
        kind, hello = proto.recv_control(client)                # the retried accept's connection is served
        assert kind == proto.HELLO and len(calls) == 3
    finally:
        client.close()
        real.close()
        accepted[0].close()


def test_connections_past_the_caps_are_closed_at_once_and_nothing_is_allocated_before_welcome(server, monkeypatch):
    monkeypatch.setattr(server_mod, "MAX_HANDSHAKING", 3)
    host, port = server.address.rsplit(":", 1)
    idle = [socket.create_connection((host, int(port))) for _ in range(3)]     # authenticating, silently
    try:
        assert _wait(lambda: server._handshaking == 3)
        extra = socket.create_connection((host, int(port)))
        assert _closed_within(extra, 5.0)                       # refused: no thread, no buffer
        assert len(server._conns) == 3
        assert all(t.is_alive() for t in server._conns.values())
        for s in idle:
            s.close()
        assert _wait(lambda: server._handshaking == 0 and not server._conns)
        good = RawClient(server.address)                        # room again
        assert good.welcome[0] == proto.WELCOME
        good.close()
    finally:
        for s in idle:
            s.close()


def test_one_hosts_silent_sockets_do_not_lock_the_other_peers_out(server, monkeypatch):
    """32 silent unauthenticated sockets from anyone filled every handshake slot: no prefill worker could
    (re)connect while they were re-opened every 10 s. A host now holds at most MAX_HANDSHAKING_PER_HOST
    of them (another loopback address, 127.0.0.2, stands for another host), and a peer that fails its
    handshake gives its slot back before the drain that lets it read why."""
    monkeypatch.setattr(server_mod, "MAX_HANDSHAKING_PER_HOST", 2)
    host, port = server.address.rsplit(":", 1)
    idle = []
    try:
        for _ in range(3):
            idle.append(_connect_from("127.0.0.2", server))
        assert _wait(lambda: server._handshaking == 2)
        assert _closed_within(idle[2], 5.0)                     # the host's third: refused at once
        good = RawClient(server.address)                        # another host: served
        assert good.welcome[0] == proto.WELCOME
        good.close()
        wrong = socket.create_connection((host, int(port)))     # a wrong secret: CLOSE, slot back at once
        _, hello = proto.recv_control(wrong)
        proto.send_control(wrong, proto.AUTH, {"v": proto.VERSION, "mac": b"x" * 32})
        wrong.settimeout(5)
        assert proto.recv_control(wrong)[1]["status"] == "UNAUTHENTICATED"
        assert _wait(lambda: server._handshaking == 2, 0.5)     # only 127.0.0.2's two, while it drains
        wrong.close()
    finally:
        for s in idle:
            s.close()
    assert _wait(lambda: server._handshaking == 0 and not server._handshaking_from)


def test_one_hosts_failed_handshakes_do_not_fill_the_connections_with_their_drains(server, monkeypatch):
    """A failed handshake's socket stays open for its drain (so the peer reads why) and counted toward
    MAX_CONNECTIONS: one host failing handshakes on purpose filled all 256 within 1.5 s and every real
    peer was refused. A host's drains are capped now: past the cap a failed one is closed at once."""
    monkeypatch.setattr(server_mod, "MAX_DRAINING_PER_HOST", 2)
    monkeypatch.setattr(server_mod, "HANDSHAKE_DRAIN_S", 5.0)
    failed = []
    try:
        for _ in range(4):
            s = _connect_from("127.0.0.3", server)
            proto.recv_control(s)                               # HELLO
            proto.send_control(s, proto.AUTH, {"v": proto.VERSION, "mac": b"x" * 32})
            s.settimeout(5)
            assert proto.recv_control(s)[1]["status"] == "UNAUTHENTICATED"
            failed.append(s)
        assert _wait(lambda: server._draining.get("127.0.0.3") == 2)
        assert _closed_within(failed[2], 2.0) and _closed_within(failed[3], 2.0)    # no drain left for them
        assert _wait(lambda: len(server._conns) == 2)           # only the two draining ones are held
        good = RawClient(server.address)                        # another host: served
        assert good.welcome[0] == proto.WELCOME
        good.close()
    finally:
        for s in failed:
            s.close()
    assert _wait(lambda: not server._draining)


def test_the_handshake_has_one_deadline_and_a_small_auth(server, monkeypatch):
    """A byte at a time, each inside the old per-read timeout, used to hold an unauthenticated connection forever;
    and AUTH could declare 64 KiB."""
    monkeypatch.setattr(server_mod, "HANDSHAKE_S", 1.0)
    host, port = server.address.rsplit(":", 1)
    slow = socket.create_connection((host, int(port)))
    proto.recv_control(slow)                                    # HELLO
    slow.sendall(proto.ENVELOPE.pack(proto.AUTH, 200))
    t0 = time.monotonic()
    while server._handshaking and time.monotonic() - t0 < 4.0:      # a byte every 0.3 s: each read in time
        try:
            slow.send(b"\x00")
        except OSError:
            break
        time.sleep(0.3)
    assert _wait(lambda: server._handshaking == 0, 1.0) and time.monotonic() - t0 < 3.0
    slow.close()
    big = socket.create_connection((host, int(port)))
    proto.recv_control(big)
    big.sendall(proto.ENVELOPE.pack(proto.AUTH, 60_000))
    big.settimeout(5)
    kind, body = proto.recv_control(big)
    assert kind == proto.CLOSE and body["status"] == "INVALID_ARGUMENT"
    big.close()


def test_a_peer_stalled_inside_a_frame_loses_its_connection_and_its_request(server, monkeypatch):
    monkeypatch.setattr(proto, "STALL_TIMEOUT_S", 0.5)
    pending = server.receiver.expect("req", [0, 1], 1, lambda *a: None)
    client = RawClient(server.address)
    ones = torch.ones(2, *BLOCK)
    message = _frame_message("req", 0, [0, 1], ones, ones)
    client.sock.sendall(message[:len(message) - 100])           # all but the payload's last 100 bytes
    assert _closed_within(client.sock, 5.0)
    assert _wait(lambda: pending.state.value != "pending") and not server._conns
    client.close()


def test_long_request_ids_and_failed_streams_never_ended_close_the_connection(server, monkeypatch):
    ones = torch.ones(1, *BLOCK)
    client = RawClient(server.address)
    client.sock.sendall(_frame_message("x" * (proto.MAX_RID_CHARS + 1), 0, [0], ones, ones))
    kind, body = client.reply()
    assert kind == proto.CLOSE and "request id" in body["message"]
    client.close()
    monkeypatch.setattr(server_mod, "MAX_REJECTED", 3)
    client = RawClient(server.address)
    for i in range(3):                                          # unknown requests: ERROR each, remembered
        client.sock.sendall(_frame_message(f"r{i}", 0, [0], ones, ones))
        assert client.reply()[0] == proto.ERROR
    client.sock.sendall(_frame_message("r3", 0, [0], ones, ones))
    kind, body = client.reply()
    assert kind == proto.CLOSE and "never ended" in body["message"]
    client.close()


def test_frame_shapes_are_bounded_before_anything_is_made_of_them():
    for shape in ([1, 0, 2**62, 2**62], [1] * 9, [1, -1]):
        with pytest.raises(MalformedFrame, match="shape"):
            wire._parse_header({"v": wire.VERSION, "rid": "r", "layer": 0, "blocks": [1], "shape": shape,
                                "dtype": "float32", "nbytes": 0, "crc": 0, "chunk": 0, "chunks": 1})
