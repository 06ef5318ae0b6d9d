"""pdcluster/messages.py: the router-worker messages are frozen, typed and round-trip through msgpack."""
import dataclasses

import pytest

from pdcluster.engine.sampling_params import TokenLogprobs
from pdcluster.messages import (BlockEvent, EngineFigures, Heartbeat, KVDestination, LinkFigures, NoRoom, PrefillResult,
                                PullOrder, PullPlan, PullResult, Reservation, TokenItem, WorkerStatus)

RES = Reservation(kv_address="127.0.0.1:1", dst_id="decode-0", skip_blocks=2, dst_block_ids=[7, 9, 11],
                  cached_tokens=32)


@pytest.mark.parametrize("msg", [
    RES, NoRoom("3 free KV blocks"), KVDestination("127.0.0.1:3", "decode-1", 0, [1, 2]),
    PrefillResult(first_token=42, cached_tokens=16, prefill_s=0.25, kv_bytes=1 << 20, kv_transfer_ms=1.5,
                  kv_wall_ms=9.0, kv_codec="int8"),
    TokenItem([5, 6], True, "stop", 0), TokenItem([], False, None, 32), Heartbeat(1234),
    TokenItem([5], False, None, 0, (TokenLogprobs(5, -0.5),), (TokenLogprobs(8, -1.0, ((8, -1.0), (9, -2.0))),)),
    PrefillResult(first_token=42, cached_tokens=0, prefill_s=0.25, kv_bytes=0, kv_transfer_ms=0.0, kv_wall_ms=0.0,
                  kv_codec="none", prompt_logprobs=(TokenLogprobs(3, -2.0, ((4, -0.1),)),)),
    PullPlan("decode-1", "127.0.0.1:4", 2, [2**63 + 5, 7]), PullOrder("r1", [9, 11], "127.0.0.1:5", "decode-0", [3, 4]),
    PullResult(True, 2, 1 << 16, 1.5), PullResult(False, reason="blocks no longer cached (evicted)"),
])
def test_round_trip_through_msgpack(msg):
    data = msg.to_bytes()
    assert isinstance(data, bytes) and b"\x80\x04" not in data[:2]     # msgpack, not a pickle stream
    assert type(msg).from_bytes(data) == msg
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(msg, dataclasses.fields(msg)[0].name, None)


def test_a_reservation_names_its_destination_and_unknown_fields_are_refused():
    assert RES.destination() == KVDestination("127.0.0.1:1", "decode-0", 2, [7, 9, 11])
    assert RES.destination("127.0.0.1:2").address == "127.0.0.1:2"     # e.g. a proxy in front of it
    import msgpack
    with pytest.raises(TypeError):
        NoRoom.from_bytes(msgpack.packb({"reason": "x", "extra": 1}))


# the status poll's answer: nested figures, links and block events travel typed both ways
FIGURES = dict(free_blocks=90, num_blocks=100, waiting_tokens=12, prefix_hits=32, prefix_queries=80, steps=7,
               tokens=900, busy_s=1.5, prefill_tokens=800, prefill_s=1.25, decode_steps=5, decode_seqs=20,
               decode_s=0.25)
SNAPSHOT = dict(src_id="prefill-0", dst_id="decode-0", total_bytes=4096, total_seconds=0.25, count=2,
                ewma_bytes_per_s=16384.0, last_sample_time=100.0, mean_bytes_per_s=16384.0)


def test_worker_status_round_trips_with_its_nested_figures():
    pre = WorkerStatus.of("prefill-0", "prefill", "abc", 42, FIGURES | {"a_new_counter": 1},
                          (7, [(6, "stored", [1, 2]), (7, "removed", [3])]), in_flight=1,
                          links=(LinkFigures.of(SNAPSHOT),))
    assert pre.engine == EngineFigures(**FIGURES)                   # extra engine keys are not part of the contract
    assert pre.block_events == (BlockEvent(6, "stored", [1, 2]), BlockEvent(7, "removed", [3]))
    assert pre.links[0].ewma_bytes_per_s == 16384.0 and pre.block_seq == 7
    dec = WorkerStatus.of("decode-0", "decode", "def", 43, FIGURES, running=3, waiting=1, reserved=2,
                          kv_address="127.0.0.1:5")
    assert dec.block_seq is None and dec.block_events == () and dec.links == ()
    for msg in (pre, dec):
        data = msg.to_bytes()
        assert b"\x80\x04" not in data[:2]
        back = WorkerStatus.from_bytes(data)
        assert back == msg and isinstance(back.engine, EngineFigures)
        assert all(isinstance(x, LinkFigures) for x in back.links)
    with pytest.raises(dataclasses.FrozenInstanceError):
        pre.engine.free_blocks = 0


def test_sampling_params_cross_to_the_workers_as_msgpack_and_come_back_equal():
    import msgpack

    from pdcluster.engine import SamplingParams, StructuredOutput
    p = SamplingParams(max_tokens=9, temperature=0.7, top_p=0.9, top_k=5, min_p=0.05, seed=2**63 + 1,
                       stop=["\n\n"], stop_token_ids=[2], presence_penalty=0.5, repetition_penalty=1.2,
                       logprobs=3, structured=StructuredOutput("json_schema", '{"type": "object"}'), min_tokens=2,
                       logit_bias={7: -100, 3: 1.5})
    back = SamplingParams(**msgpack.unpackb(msgpack.packb(dataclasses.asdict(p)), strict_map_key=True))
    assert back == p and isinstance(back.structured, StructuredOutput)
