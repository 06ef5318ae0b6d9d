"""pdcluster/messages.py: the router-worker messages are frozen, typed and round-trip through msgpack."""
import dataclasses

import pytest

from pdcluster.messages import Heartbeat, KVDestination, NoRoom, PrefillResult, Reservation, TokenItem

RES = Reservation(kv_address="127.0.0.1:1", kv_grpc_address="127.0.0.1:2", kv_tcp_address="127.0.0.1:1",
                  dst_id="decode-0", skip_blocks=2, dst_block_ids=[7, 9, 11], cached_tokens=32)


@pytest.mark.parametrize("msg", [
    RES, NoRoom("3 free KV blocks"), KVDestination("127.0.0.1:3", "decode-1", 0, [1, 2]),
    PrefillResult(first_token=42, cached_tokens=16, prefill_s=0.25, kv_bytes=1 << 20, kv_transfer_ms=1.5,
                  kv_wall_ms=9.0, kv_codec="int8"),
    TokenItem([5, 6], True, "stop", 0), TokenItem([], False, None, 32), Heartbeat(1234),
])
def test_round_trip_through_msgpack(msg):
    data = msg.to_bytes()
    assert isinstance(data, bytes) and b"\x80\x04" not in data[:2]     # msgpack, not a pickle stream
    assert type(msg).from_bytes(data) == msg
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(msg, dataclasses.fields(msg)[0].name, None)


def test_a_reservation_names_its_destination_and_unknown_fields_are_refused():
    assert RES.destination() == KVDestination("127.0.0.1:1", "decode-0", 2, [7, 9, 11])
    assert RES.destination(RES.kv_grpc_address).address == "127.0.0.1:2"
    import msgpack
    with pytest.raises(TypeError):
        NoRoom.from_bytes(msgpack.packb({"reason": "x", "extra": 1}))
