"""A hung worker (alive, not answering: SIGSTOP) is detected by the health poll within a bounded time
and its streams migrate token-exact; a crashed worker is restarted by Ray (max_restarts) and
re-registers with the router, which then places requests on it again; a client that stops reading
is cut off after the slow-reader bound, over gRPC and over HTTP. After each fault every pool's
free-block count returns to its idle value."""
import asyncio
import json
import logging
import os
import signal
import socket
import time

import grpc
import pytest
import ray

from pdcluster.router.proto import generation_pb2 as pb
from pdcluster.router.proto import generation_pb2_grpc as pbg
from tests.faults.clusters import ONE_PREFILL_TWO_DECODE, greedy_reference

N = 16
MAX_NEW = 24
PROMPTS = [f"Request {i}: write one sentence about the sea and the wind." for i in range(N)]
HEALTH_S = ONE_PREFILL_TWO_DECODE["health_timeout_s"]          # status poll bound in this cluster
GAP_S = ONE_PREFILL_TWO_DECODE["worker_timeout_s"]             # token-stream silence bound in this cluster
SLOW_READER_S = ONE_PREFILL_TWO_DECODE["slow_reader_timeout_s"]  # a write stalled this long cancels the request
CHOICES = 8         # of the HTTP slow reader: 8 x 26 KV blocks if all ran to the end (the decode pools: 272)


@pytest.fixture(scope="module")
def c(one_prefill_two_decode):
    """The session's 1 prefill + 2 decode cluster (tests/faults/conftest.py), whole: these faults
    heal (SIGCONT, Ray's restart); test_worker_faults.py, which kills workers for good, spends it."""
    return one_prefill_two_decode.get()


@pytest.fixture(scope="module")
def reference():
    return greedy_reference(PROMPTS, MAX_NEW)


async def stream_all(addr, ids, on_tokens=None):
    """Every prompt at once; returns [(tokens, finish_reason, decode worker of the placement)]."""
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = pbg.GenerationStub(ch)

        async def one(p):
            toks, reason, where = [], None, None
            async for m in stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=p),
                                                            sampling=pb.SamplingParams(max_tokens=MAX_NEW))):
                toks += m.token_ids
                reason = m.finish_reason
                where = where or (m.placement.decode_worker if m.HasField("placement") else None)
                if on_tokens:
                    await on_tokens(len(toks))
            return toks, reason, where
        return await asyncio.gather(*(one(p) for p in ids))


async def wait_until(pred, timeout: float, step: float = 0.05) -> float:
    """Seconds until pred() held; fails the test past timeout."""
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout, f"condition not met within {timeout}s"
        await asyncio.sleep(step)
    return time.monotonic() - t0


def assert_idle(c, timeout: float = 30.0):
    """Every worker's pool back to its idle value: all blocks free, nothing running or reserved."""
    async def idle():
        t0 = time.monotonic()
        while True:
            st = await c.worker_status()
            if all(s.engine.free_blocks == s.engine.num_blocks and s.running == 0 and s.reserved == 0
                   for s in st.values()):
                return
            assert time.monotonic() - t0 < timeout, f"blocks not back to idle: {st}"
            await asyncio.sleep(0.2)
    c.run(idle())


def test_hung_decode_worker_is_detected_and_its_streams_migrate(c, reference):
    ids, ref = reference
    load = c.router.workers.loads["decode-0"]
    pid = c.run(c.actors["decode-0"].status.remote()).pid
    fired = {}

    async def on_tokens(n):
        if "t" not in fired and n >= 4:
            fired["t"] = time.monotonic()
            os.kill(pid, signal.SIGSTOP)      # alive, holding its sockets, answering nothing

    async def run():
        async def detect():
            await wait_until(lambda: "t" in fired, 60)
            await wait_until(lambda: not load.healthy, 10 * HEALTH_S)
            fired["detected_s"] = time.monotonic() - fired["t"]
        return await asyncio.gather(stream_all(c.address, ids, on_tokens), detect())
    try:
        t0 = time.monotonic()
        res, _ = c.run(run())
        took = time.monotonic() - t0
    finally:
        os.kill(pid, signal.SIGCONT)
    ok = sum(toks == r for (toks, _, _), r in zip(res, ref))
    print(f"\n[faults] hung decode worker (SIGSTOP): detected unhealthy in {fired['detected_s']:.2f}s "
          f"(poll bound {HEALTH_S:g}s + {c.router.cfg.status_interval_s:g}s interval); {ok}/{N} streams complete "
          f"and token-exact ({took:.1f}s, stream-gap bound {GAP_S:g}s)")
    assert ok == N
    assert fired["detected_s"] <= HEALTH_S + c.router.cfg.status_interval_s + 1.0
    c.run(wait_until(lambda: load.healthy, 10))    # resumed: it answers the poll again
    assert_idle(c)                                 # the background aborts freed what it held


def test_crashed_worker_is_restarted_and_re_registers(c, reference):
    ids, ref = reference
    load = c.router.workers.loads["decode-0"]
    before = load.incarnation
    fired = {}

    async def on_tokens(n):
        if not fired and n >= 4:
            fired["t"] = time.monotonic()
            ray.kill(c.actors["decode-0"], no_restart=False)    # crash; Ray restarts it (max_restarts=1)

    res = c.run(stream_all(c.address, ids, on_tokens))
    ok = sum(toks == r for (toks, _, _), r in zip(res, ref))
    back = c.run(wait_until(lambda: load.healthy and load.incarnation not in (None, before), 120, 0.2))
    restarts = c.router.metrics.restarts.labels("decode-0")._value.get()
    # the restarted worker takes traffic again: enough streams that least-loaded uses both workers
    res2 = c.run(stream_all(c.address, ids))
    ok2 = sum(toks == r for (toks, _, _), r in zip(res2, ref))
    on_restarted = sum(where == "decode-0" for _, _, where in res2)
    print(f"\n[faults] decode worker crashed mid-stream: {ok}/{N} streams complete and token-exact; restarted and "
          f"re-registered {back:.1f}s later; afterwards {ok2}/{N} exact, {on_restarted} placed on the restarted worker")
    assert ok == N and ok2 == N
    assert restarts == 1 and on_restarted > 0
    assert_idle(c)


def test_slow_reader_is_cut_off_and_frees_its_blocks(c):
    """A client with a tiny HTTP/2 window that never reads: the router's writes stall, and after the
    slow-reader bound the request is cancelled (RESOURCE_EXHAUSTED) and its KV freed; meanwhile a
    normal client is served."""
    addr = c.address
    tiny = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 256)]

    async def run():
        async with grpc.aio.insecure_channel(addr, options=tiny) as slow_ch, grpc.aio.insecure_channel(addr) as ch:
            req = pb.GenerateRequest(text="Tell me a long story about a lighthouse keeper.", request_id="slow-reader",
                                     sampling=pb.SamplingParams(max_tokens=400, ignore_eos=True))
            slow = pbg.GenerationStub(slow_ch).Generate(req)
            await slow.wait_for_connection()
            t0 = time.monotonic()
            await wait_until(lambda: len(c.router.in_flight) == 1, 30)
            normal = [m async for m in pbg.GenerationStub(ch).Generate(pb.GenerateRequest(
                text="Hi", sampling=pb.SamplingParams(max_tokens=4)))]
            await wait_until(lambda: not c.router.in_flight, 60)   # the stalled request is gone
            freed_s = time.monotonic() - t0
            got = 0
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for m in slow:
                    got += len(m.token_ids)
            # its request id is free again once the connection is reset (the handler held it 30 s more)
            retry, deadline = None, time.monotonic() + 2 * SLOW_READER_S + 5
            while retry is None:
                try:
                    retry = [m async for m in pbg.GenerationStub(ch).Generate(pb.GenerateRequest(
                        text="Hi", request_id="slow-reader", sampling=pb.SamplingParams(max_tokens=2)))]
                except grpc.aio.AioRpcError as again:
                    assert again.code() == grpc.StatusCode.ALREADY_EXISTS and time.monotonic() < deadline
                    await asyncio.sleep(0.5)
            return normal, freed_s, got, e.value
    normal, freed_s, got, err = c.run(run())
    print(f"\n[faults] slow reader (window 256 B, never reads, 400 tokens asked): cancelled after {freed_s:.1f}s "
          f"with {err.code().name} ({got} tokens were buffered for it); a normal client was served meanwhile")
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "stopped reading" in err.details()
    assert got < 400 and normal[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
    assert_idle(c)


def h2_reader_without_window(addr: str, body: bytes, limit_s: float) -> tuple[list, float]:
    """A raw HTTP/2 client (h2) that grants INITIAL_WINDOW_SIZE 0 and never reads a byte of data.
    Returns what ended its stream ("closed", "reset", "rst" or a grpc-status) and when."""
    import socket

    import h2.config
    import h2.connection
    import h2.events
    import h2.settings
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":authority", addr),
                            (":path", "/pdcluster.v1.Generation/Generate"), ("content-type", "application/grpc"),
                            ("te", "trailers")])
    conn.send_data(sid, b"\x00" + len(body).to_bytes(4, "big") + body, end_stream=True)
    s.sendall(conn.data_to_send())
    s.settimeout(0.25)
    ended, t0 = [], time.monotonic()
    try:
        while not ended and time.monotonic() - t0 < limit_s:
            try:
                data = s.recv(1 << 16)
            except socket.timeout:
                continue
            except ConnectionResetError:
                ended.append("reset")
                break
            if not data:
                ended.append("closed")
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.StreamReset):
                    ended.append("rst")
                elif isinstance(ev, h2.events.TrailersReceived):
                    ended.append(dict(ev.headers).get(b"grpc-status"))
            s.sendall(conn.data_to_send())       # settings acks and pings; never a WINDOW_UPDATE
    finally:
        s.close()
    return ended, time.monotonic() - t0


def test_reader_granting_no_window_gets_its_stream_ended_without_a_traceback(c, caplog):
    """No message, so no status either, can reach a client whose window stays 0. After the slow-reader
    bound the request is cancelled (KV freed); after a second bound the router resets the client's
    connection. The log holds warnings, no traceback."""
    caplog.set_level(logging.WARNING)
    bound = SLOW_READER_S
    body = pb.GenerateRequest(text="Tell me a long story about a lighthouse keeper.", request_id="no-window",
                              sampling=pb.SamplingParams(max_tokens=400, ignore_eos=True)).SerializeToString()
    ended, took = c.run(asyncio.to_thread(h2_reader_without_window, c.address, body, 60.0))

    async def retry():      # its request id is free once the connection is reset (the handler held it 30 s more)
        async with grpc.aio.insecure_channel(c.address) as ch:
            deadline = time.monotonic() + 5
            while True:
                try:
                    return [m async for m in pbg.GenerationStub(ch).Generate(pb.GenerateRequest(
                        text="Hi", request_id="no-window", sampling=pb.SamplingParams(max_tokens=2)))]
                except grpc.aio.AioRpcError as again:
                    assert again.code() == grpc.StatusCode.ALREADY_EXISTS and time.monotonic() < deadline
                    await asyncio.sleep(0.5)
    assert c.run(retry())[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
    print(f"\n[faults] reader with HTTP/2 window 0: stream ended by {ended} after {took:.1f}s "
          f"(slow-reader bound {bound:g}s)")
    assert ended and ended[0] in ("closed", "reset", "rst", b"8"), ended
    assert took < 2 * bound + 10
    assert_idle(c)
    bad = [r for r in caplog.records if r.exc_info or "ExecuteBatchError" in r.getMessage()]
    assert not bad, [r.getMessage() for r in bad]


def test_http_slow_reader_is_cut_off_and_frees_its_blocks(c, caplog):
    """The HTTP twin of the gRPC slow reader: a raw socket client with a 2 KB receive buffer sends a
    streamed completion and never reads. uvicorn's writes stall; after the slow-reader bound the
    request is cancelled (its KV freed) and the client's connection is reset; a normal client is
    served meanwhile. Eight choices with 20 logprobs each fill the ~0.2 MB of socket and transport
    buffers before a write can stall (one choice took ~50 s of decoding to get there, three ~30 s)."""
    import httpx
    caplog.set_level(logging.WARNING, logger="pdcluster.router.openai.sse")
    body = json.dumps({"model": c.http.api.model, "prompt": "Tell me a long story about a lighthouse keeper.",
                       "max_tokens": 400, "n": CHOICES, "ignore_eos": True, "stream": True, "logprobs": 20}).encode()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)           # before connect: the window it offers
    s.connect(("127.0.0.1", c.http.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    async def run():
        t0 = time.monotonic()
        await wait_until(lambda: len(c.router.in_flight) == CHOICES, 30)      # one per choice
        async with httpx.AsyncClient(timeout=60) as http:
            normal = await http.post(f"http://127.0.0.1:{c.http.port}/v1/completions",
                                     json={"model": c.http.api.model, "prompt": "Hi", "max_tokens": 4})
        await wait_until(lambda: not c.router.in_flight, 120)           # the stalled request is gone
        return normal, time.monotonic() - t0
    try:
        normal, freed_s = c.run(run())
        ended, got = c.run(asyncio.to_thread(socket_end, s, 30))     # the router's loop runs meanwhile
    finally:
        s.close()
    cut = [r for r in caplog.records if "stopped reading" in r.getMessage()]
    print(f"\n[faults] HTTP slow reader (2 KB receive buffer, never reads, {CHOICES} x 400 tokens asked): cancelled after "
          f"{freed_s:.1f}s (bound {SLOW_READER_S:g}s), {got} bytes were buffered for it, its connection {ended}; "
          f"a normal client was served meanwhile")
    assert normal.status_code == 200 and normal.json()["usage"]["completion_tokens"] >= 1
    assert cut and "connection reset" in cut[0].getMessage(), [r.getMessage() for r in caplog.records]
    # cut short: what the server's buffers held (~0.2 MB), far from 8 x 400 tokens' ~3 MB of chunks
    assert ended in ("closed", "reset") and got < 400_000
    assert_idle(c)


def socket_end(s: socket.socket, limit_s: float) -> tuple[str, int]:
    """Read what reached the client until the server ends the connection: ("closed" | "reset" |
    "open", bytes read)."""
    s.settimeout(0.5)
    got, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < limit_s:
        try:
            data = s.recv(1 << 16)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return "reset", got
        if not data:
            return "closed", got
        got += len(data)
    return "open", got
