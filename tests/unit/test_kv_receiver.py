"""kv_transfer.receiver without sockets: reservations, fencing, completion, stream checks."""
import threading
import time

import pytest
import torch

from pdcluster.kv_transfer import wire
from pdcluster.kv_transfer.errors import DataLoss, DuplicateStream, MalformedFrame, TransferClosed, UnknownRequest
from pdcluster.kv_transfer.receiver import InboundStream, KVReceiver, TransferState, cache_writer

# received frames are read-only bytes viewed by torch; wire.py silences this outside pytest
pytestmark = [pytest.mark.timeout(60), pytest.mark.filterwarnings("ignore:The given buffer is not writable")]

L, NB, BLOCK = 3, 16, (4, 2, 8)  # layers, cache blocks, block shape [block_size, heads, head_dim]


def _caches(dtype=torch.float32):
    return ([torch.zeros(NB, *BLOCK, dtype=dtype) for _ in range(L)],
            [torch.zeros(NB, *BLOCK, dtype=dtype) for _ in range(L)])


def _kv(n, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *BLOCK, generator=g).to(dtype), torch.randn(n, *BLOCK, generator=g).to(dtype)


def _frames(rid, layer, ids, seed, chunk_bytes=1 << 20):
    k, v = _kv(len(ids), seed)
    return list(wire.encode_chunks(rid, layer, ids, k, v, chunk_bytes)), k, v


def test_full_transfer_lands_exactly_and_completes():
    kc, vc = _caches()
    rx = KVReceiver()
    ids = [9, 2, 14, 5]
    pt = rx.expect("r", ids, L, cache_writer(kc, vc))
    fired = []
    pt.add_done_callback(lambda t: fired.append(t.state))
    s = InboundStream(rx)
    sent = []
    for layer in range(L):
        frames, k, v = _frames("r", layer, ids, layer, chunk_bytes=2 * 4 * 2 * 8 * 4)  # 1 block/frame
        assert len(frames) == 4
        for f in frames:
            assert pt.state is TransferState.PENDING
            s.feed(f)
        sent.append((k, v))
    assert pt.wait(0) is TransferState.COMPLETE and fired == [TransferState.COMPLETE]
    ack = s.close()
    assert ack.bytes_received == pt.bytes_received == L * 2 * 4 * 64 * 4
    for layer, (k, v) in enumerate(sent):
        assert torch.equal(kc[layer][ids], k) and torch.equal(vc[layer][ids], v)
    untouched = [b for b in range(NB) if b not in ids]
    assert all(kc[l][untouched].abs().sum() == 0 for l in range(L))
    assert rx.pending() == []  # a terminal reservation leaves the registry
    pt.add_done_callback(lambda t: fired.append("late"))  # runs at once when already terminal
    assert fired[-1] == "late"


def test_pieces_of_a_layer_may_arrive_separately_and_in_any_layer_order():
    kc, vc = _caches()
    rx = KVReceiver()
    pt = rx.expect("r", [1, 2, 3, 4], 2, cache_writer(kc, vc))
    s = InboundStream(rx)
    for layer, ids in [(1, [3, 4]), (0, [1, 2, 3, 4]), (1, [1, 2])]:
        for f in _frames("r", layer, ids, 0)[0]:
            s.feed(f)
    assert pt.state is TransferState.COMPLETE and s.close().bytes_received > 0


def test_unknown_request_is_not_written():
    kc, vc = _caches()
    rx = KVReceiver()
    with pytest.raises(UnknownRequest):
        InboundStream(rx).feed(_frames("ghost", 0, [1], 0)[0][0])
    assert all(c.abs().sum() == 0 for c in kc)


def _layer0_fed():
    """A receiver expecting "r" (blocks 1, 2; L layers) and a stream that has been fed layer 0:
    (receiver, K caches, V caches, the transfer, the stream)."""
    kc, vc = _caches()
    rx = KVReceiver()
    pt = rx.expect("r", [1, 2], L, cache_writer(kc, vc))
    s = InboundStream(rx)
    s.feed(_frames("r", 0, [1, 2], 0)[0][0])
    return rx, kc, vc, pt, s


def test_abort_fences_later_frames():
    rx, kc, _, pt, s = _layer0_fed()
    assert rx.abort("r") and pt.state is TransferState.ABORTED
    assert not rx.abort("r")  # already terminal
    with pytest.raises(TransferClosed):
        s.feed(_frames("r", 1, [1, 2], 1)[0][0])
    assert kc[1].abs().sum() == 0 and kc[0][[1, 2]].abs().sum() > 0
    with pytest.raises(UnknownRequest):  # a new stream for it finds nothing
        InboundStream(rx).feed(_frames("r", 1, [1, 2], 1)[0][0])


def test_re_expecting_an_id_is_not_written_by_the_old_stream():
    rx, kc, vc, _, old = _layer0_fed()
    rx.abort("r")
    fresh = rx.expect("r", [5, 6], L, cache_writer(kc, vc))
    with pytest.raises(TransferClosed):
        old.feed(_frames("r", 1, [1, 2], 1)[0][0])
    assert fresh.state is TransferState.PENDING and fresh.bytes_received == 0


def test_truncated_stream_fails_the_request():
    *_, s = _layer0_fed()
    with pytest.raises(DataLoss, match=r"1 \(0/2 blocks\), 2 \(0/2 blocks\)"):
        s.close()


def _first_of_three_chunks():
    """A stream for "r" (blocks 1, 2, 3; one layer sent as three one-block chunks) that has been
    fed chunk 0: (the stream, the three frames)."""
    kc, vc = _caches()
    rx = KVReceiver()
    rx.expect("r", [1, 2, 3], 1, cache_writer(kc, vc))
    frames = _frames("r", 0, [1, 2, 3], 0, chunk_bytes=1)[0]
    s = InboundStream(rx)
    s.feed(frames[0])
    return s, frames


def test_stream_ending_inside_a_piece_is_data_loss():
    s, _ = _first_of_three_chunks()
    with pytest.raises(DataLoss, match="chunk 0 of 3"):
        s.close()


def test_missing_chunk_is_data_loss():
    s, frames = _first_of_three_chunks()
    with pytest.raises(DataLoss, match="expected layer 0 chunk 1 of 3"):
        s.feed(frames[2])


def test_fail_marks_only_the_bound_reservation_failed():
    kc, vc = _caches()
    rx = KVReceiver()
    pt = rx.expect("r", [1, 2], 2, cache_writer(kc, vc))
    frames = _frames("r", 0, [1, 2], 0)[0]
    corrupt = bytearray(frames[0])
    corrupt[-1] ^= 1
    unbound = InboundStream(rx)
    with pytest.raises(DataLoss):
        unbound.feed(bytes(corrupt))
    unbound.fail(DataLoss("corrupt"))  # never claimed the reservation: no effect
    assert pt.state is TransferState.PENDING
    owner, intruder = InboundStream(rx), InboundStream(rx)
    owner.feed(frames[0])
    with pytest.raises(DuplicateStream):
        intruder.feed(frames[0])
    intruder.fail(DuplicateStream("dup"))  # a refused stream leaves the owner's reservation alone
    assert pt.state is TransferState.PENDING
    owner.fail(ConnectionResetError("peer gone"))
    assert pt.state is TransferState.FAILED and "peer gone" in pt.error and rx.pending() == []


@pytest.mark.parametrize("ids, reason", [([1, 7], "not reserved"), ([1, 1], "sent twice")])
def test_blocks_outside_the_reservation_or_twice_are_invalid(ids, reason):
    kc, vc = _caches()
    rx = KVReceiver()
    pt = rx.expect("r", [1, 2], 1, cache_writer(kc, vc))
    with pytest.raises(MalformedFrame, match=reason):
        InboundStream(rx).feed(_frames("r", 0, ids, 0)[0][0])
    assert kc[0].abs().sum() == 0 and pt.bytes_received == 0


def test_layer_out_of_range_is_invalid():
    rx = KVReceiver()
    rx.expect("r", [1], 2, cache_writer(*_caches()))
    with pytest.raises(MalformedFrame, match="num_layers"):
        InboundStream(rx).feed(_frames("r", 2, [1], 0)[0][0])


def test_shape_mismatch_with_the_cache_is_invalid_a_dtype_one_converts():
    kc, vc = _caches(torch.bfloat16)
    rx = KVReceiver()
    pt = rx.expect("r", [1], 1, cache_writer(kc, vc))
    frames, k, _ = _frames("r", 0, [1], 0)
    InboundStream(rx).feed(frames[0])  # float32 frame: cast at the boundary (pools tuned apart)
    assert pt.state is TransferState.COMPLETE and torch.equal(kc[0][1], k[0].to(torch.bfloat16))
    rx.expect("q", [1], 1, cache_writer(kc, vc))
    k = torch.zeros(1, 4, 2, 9, dtype=torch.bfloat16)
    with pytest.raises(MalformedFrame, match=r"\[4, 2, 9\]"):
        InboundStream(rx).feed(wire.encode_frame("q", 0, [1], k, k))


def test_stream_of_two_requests_is_invalid():
    rx = KVReceiver()
    caches = _caches()
    rx.expect("a", [1], 2, cache_writer(*caches))
    rx.expect("b", [2], 2, cache_writer(*caches))
    s = InboundStream(rx)
    s.feed(_frames("a", 0, [1], 0)[0][0])
    with pytest.raises(MalformedFrame, match="in the stream of 'a'"):
        s.feed(_frames("b", 0, [2], 0)[0][0])


def test_expect_rules():
    rx = KVReceiver()
    w = cache_writer(*_caches())
    rx.expect("r", [1], 1, w)
    with pytest.raises(ValueError, match="already"):
        rx.expect("r", [2], 1, w)
    with pytest.raises(ValueError):
        rx.expect("s", [3, 3], 1, w)
    empty = rx.expect("e", [], 4, w)  # nothing to transfer: complete at once, never pending
    assert empty.wait(0) is TransferState.COMPLETE and rx.pending() == ["r"]


def test_wait_from_another_thread():
    kc, vc = _caches()
    rx = KVReceiver()
    pt = rx.expect("r", [3], 1, cache_writer(kc, vc))
    states = []
    waiter = threading.Thread(target=lambda: states.append(pt.wait(10)))
    waiter.start()
    InboundStream(rx).feed(_frames("r", 0, [3], 0)[0][0])
    waiter.join(10)
    assert states == [TransferState.COMPLETE]


def test_direct_landing_targets_views_then_commits():
    kc, vc = _caches()
    rx = KVReceiver()
    pt = rx.expect("r", [4, 5, 9], 1, cache_writer(kc, vc))
    frame = _frames("r", 0, [4, 5, 9], 0)[0][0]
    header, k, v = wire.decode_frame(frame)
    positions, views = pt.target(header)
    assert positions == [0, 1, 2] and [m.nbytes for m in views] == [2 * 256, 256, 2 * 256, 256]  # K runs, V runs
    payload = memoryview(frame)[len(frame) - header.nbytes:]
    at = 0
    for m in views:
        pt.locked(m.__setitem__, slice(None), payload[at:at + m.nbytes])
        at += m.nbytes
    assert pt.state is TransferState.PENDING  # landed, not committed
    pt.commit(header, positions)
    assert pt.state is TransferState.COMPLETE
    assert torch.equal(kc[0][[4, 5, 9]], k) and torch.equal(vc[0][[4, 5, 9]], v)


def test_abort_waits_for_a_write_in_progress_and_fences_the_next():
    kc, vc = _caches()
    rx = KVReceiver()
    pt = rx.expect("r", [1], 1, cache_writer(kc, vc))
    header = wire.decode_frame(_frames("r", 0, [1], 0)[0][0])[0]
    _, views = pt.target(header)
    started, order = threading.Event(), []

    def slow_write():
        started.set()
        time.sleep(0.2)
        order.append("write done")

    writer = threading.Thread(target=pt.locked, args=(slow_write,))
    writer.start()
    started.wait(5)
    assert rx.abort("r")
    order.append("abort returned")
    writer.join(5)
    assert order == ["write done", "abort returned"]
    with pytest.raises(TransferClosed):
        pt.locked(views[0].__setitem__, slice(None), bytes(views[0].nbytes))
    with pytest.raises(TransferClosed):
        pt.commit(header, [0])


def test_target_checks_before_anything_lands():
    kc, vc = _caches()
    rx = KVReceiver()
    pt = rx.expect("r", [1, 2], 2, cache_writer(kc, vc))
    for ids, layer, reason in [([1, 7], 0, "not reserved"), ([1, 1], 0, "sent twice"), ([1], 2, "num_layers")]:
        with pytest.raises(MalformedFrame, match=reason):
            pt.target(wire.decode_frame(_frames("r", layer, ids, 0)[0][0])[0])
    k = torch.zeros(1, 4, 2, 9)
    with pytest.raises(MalformedFrame, match=r"\[4, 2, 9\]"):
        pt.target(wire.decode_frame(wire.encode_frame("r", 0, [1], k, k))[0])
    assert pt.state is TransferState.PENDING and all(c.abs().sum() == 0 for c in kc + vc)
