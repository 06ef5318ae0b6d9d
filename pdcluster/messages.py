"""Typed messages between the router and the workers: the one place their contract is written.

Frozen dataclasses of plain fields. They travel as Ray actor call arguments and results today;
`to_bytes` / `from_bytes` (msgpack) carry them over any other channel without pickle.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import msgpack


class Message:
    def to_bytes(self) -> bytes:
        return msgpack.packb(dataclasses.asdict(self))

    @classmethod
    def from_bytes(cls, data: bytes):
        return cls(**msgpack.unpackb(data, strict_map_key=True))


@dataclass(frozen=True)
class KVDestination(Message):
    """Where a prefill worker sends a request's KV (from the decode worker's Reservation)."""
    address: str                    # the decode worker's KV server "host:port", of the prefill worker's transport
    dst_id: str                     # decode worker id (names the link in the bandwidth meter)
    skip_blocks: int                # leading blocks the decode worker already holds
    dst_block_ids: list[int]        # reserved blocks for the rest, in order


@dataclass(frozen=True)
class Reservation(Message):
    """A decode worker's answer to reserve: blocks held for a prompt's KV computed elsewhere."""
    kv_address: str                 # its KV server of the cluster's transport
    kv_grpc_address: str            # its gRPC and TCP KV servers (both always run: tests and benches
    kv_tcp_address: str             #   compare transports against one decode worker)
    dst_id: str
    skip_blocks: int
    dst_block_ids: list[int]
    cached_tokens: int              # skip_blocks x block size

    def destination(self, address: str | None = None) -> KVDestination:
        return KVDestination(address or self.kv_address, self.dst_id, self.skip_blocks, self.dst_block_ids)


@dataclass(frozen=True)
class NoRoom(Message):
    """A decode worker's answer to reserve when its KV pool cannot hold the prompt now."""
    reason: str


@dataclass(frozen=True)
class PrefillResult(Message):
    """A prefill worker's answer: the first token, and what the prefill and its transfer cost."""
    first_token: int
    cached_tokens: int              # prompt tokens served from its prefix cache
    prefill_s: float                # wall seconds, queueing included
    kv_bytes: int                   # KV payload bytes sent (0: no destination)
    kv_transfer_ms: float           # transfer time not hidden behind compute
    kv_wall_ms: float               # first frame to ack
    kv_codec: str                   # "none" | "int8" | "fp8"


@dataclass(frozen=True)
class TokenItem(Message):
    """One item of a decode worker's token stream."""
    token_ids: list[int]            # new tokens (empty on the final item of an abort)
    finished: bool
    finish_reason: str | None       # "stop" | "length" | "abort" once finished
    num_cached_tokens: int          # prompt tokens served from the prefix cache (local prefill)


@dataclass(frozen=True)
class Heartbeat(Message):
    """Sent on a token stream that has been quiet for a while (a long prefill): alive, and how far."""
    steps: int                      # the worker's engine steps so far: rises while it works
