"""deploy/netns.py: a real veth+tbf link between two network namespaces, and KV TCP across it.

Needs root and iproute2 (skipped otherwise, with the reason). Each test makes its own link and
checks that both namespaces are gone afterwards."""
import os
import socket
import time

import pytest
import torch

from pdcluster.deploy import netns
from pdcluster.kv_transfer import KVReceiver, KVTcpServer, TcpKVTransport, TransferState, cache_writer
from pdcluster.kv_transfer.netns import run_in

pytestmark = pytest.mark.timeout(60)

L, NB, BLOCK = 4, 160, (16, 3, 64)   # layers, cache blocks, [block_size, kv_heads, head_dim]
BLOCK_BYTES = 2 * 16 * 3 * 64 * 2    # K + V of one bf16 block (12 KiB)
RATE = 30e6 / 8                      # tbf rate, bytes/s (30 Mbit/s): loopback moves GB/s
SECRET = "s3cret-netns"


@pytest.fixture
def can_shape():
    ok, why = netns.available()
    if not ok:
        pytest.skip(f"no shaped link on this machine: {why}")


def _gone(link):
    listed = netns.names()
    return link.prefill_ns not in listed and link.decode_ns not in listed


def test_plan_names_carry_the_pid_and_the_burst_holds_a_gso_packet():
    a, b = netns.plan(RATE), netns.plan(100e6)
    assert str(os.getpid()) in a.prefill_ns and a.prefill_ns != b.prefill_ns and a.decode_ns != a.prefill_ns
    assert a.burst_bytes == 64 << 10 and b.burst_bytes == 100_000           # 1 ms of traffic at 100 MB/s
    assert netns.plan(netns.line_rate(5e6)).goodput_bytes_per_s == pytest.approx(5e6)
    with pytest.raises(ValueError):
        netns.plan(0)


def test_kv_transfer_crosses_the_link_at_its_rate(can_shape):
    caches = ([torch.zeros(NB, *BLOCK, dtype=torch.bfloat16) for _ in range(L)],
              [torch.zeros(NB, *BLOCK, dtype=torch.bfloat16) for _ in range(L)])
    ids = list(range(NB - 1, -1, -1))                     # 4 layers x 160 blocks x 12 KiB = 7.5 MiB: ~2 s
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(NB, *BLOCK, generator=g).bfloat16(), torch.randn(NB, *BLOCK, generator=g).bfloat16())
            for _ in range(L)]
    here = os.stat("/proc/thread-self/ns/net").st_ino
    with netns.shaped_link(RATE) as link:
        assert {link.prefill_ns, link.decode_ns} <= set(netns.names())
        srv = KVTcpServer(KVReceiver(), host=link.decode_ip, secret=SECRET, netns=link.decode_ns)
        tr = TcpKVTransport(secret=SECRET, netns=link.prefill_ns)
        srv.start_sync()
        try:
            with pytest.raises(OSError):                  # the address exists only inside the pair
                socket.create_connection((link.decode_ip, srv.port), timeout=1).close()
            pending = srv.receiver.expect("req", ids, L, cache_writer(*caches))
            t0 = time.perf_counter()
            sender = tr.open(srv.address, "req", ids, dst_id="d0")
            for layer, (k, v) in enumerate(data):
                sender.send_layer(layer, k, v)
            stats = sender.finish(timeout=30)
            wall = time.perf_counter() - t0
            assert pending.wait(5) is TransferState.COMPLETE
        finally:
            tr.close()
            srv.stop_sync()
    assert os.stat("/proc/thread-self/ns/net").st_ino == here   # this thread never moved
    for layer, (k, v) in enumerate(data):
        assert torch.equal(caches[0][layer][ids], k) and torch.equal(caches[1][layer][ids], v)
    assert stats.bytes == L * NB * BLOCK_BYTES == pending.bytes_received
    achieved = stats.wire_bytes / wall
    assert 0.5 * link.goodput_bytes_per_s <= achieved <= 1.3 * link.goodput_bytes_per_s, (achieved, link)
    assert _gone(link)


def test_run_in_moves_only_its_own_thread(can_shape):
    here = os.stat("/proc/thread-self/ns/net").st_ino
    with netns.shaped_link(RATE) as link:
        inside = run_in(link.decode_ns, lambda: os.stat("/proc/thread-self/ns/net").st_ino)
        with pytest.raises(ZeroDivisionError):            # fn's exception reaches the caller
            run_in(link.decode_ns, lambda: 1 / 0)
    assert inside != here and os.stat("/proc/thread-self/ns/net").st_ino == here
    assert _gone(link)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_namespaces_are_removed_when_the_body_raises(can_shape, error):
    with pytest.raises(error):
        with netns.shaped_link(RATE) as link:
            assert not _gone(link)
            raise error("body failed")
    assert _gone(link)
    netns.remove(link)                                    # idempotent


def test_scenario_run_gets_a_shaped_link_instead_of_the_bucket(can_shape):
    from pdcluster.bench.scenario import kv_link
    from pdcluster.deploy.config import ClusterConfig, KVSection
    notes = {}
    with kv_link(ClusterConfig(kv=KVSection(bandwidth_limit=5e6)), True, notes) as cfg:
        link = cfg.kv.link
        assert cfg.kv.bandwidth_limit is None and link.goodput_bytes_per_s == pytest.approx(5e6)
        assert not _gone(link)
    assert _gone(link) and list(notes)[0].startswith("veth+tbf at 5.0 MB/s")


def test_workers_take_their_namespace_for_the_kv_tcp_sockets_only():
    """No namespace needed: PrefillWorker hands kv_netns to TcpKVTransport (its connections are made
    there) and refuses it for a transport that cannot use it."""
    from pdcluster.engine.llm_engine import LLMEngine, build_config
    from pdcluster.prefill_worker.worker import PrefillWorker
    engine = LLMEngine(build_config(kv_cache_memory=8 * 2**20, num_threads=1))
    w = PrefillWorker("p", engine, transport="tcp", kv_netns="pdkv-test-p")
    try:
        assert isinstance(w.transport, TcpKVTransport) and w.transport.netns == "pdkv-test-p"
    finally:
        w.close()
    with pytest.raises(ValueError, match="kv_netns needs the tcp transport"):
        PrefillWorker("p", engine, transport="grpc", kv_netns="pdkv-test-p")
