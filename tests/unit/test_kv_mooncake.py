"""The mooncake transport (pull over the Mooncake Transfer Engine, protocol "tcp" on loopback):
exact tokens against the TCP transport with real workers, fencing on abort, the secret, and the
staging arena's slots all free afterwards. Skipped where `mooncake.engine` cannot be imported."""
import ctypes
import subprocess
import sys
import threading
import time
import types

import pytest
import torch

from pdcluster.kv_transfer import KVReceiver, KVTransferError, TransferState, cache_writer
from pdcluster.kv_transfer.mooncake import engine as mooncake_engine
from pdcluster.kv_transfer.mooncake.arena import ArenaFull, SlotPool
from tests.unit.kv_workers import pair, remote

UNAVAILABLE = mooncake_engine.available()
needs_mooncake = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"{UNAVAILABLE}")
SECRET = "mooncake-test-secret"
LAYERS, BLOCKS, BLOCK = 4, 32, (16, 3, 64)  # block shape: [block_size, kv_heads, head_dim]


def wait_until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# no mooncake needed
def test_unavailable_is_a_clear_error(monkeypatch):
    """Choosing the transport where `mooncake.engine` cannot be imported: the real import fails (a
    None in sys.modules stops it, on hosts that have the package too) and the transport's
    constructor says why and how to fix it."""
    from pdcluster.kv_transfer.registry import sender_class
    monkeypatch.setitem(sys.modules, "mooncake.engine", None)
    with pytest.raises(mooncake_engine.MooncakeUnavailable) as e:
        sender_class("mooncake")(secret=SECRET)
    assert "mooncake transport unavailable: ModuleNotFoundError" in str(e.value)
    assert mooncake_engine.HINT in str(e.value)
    assert mooncake_engine.available() == str(e.value)


def test_other_transports_do_not_import_mooncake():
    code = ("import sys, pdcluster.kv_transfer, pdcluster.prefill_worker.worker, pdcluster.decode_worker.worker; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mooncake'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_slot_pool_back_pressure_and_stop():
    pool = SlotPool(2)
    a, b = pool.acquire(1.0), pool.acquire(1.0)
    assert {a, b} == {0, 1} and pool.num_free == 0
    with pytest.raises(ArenaFull):
        pool.acquire(0.05)
    threading.Timer(0.05, pool.release, args=(a,)).start()
    assert pool.acquire(2.0) == a  # a waiter gets the slot released meanwhile
    stop = threading.Event()
    threading.Timer(0.05, lambda: (stop.set(), pool.wake())).start()
    assert pool.acquire(2.0, stop.is_set) is None
    with pytest.raises(ValueError):
        pool.release(5)


def test_host_is_the_env_override_then_the_given_host_then_loopback(monkeypatch):
    from pdcluster.kv_transfer.mooncake.transport import HOST_ENV, mooncake_host
    monkeypatch.delenv(HOST_ENV, raising=False)
    assert mooncake_host() == "127.0.0.1" and mooncake_host("10.0.0.5") == "10.0.0.5"
    monkeypatch.setenv(HOST_ENV, "192.168.7.7")
    assert mooncake_host() == mooncake_host("10.0.0.5") == "192.168.7.7"


def test_prefill_worker_gives_mooncake_its_kv_host(monkeypatch):
    """The worker hands kv_host to the Mooncake transport as `host` (a stand-in transport here, so no
    mooncake package is needed); the push transports listen nowhere and get none."""
    from pdcluster.engine.llm_engine import LLMEngine, build_config
    from pdcluster.prefill_worker import worker as pw
    seen = []

    class StandIn:
        def __init__(self, **kw):
            seen.append(kw)

        def close(self):
            pass

    real = pw.sender_class
    monkeypatch.setattr(pw, "sender_class", lambda name: StandIn if name == "mooncake" else real(name))
    engine = LLMEngine(build_config(kv_cache_memory=8 * 2**20, num_threads=1))
    for kv_host in ("10.1.2.3", None):
        pw.PrefillWorker("p", engine, transport="mooncake", kv_host=kv_host).close()
    assert seen[0]["host"] == "10.1.2.3" and "host" not in seen[1]    # None: the transport's default
    tcp = pw.PrefillWorker("p", engine, transport="tcp", kv_host="10.1.2.3")
    tcp.close()


def test_prefill_actor_binds_mooncake_to_its_node_ip_on_a_multi_node_cluster(monkeypatch):
    """bind_node_ip (deploy/launch.py: a `--address` cluster) -> kv_host = the node's IP, from Ray in
    the actor wrapper; without it the worker gets no kv_host (loopback)."""
    import ray

    import pdcluster.engine.llm_engine as llm_engine_mod
    import pdcluster.prefill_worker.worker as prefill_worker_mod
    from pdcluster.prefill_worker.actor import PrefillActor
    made = []
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "10.9.8.7")
    monkeypatch.setattr(llm_engine_mod, "build_config", lambda **kw: kw)
    monkeypatch.setattr(llm_engine_mod, "LLMEngine", lambda cfg: types.SimpleNamespace(warmup=lambda: 0.0))
    monkeypatch.setattr(prefill_worker_mod, "PrefillWorker", lambda wid, eng, **kw: made.append(kw))
    for bind in (True, False):
        actor = PrefillActor("p", {}, torch.get_num_threads(), dict(transport="mooncake", bind_node_ip=bind))
        actor.rpc_threads.shutdown()
    assert made == [dict(transport="mooncake", kv_host="10.9.8.7"), dict(transport="mooncake")]


# transport level: a real MooncakeKVServer over a KVReceiver and plain cache tensors
@pytest.fixture(scope="module")
def link():
    if UNAVAILABLE is not None:
        pytest.skip(UNAVAILABLE)
    from pdcluster.kv_transfer.mooncake.server import MooncakeKVServer
    from pdcluster.kv_transfer.mooncake.transport import MooncakeKVTransport
    kc = [torch.zeros(BLOCKS, *BLOCK) for _ in range(LAYERS)]
    vc = [torch.zeros(BLOCKS, *BLOCK) for _ in range(LAYERS)]
    receiver = KVReceiver()
    server = MooncakeKVServer(receiver, kc, vc, secret=SECRET)
    server.start_sync()
    block_bytes = 2 * BLOCK[0] * BLOCK[1] * BLOCK[2] * 4
    transport = MooncakeKVTransport(secret=SECRET, arena_bytes=8 * block_bytes, slot_bytes=2 * block_bytes,
                                    stage_timeout_s=5.0)
    yield receiver, server, transport, kc, vc
    transport.close()
    server.stop_sync()


def layer_kv(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *BLOCK, generator=g), torch.randn(n, *BLOCK, generator=g)


@needs_mooncake
def test_transfer_lands_exactly_and_frees_every_slot(link):
    receiver, server, transport, kc, vc = link
    dst = [1, 2, 3, 7, 8, 20, 21]  # 7 blocks in slots of 2: 4 chunks per layer, arena of 4 slots
    pending = receiver.expect("exact", dst, LAYERS, cache_writer(kc, vc))
    sender = transport.open(server.address, "exact", dst)
    sent = [layer_kv(len(dst), l) for l in range(LAYERS)]
    for l, (k, v) in enumerate(sent):
        sender.send_layer(l, k, v)
    stats = sender.finish(30)
    assert pending.state is TransferState.COMPLETE and stats.bytes == sum(2 * k.nbytes for k, _ in sent)
    for l, (k, v) in enumerate(sent):
        assert torch.equal(kc[l][dst], k) and torch.equal(vc[l][dst], v)
    assert transport.arena.num_free == transport.arena.n


@needs_mooncake
@pytest.mark.parametrize("path", ["link", "staged_link"])
def test_decode_abort_mid_transfer_fences_reused_blocks(path, request):
    """Layer 0 lands; the decode side aborts and hands the blocks to another request; the rest of
    the transfer must never touch them, and both sides free everything."""
    receiver, server, transport, kc, vc = request.getfixturevalue(path)
    dst = [10, 11, 12]
    pending = receiver.expect("fenced", dst, LAYERS, cache_writer(kc, vc))
    sender = transport.open(server.address, "fenced", dst)
    sender.send_layer(0, *layer_kv(3, 0))
    wait_until(lambda: pending.bytes_received > 0 and transport.arena.num_free == transport.arena.n)
    assert receiver.abort("fenced")
    for l in range(LAYERS):  # another request now owns the blocks
        kc[l][dst] = 7.0
        vc[l][dst] = 7.0
    for l in range(1, LAYERS):
        sender.send_layer(l, *layer_kv(3, l))
    with pytest.raises(KVTransferError) as e:
        sender.finish(30)
    assert e.value.status == "ABORTED"
    assert all(bool((c[dst] == 7.0).all()) for c in (*kc, *vc))
    assert pending.state is TransferState.ABORTED and not receiver.pending()
    assert transport.arena.num_free == transport.arena.n


@needs_mooncake
def test_prefill_abort_fails_the_reservation_and_frees_the_arena(link):
    receiver, server, transport, kc, vc = link
    dst = [4, 5, 6]
    pending = receiver.expect("cancelled", dst, LAYERS, cache_writer(kc, vc))
    sender = transport.open(server.address, "cancelled", dst)
    sender.send_layer(0, *layer_kv(3, 0))
    sender.abort()
    with pytest.raises(KVTransferError) as e:
        sender.finish(30)
    assert e.value.status == "CANCELLED"
    assert pending.wait(10) is TransferState.FAILED and not receiver.pending()
    wait_until(lambda: transport.arena.num_free == transport.arena.n)


@needs_mooncake
def test_wrong_secret_is_refused(link):
    from pdcluster.kv_transfer.mooncake.transport import MooncakeKVTransport
    receiver, server, _, kc, vc = link
    pending = receiver.expect("intruder", [30], LAYERS, cache_writer(kc, vc))
    kc[0][30] = 3.0
    intruder = MooncakeKVTransport(secret="not-the-secret")
    try:
        sender = intruder.open(server.address, "intruder", [30])
        sender.send_layer(0, *layer_kv(1, 0))
        with pytest.raises(KVTransferError) as e:
            sender.finish(30)
        assert e.value.status == "UNAUTHENTICATED"
        assert pending.state is TransferState.PENDING and bool((kc[0][30] == 3.0).all())
        assert intruder.arena.num_free == intruder.arena.n
    finally:
        intruder.close()
        receiver.abort("intruder")


# staged path: the decode side READs into registered host buffers, then write()s into the cache
@pytest.fixture(scope="module")
def staged_link(link):
    """A second server, forced onto the staged path (as GPU caches are), over its own receiver and
    caches; staging buffers of exactly one of `link`'s transport slots; the same prefill transport."""
    from pdcluster.kv_transfer.mooncake.server import MooncakeKVServer
    transport = link[2]
    kc = [torch.zeros(BLOCKS, *BLOCK) for _ in range(LAYERS)]
    vc = [torch.zeros(BLOCKS, *BLOCK) for _ in range(LAYERS)]
    receiver = KVReceiver()
    server = MooncakeKVServer(receiver, kc, vc, secret=SECRET, staged=True, read_threads=2,
                              staging_bytes=transport.arena.slot_bytes)
    server.start_sync()
    yield receiver, server, transport, kc, vc
    server.stop_sync()


def hook_reads(monkeypatch, server, after):
    """Run after(local_addresses) right after each of the server's READs returns."""
    real = server.engine.read

    def read(session, local, remote, lengths):
        real(session, local, remote, lengths)
        after(local)
    monkeypatch.setattr(server.engine, "read", read)


@needs_mooncake
def test_staged_path_lands_the_same_bytes_as_the_direct_path(link, staged_link):
    dst = [13, 14, 15, 22, 23, 24, 31]  # 7 blocks in slots of 2: 4 chunks per layer
    g = torch.Generator().manual_seed(99)  # layer 0 non-contiguous: staged from a strided source
    sent = [tuple(torch.randn(BLOCK[0], len(dst), *BLOCK[1:], generator=g).transpose(0, 1) for _ in "kv")]
    sent += [layer_kv(len(dst), l) for l in range(1, LAYERS)]
    landed = []
    for receiver, server, transport, kc, vc in (link, staged_link):
        pending = receiver.expect("same-bytes", dst, LAYERS, cache_writer(kc, vc))
        sender = transport.open(server.address, "same-bytes", dst)
        for l, (k, v) in enumerate(sent):
            sender.send_layer(l, k, v)
        stats = sender.finish(30)
        assert pending.state is TransferState.COMPLETE and stats.bytes == sum(2 * k.nbytes for k, _ in sent)
        landed.append([(kc[l][dst].clone(), vc[l][dst].clone()) for l in range(LAYERS)])
    (direct, staged), server = landed, staged_link[1]
    for l, (k, v) in enumerate(sent):
        assert torch.equal(direct[l][0], k) and torch.equal(direct[l][1], v)
        assert torch.equal(staged[l][0], direct[l][0]) and torch.equal(staged[l][1], direct[l][1])
    assert server.staged and not link[1].staged
    assert len(server.engine._registered) == 2  # its two staging buffers, not the caches
    assert link[2].arena.num_free == link[2].arena.n and server._staging.qsize() == 2


@needs_mooncake
def test_staged_corrupt_chunk_is_rejected_and_nothing_lands(staged_link, monkeypatch):
    receiver, server, transport, kc, vc = staged_link
    dst = [1, 2, 3]
    for c in (*kc, *vc):
        c[dst] = 5.0
    reads = []

    def corrupt(local):  # flip a byte of the first chunk as it sits in the staging buffer
        reads.append(local)
        if len(reads) == 1:
            ctypes.c_uint8.from_address(local[0]).value ^= 0xFF
    hook_reads(monkeypatch, server, corrupt)
    pending = receiver.expect("corrupt", dst, LAYERS, cache_writer(kc, vc))
    sender = transport.open(server.address, "corrupt", dst)
    for l in range(LAYERS):
        sender.send_layer(l, *layer_kv(3, l))
    with pytest.raises(KVTransferError, match="checksum mismatch") as e:
        sender.finish(30)
    assert e.value.status == "DATA_LOSS" and len(reads) == 1  # nothing read after the bad chunk
    assert pending.state is TransferState.FAILED and pending.bytes_received == 0 and not receiver.pending()
    assert all(bool((c[dst] == 5.0).all()) for c in (*kc, *vc))
    wait_until(lambda: transport.arena.num_free == transport.arena.n)


@needs_mooncake
def test_staged_abort_between_read_and_write_lands_nothing(staged_link, monkeypatch):
    """Layer 0 lands; then the decode side aborts while a chunk of layer 1 sits read but not yet
    written, and hands the blocks to another request: that chunk must not land, nor any after."""
    receiver, server, transport, kc, vc = staged_link
    dst = [16, 17, 18]
    pending = receiver.expect("abort-staged", dst, LAYERS, cache_writer(kc, vc))
    sender = transport.open(server.address, "abort-staged", dst)
    k0, v0 = layer_kv(3, 0)
    sender.send_layer(0, k0, v0)
    wait_until(lambda: pending.bytes_received == 2 * k0.nbytes)
    assert torch.equal(kc[0][dst], k0) and torch.equal(vc[0][dst], v0)

    def abort_and_reuse(local):
        if receiver.abort("abort-staged"):  # returns: the reservation is fenced off
            for c in (*kc, *vc):
                c[dst] = 7.0
    hook_reads(monkeypatch, server, abort_and_reuse)
    for l in range(1, LAYERS):
        sender.send_layer(l, *layer_kv(3, l))
    with pytest.raises(KVTransferError) as e:
        sender.finish(30)
    assert e.value.status == "ABORTED"
    assert pending.state is TransferState.ABORTED and not receiver.pending()
    assert pending.bytes_received == 2 * k0.nbytes  # only layer 0 ever counted
    assert all(bool((c[dst] == 7.0).all()) for c in (*kc, *vc))
    wait_until(lambda: transport.arena.num_free == transport.arena.n)
    assert server._staging.qsize() == 2


@needs_mooncake
def test_staged_oversize_chunk_is_rejected(staged_link):
    """A prefill side whose slots exceed the decode side's staging buffers fails the request with
    a clear error before anything is read; the decode side's blocks stay untouched."""
    from pdcluster.kv_transfer.mooncake.transport import MooncakeKVTransport
    receiver, server, _, kc, vc = staged_link
    dst = [26, 27, 28, 29]
    for c in (*kc, *vc):
        c[dst] = 5.0
    big = MooncakeKVTransport(secret=SECRET, arena_bytes=4 * server.staging_bytes,
                              slot_bytes=2 * server.staging_bytes)
    try:
        pending = receiver.expect("oversize", dst, LAYERS, cache_writer(kc, vc))
        sender = big.open(server.address, "oversize", dst)
        sender.send_layer(0, *layer_kv(4, 0))  # 4 blocks: one chunk of twice the staging buffer
        with pytest.raises(KVTransferError, match=r"over this decode worker's \d+-byte mooncake staging buffer") as e:
            sender.finish(30)
        assert e.value.status == "INVALID_ARGUMENT"
        assert pending.state is TransferState.FAILED and not receiver.pending()
        assert all(bool((c[dst] == 5.0).all()) for c in (*kc, *vc))
        wait_until(lambda: big.arena.num_free == big.arena.n)
    finally:
        big.close()


@needs_mooncake
def test_caches_that_cannot_be_registered_take_the_staged_path_by_themselves():
    """Non-contiguous CPU caches stand in for GPU caches here: no flag, no error, exact landing."""
    from pdcluster.kv_transfer.mooncake.server import MooncakeKVServer
    from pdcluster.kv_transfer.mooncake.transport import MooncakeKVTransport
    kc = [torch.zeros(BLOCK[0], BLOCKS, *BLOCK[1:]).transpose(0, 1) for _ in range(2)]  # [BLOCKS, *BLOCK]
    vc = [torch.zeros(BLOCK[0], BLOCKS, *BLOCK[1:]).transpose(0, 1) for _ in range(2)]
    receiver = KVReceiver()
    server = MooncakeKVServer(receiver, kc, vc, read_threads=1)
    transport = MooncakeKVTransport()
    try:
        assert server.staged and len(server.engine._registered) == 1
        server.start_sync()
        dst = [3, 9, 4]
        pending = receiver.expect("strided", dst, 2, cache_writer(kc, vc))
        sender = transport.open(server.address, "strided", dst)
        sent = [layer_kv(3, l) for l in range(2)]
        for l, (k, v) in enumerate(sent):
            sender.send_layer(l, k, v)
        sender.finish(30)
        assert pending.state is TransferState.COMPLETE
        for l, (k, v) in enumerate(sent):
            assert torch.equal(kc[l][dst], k) and torch.equal(vc[l][dst], v)
    finally:
        transport.close()
        server.stop_sync()


# worker level: real PrefillWorker and DecodeWorker (no Ray), the embedded model

@pytest.fixture(scope="module")
def workers():
    """A mooncake pair and, as the reference, a tcp pair (a decode worker serves one transport)."""
    if UNAVAILABLE is not None:
        pytest.skip(UNAVAILABLE)
    p_mc, d = pair("mooncake", secret=SECRET)
    p_tcp, d_tcp = pair("tcp", secret=SECRET)
    yield d, p_mc, p_tcp, d_tcp
    for w in (p_mc, p_tcp, d, d_tcp):
        w.close()


@needs_mooncake
def test_workers_same_greedy_tokens_as_tcp_and_nothing_leaks(workers):
    d, p_mc, p_tcp, d_tcp = workers
    ids = d.engine.tokenizer.encode("Describe a lighthouse on a stormy night. " * 12, add_special_tokens=False)
    got, _ = remote(p_mc, d, "mc-1", ids, salt="salt-mc")
    ref, _ = remote(p_tcp, d_tcp, "tcp-1", ids, salt="salt-tcp")
    assert got == ref and len(got) == 12
    d.finished("mc-1"), d_tcp.finished("tcp-1")
    arena = p_mc.transport.arena
    assert arena.num_free == arena.n and not d.receiver.pending()
    assert p_mc.meter.snapshot()[0]["total_bytes"] > 0


@needs_mooncake
def test_workers_abort_frees_both_sides(workers):
    from pdcluster.engine.sampling_params import SamplingParams
    d, p_mc, _, _ = workers
    params = SamplingParams(max_tokens=12, temperature=0)
    ids = d.engine.tokenizer.encode("A long list of harbours and their lights. " * 30, add_special_tokens=False)
    free = d.engine.figures()["free_blocks"]
    r = d.reserve("mc-abort", ids, params, cache_salt="salt-abort")
    dest = r.destination()
    errors = []

    def run():
        try:
            p_mc.prefill("mc-abort", ids, params, dest, cache_salt="salt-abort")
        except Exception as e:  # noqa: BLE001 - the expected outcome
            errors.append(e)
    t = threading.Thread(target=run)
    t.start()
    wait_until(lambda: d.connector.transfer("mc-abort").bytes_received > 0, 60)  # mid-transfer
    d.abort("mc-abort")
    assert d.engine.figures()["free_blocks"] == free and not d.receiver.pending()
    t.join(60)
    assert errors and isinstance(errors[0], KVTransferError)
    wait_until(lambda: p_mc.transport.arena.num_free == p_mc.transport.arena.n)


def test_a_stage_address_past_64_bits_is_malformed_not_an_internal_error():
    """An authenticated peer's "stage" addr is bounded with the payload's end below 2^63 (the engine
    reads int64 addresses). Before, 2^63 passed the check and overflowed numpy in the landing code:
    INTERNAL, with a traceback logged at ERROR."""
    from pdcluster.kv_transfer import wire
    from pdcluster.kv_transfer.errors import MalformedFrame
    from pdcluster.kv_transfer.mooncake import protocol
    k = torch.ones(1, 16, 3, 64)
    header = wire.decode_frame(wire.encode_frame("req", 0, [1], k, k))[0]
    seq, addr, parsed = protocol.parse_stage(protocol.unpack(protocol.stage_message(3, 2**62, header)))
    assert (seq, addr, parsed.nbytes) == (3, 2**62, header.nbytes)
    for bad in (2**63, 2**63 - header.nbytes, 2**64 - 1):
        with pytest.raises(MalformedFrame, match="64-bit"):
            protocol.parse_stage(protocol.unpack(protocol.stage_message(3, bad, header)))
