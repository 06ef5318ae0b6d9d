"""The gRPC transport's own cases: hand-made Push calls against KVServer on 127.0.0.1 (corrupt and
malformed frames, metadata secrets). The cases every transport shares: test_kv_transports.py."""
import asyncio

import grpc
import pytest
import torch

from pdcluster.kv_transfer import KVReceiver, KVServer, TransferState, cache_writer, wire
from pdcluster.kv_transfer.loop_thread import shared_loop
from tests.unit.kv_blocks import BLOCK, SECRET, new_caches, serving

# received frames are read-only bytes viewed by torch; wire.py silences this outside pytest
pytestmark = [pytest.mark.timeout(60), pytest.mark.filterwarnings("ignore:The given buffer is not writable")]


@pytest.fixture
def server():
    yield from serving(KVServer(KVReceiver(), secret=SECRET))  # 127.0.0.1, port 0


def _push_raw(address, frames, metadata=()):
    """Push hand-made frames with a bare gRPC client; returns the ack bytes or raises AioRpcError."""
    async def go():
        async with grpc.aio.insecure_channel(address) as channel:
            return await channel.stream_unary(wire.PUSH_METHOD)(iter(frames), metadata=metadata)
    return asyncio.run_coroutine_threadsafe(go(), shared_loop()).result(20)


def test_corrupt_frame_over_the_wire_is_data_loss(server):
    caches = new_caches()
    pending = server.receiver.expect("req", [1], 1, cache_writer(*caches))
    k = torch.ones(1, *BLOCK, dtype=torch.bfloat16)
    frame = bytearray(wire.encode_frame("req", 0, [1], k, k))
    frame[-3] ^= 0xFF
    with pytest.raises(grpc.aio.AioRpcError) as e:
        _push_raw(server.address, [bytes(frame)], metadata=(("x-pdcluster-secret", SECRET),))
    assert e.value.code() == grpc.StatusCode.DATA_LOSS and "checksum" in e.value.details()
    assert caches[0][0].abs().sum() == 0 and pending.state is TransferState.PENDING


def test_malformed_frame_over_the_wire_is_invalid_argument(server):
    with pytest.raises(grpc.aio.AioRpcError) as e:
        _push_raw(server.address, [b"PDKV\x02\x00\x00\x00\xc1\xc1" + bytes(6)],
                  metadata=(("x-pdcluster-secret", SECRET),))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("metadata", [(), (("x-pdcluster-secret", "wrong"),)])
def test_secret_mismatch_is_unauthenticated(server, metadata):
    caches = new_caches()
    server.receiver.expect("req", [1], 1, cache_writer(*caches))
    k = torch.ones(1, *BLOCK, dtype=torch.bfloat16)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        _push_raw(server.address, [wire.encode_frame("req", 0, [1], k, k)], metadata=metadata)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert caches[0][0].abs().sum() == 0




def test_a_long_request_id_is_invalid_argument_not_an_oversized_status(server):
    """The id was echoed whole in the status: 20,000 characters overflowed gRPC's 16 KiB metadata and the
    sender saw RESOURCE_EXHAUSTED. Ids are capped as the TCP server caps them (wire.MAX_RID_CHARS)."""
    k = torch.ones(1, *BLOCK, dtype=torch.bfloat16)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        _push_raw(server.address, [wire.encode_frame("r" * 20_000, 0, [1], k, k)],
                  metadata=(("x-pdcluster-secret", SECRET),))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 1024" in e.value.details()


def test_a_failing_cache_write_is_internal_and_fails_the_reservation(server):
    """Any error but a KVTransferError was re-raised: gRPC answered UNKNOWN (the TCP server says INTERNAL)."""
    def bad_write(layer, ids, k, v):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    pending = server.receiver.expect("req", [1], 1, bad_write)
    k = torch.ones(1, *BLOCK, dtype=torch.bfloat16)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        _push_raw(server.address, [wire.encode_frame("req", 0, [1], k, k)], metadata=(("x-pdcluster-secret", SECRET),))
    assert e.value.code() == grpc.StatusCode.INTERNAL and "CUDA error" in e.value.details()
    assert pending.state is TransferState.FAILED


@pytest.mark.parametrize("line, says", [("short", "at least 16"), ("geheimes-passwört-2026", "printable ASCII"),
                                        ("tab\tinside-the-secret-line", "printable ASCII")])
def test_a_cluster_secret_gRPC_metadata_cannot_carry_is_refused_at_start(tmp_path, line, says):
    """A non-ASCII secret passed the length check; every gRPC (and Mooncake) transfer then failed with
    INTERNAL: Invalid metadata, and the reservations waited out their timeouts."""
    from pdcluster.deploy.launch import cluster_secret
    (tmp_path / "s").write_text(line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=says):
        cluster_secret(str(tmp_path / "s"))
    (tmp_path / "s").write_text("an-ascii-secret-of-enough-length\n")
    assert cluster_secret(str(tmp_path / "s")) == "an-ascii-secret-of-enough-length"


def test_calls_past_the_stream_cap_are_resource_exhausted(monkeypatch):
    """Without a cap, peers without the secret could open Push streams without end (each refused one is held
    while it drains, up to REJECT_DRAIN_S): past MAX_STREAMS at once gRPC now refuses at once."""
    from pdcluster.kv_transfer.grpc import base
    monkeypatch.setattr(base, "MAX_STREAMS", 2)
    server = KVServer(KVReceiver(), secret=SECRET)
    server.start_sync()
    release = asyncio.Event()

    async def go():
        async def silent():                     # a stream that sends nothing until released
            await release.wait()
            return
            yield
        async with grpc.aio.insecure_channel(server.address) as channel:
            push = channel.stream_unary(wire.PUSH_METHOD)
            held = [push(silent(), metadata=(("x-pdcluster-secret", SECRET),)) for _ in range(2)]
            await asyncio.sleep(0.5)
            try:
                await push(iter([b"x"]), timeout=10)
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as e:
                code = e.code()
            release.set()
            for call in held:
                try:
                    await call
                except grpc.aio.AioRpcError:
                    pass
            return code
    try:
        assert asyncio.run_coroutine_threadsafe(go(), shared_loop()).result(30) == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        server.stop_sync()
