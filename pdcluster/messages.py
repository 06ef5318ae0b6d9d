"""Typed messages between the router and the workers: the one place their contract is written.

Frozen dataclasses of plain fields. They travel as Ray actor call arguments and results today;
`to_bytes` / `from_bytes` (msgpack) carry them over any other channel without pickle.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import msgpack

from pdcluster.engine.sampling_params import TokenLogprobs


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
    kv_address: str                 # its KV server: the one of the cluster's transport
    dst_id: str
    skip_blocks: int
    dst_block_ids: list[int]
    cached_tokens: int              # skip_blocks x block size

    def destination(self, address: str | None = None) -> KVDestination:
        return KVDestination(address or self.kv_address, self.dst_id, self.skip_blocks, self.dst_block_ids)


@dataclass(frozen=True)
class PullPlan(Message):
    """The router's plan for a peer pull (kv_transfer/pull.py): the worker that prefills a prompt
    fetches blocks [first_block, first_block + len(hashes)) of its prefix from `holder` instead of
    computing them. The puller checks `hashes` against its own salted chain hashes of the prompt, so a
    plan can only name the tenant's own blocks."""
    holder: str                     # worker id holding the blocks (any tier)
    holder_kv_address: str          # the holder's KV server, for logs and the link meter ("" unknown)
    first_block: int                # index of the first pulled block in the prompt
    hashes: list[int]               # their chain hashes, in order


@dataclass(frozen=True)
class PullOrder(Message):
    """What a puller asks a holder: send the blocks named by `hashes` into my reservation."""
    request_id: str                 # the puller's request: the reservation's id at its KV receiver
    hashes: list[int]               # chain hashes of the blocks, in prompt order
    address: str                    # the puller's KV server "host:port"
    dst_id: str                     # the puller's worker id (names the link in the bandwidth meter)
    dst_block_ids: list[int]        # the reservation, one block per hash


@dataclass(frozen=True)
class PullResult(Message):
    """A holder's answer to a PullOrder. ok False: nothing usable was sent (evicted, no transport,
    failed transfer); the puller recomputes."""
    ok: bool
    blocks: int = 0                 # blocks sent
    kv_bytes: int = 0               # payload bytes sent
    wall_ms: float = 0.0            # first frame to ack
    reason: str = ""


@dataclass(frozen=True)
class NoRoom(Message):
    """A decode worker's answer to reserve when its KV pool cannot hold the prompt now."""
    reason: str


def _logprobs(xs) -> tuple[TokenLogprobs, ...]:
    """TokenLogprobs from msgpack's dicts (or already built)."""
    return tuple(TokenLogprobs(**x) if isinstance(x, dict) else x for x in xs)


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
    first_logprobs: TokenLogprobs | None = None     # the first token's, when SamplingParams.logprobs asks
    prompt_logprobs: tuple[TokenLogprobs, ...] = ()  # prompt tokens 1.., when SamplingParams.prompt_logprobs asks

    def __post_init__(self):
        if isinstance(self.first_logprobs, dict):   # from msgpack
            object.__setattr__(self, "first_logprobs", TokenLogprobs(**self.first_logprobs))
        object.__setattr__(self, "prompt_logprobs", _logprobs(self.prompt_logprobs))


@dataclass(frozen=True)
class TokenItem(Message):
    """One item of a decode worker's token stream."""
    token_ids: list[int]            # new tokens (empty on the final item of an abort)
    finished: bool
    finish_reason: str | None       # "stop" | "length" | "abort" once finished
    num_cached_tokens: int          # prompt tokens served from the prefix cache (local prefill)
    logprobs: tuple[TokenLogprobs, ...] = ()       # one per token, when SamplingParams.logprobs asks
    prompt_logprobs: tuple[TokenLogprobs, ...] = ()  # the first item's: prompt tokens 1.. (SamplingParams asks)

    def __post_init__(self):
        object.__setattr__(self, "logprobs", _logprobs(self.logprobs))
        object.__setattr__(self, "prompt_logprobs", _logprobs(self.prompt_logprobs))

    @classmethod
    def concat(cls, items: list[TokenItem]) -> TokenItem:
        """Consecutive items of one stream as one: their tokens and logprobs in order, the last one's
        finish. Only the last may be finished."""
        if len(items) == 1:
            return items[0]
        if any(i.finished for i in items[:-1]):
            raise ValueError("a finished item can only be the last one")
        last = items[-1]
        return cls([t for i in items for t in i.token_ids], last.finished, last.finish_reason,
                   max(i.num_cached_tokens for i in items), tuple(lp for i in items for lp in i.logprobs),
                   items[0].prompt_logprobs)


@dataclass(frozen=True)
class Heartbeat(Message):
    """Sent on a token stream that has been quiet for a while (a long prefill): alive, and how far."""
    steps: int                      # the worker's engine steps so far: rises while it works


class Figures(Message):
    """Figures a producer keeps as a plain mapping (LLMEngine.figures(), BandwidthMeter.snapshot())."""

    @classmethod
    def of(cls, figures):
        """Its fields out of the mapping; other keys are ignored (the producer may report more)."""
        return cls(**{f.name: figures[f.name] for f in dataclasses.fields(cls) if f.name in figures})


@dataclass(frozen=True)
class EngineFigures(Figures):
    """An engine's KV pool, queue, prefix-cache and cumulative step counters (LLMEngine.figures()).
    Counters start at 0 with the worker process and only rise; seconds are busy forward-step time."""
    free_blocks: int = 0
    free_cached_blocks: int = 0     # of free_blocks, those holding a cached prefix block (a hit on one takes it)
    num_blocks: int = 0
    waiting_tokens: int = 0         # prompt tokens waiting in its scheduler
    prefix_hits: int = 0            # prompt tokens found in its prefix cache
    prefix_queries: int = 0         # prompt tokens looked up
    steps: int = 0
    tokens: int = 0
    busy_s: float = 0.0
    prefill_tokens: int = 0         # steps with any prompt chunk in them
    prefill_s: float = 0.0
    decode_steps: int = 0           # single-token decode steps only
    decode_seqs: int = 0            # sum of their batch sizes
    decode_s: float = 0.0
    # lower cache tiers: KV bytes loaded back into the device pool (the pool's layout, whatever the
    # tier stores) and the seconds those loads took (the router learns each tier's load rate)
    host_load_bytes: int = 0
    host_load_s: float = 0.0
    disk_load_bytes: int = 0
    disk_load_s: float = 0.0


@dataclass(frozen=True)
class LinkFigures(Figures):
    """One KV link as a prefill worker's bandwidth meter measured it (wire bytes, seconds since the epoch)."""
    src_id: str
    dst_id: str
    total_bytes: int = 0
    total_seconds: float = 0.0
    count: int = 0
    ewma_bytes_per_s: float = 0.0   # 0.0 until the first timed sample
    last_sample_time: float = 0.0


@dataclass(frozen=True)
class TierFigures(Figures):
    """One KV cache tier below a worker's device pool (kv_transfer/tiers/stats.py TierStats.as_dict()).
    Counters in blocks or bytes, cumulative; the histograms are cumulative counts per bucket (seconds,
    upper bounds; one more count for +Inf), as Prometheus exposes them."""
    tier: str                       # "host" | "disk"
    capacity_blocks: int = 0
    block_bytes: int = 0            # bytes one block takes there (compressed size)
    blocks: int = 0                 # held now
    hits: int = 0                   # blocks loaded back into the device pool
    load_failures: int = 0          # loads that failed (missing, corrupt): recomputed
    loaded_bytes: int = 0
    stored: int = 0                 # blocks written
    stored_bytes: int = 0
    store_failures: int = 0         # blocks a write failed to store (a full or failing disk)
    dropped: int = 0                # blocks never queued for the tiers (the writer's queue was full)
    evicted: int = 0                # blocks evicted by the tier's LRU
    corrupt: int = 0                # blocks found corrupt and dropped
    served: int = 0                 # blocks read out for peers' pulls
    served_bytes: int = 0
    buckets: list[float] = dataclasses.field(default_factory=list)
    load_counts: list[int] = dataclasses.field(default_factory=list)
    load_sum_s: float = 0.0
    store_counts: list[int] = dataclasses.field(default_factory=list)
    store_sum_s: float = 0.0
    serve_counts: list[int] = dataclasses.field(default_factory=list)   # per pull served from the tier
    serve_sum_s: float = 0.0


@dataclass(frozen=True)
class PullFigures(Figures):
    """A worker's peer pulls, as puller and as holder (kv_transfer/pull_stats.py PullStats.as_dict()).
    Cumulative; histograms as TierFigures'."""
    pulls: int = 0                  # pulls whose blocks all landed here
    pulled_blocks: int = 0
    pulled_bytes: int = 0
    pull_failures: int = 0          # pulls that failed here (the blocks were recomputed)
    buckets: list[float] = dataclasses.field(default_factory=list)
    pull_counts: list[int] = dataclasses.field(default_factory=list)    # seconds from order to landed
    pull_sum_s: float = 0.0
    served: int = 0                 # pulls this worker served as holder
    served_device_blocks: int = 0   # blocks it sent, by the tier they were read from
    served_host_blocks: int = 0
    served_disk_blocks: int = 0
    served_bytes: int = 0
    serve_failures: int = 0         # pulls it refused (blocks evicted, no transport) or failed to send
    serve_counts: list[int] = dataclasses.field(default_factory=list)   # seconds to read and send one
    serve_sum_s: float = 0.0


@dataclass(frozen=True)
class BlockEvent(Message):
    """One prefix-cache change on a worker, numbered in its BlockEventLog."""
    seq: int
    kind: str                       # "stored" | "removed"
    hashes: list[int]               # chain hashes
    tier: str = "device"            # "device" | "host" | "disk": the cache tier the change is in


@dataclass(frozen=True)
class CacheSnapshot(Message):
    """A worker's whole prefix cache at event number `seq`, by tier (the router's index resync).
    A worker may also answer (seq, device hashes): nothing in lower tiers."""
    seq: int
    device: list[int]
    host: list[int] = dataclasses.field(default_factory=list)
    disk: list[int] = dataclasses.field(default_factory=list)


@dataclass(frozen=True)
class WorkerStatus(Message):
    """A worker's answer to the router's status poll (its health check, load figures and index feed)."""
    worker_id: str
    role: str                       # "prefill" | "decode"
    incarnation: str                # the worker process's id: changes when Ray restarts it
    pid: int
    engine: EngineFigures
    block_seq: int | None = None    # last event number (None: events not drained by this call)
    block_events: tuple[BlockEvent, ...] = ()
    running: int = 0                # decode: requests in the running batch
    waiting: int = 0                # decode: requests waiting
    reserved: int = 0               # decode: reservations awaiting their KV
    kv_address: str = ""            # decode: its KV server of the cluster's transport
    in_flight: int = 0              # prefill: prefill calls in progress
    links: tuple[LinkFigures, ...] = ()     # prefill: its outgoing KV links
    tiers: tuple[TierFigures, ...] = ()     # its KV cache tiers below the device pool (none: off)
    pulls: PullFigures | None = None        # its peer pulls, both halves (None: an older worker)

    @classmethod
    def of(cls, worker_id: str, role: str, incarnation: str, pid: int, figures, drained=(None, ()),
           **extra) -> "WorkerStatus":
        """From a worker's plain figures: LLMEngine.figures() and a BlockEventLog.drain() (seq, events)."""
        seq, events = drained
        return cls(worker_id, role, incarnation, pid, EngineFigures.of(figures), seq,
                   tuple(BlockEvent(*e) for e in events), **extra)

    @classmethod
    def from_bytes(cls, data: bytes) -> "WorkerStatus":
        d = msgpack.unpackb(data, strict_map_key=True)
        return cls(**d | dict(engine=EngineFigures(**d["engine"]),
                              block_events=tuple(BlockEvent(**e) for e in d["block_events"]),
                              links=tuple(LinkFigures(**x) for x in d["links"]),
                              tiers=tuple(TierFigures(**x) for x in d.get("tiers", ())),
                              pulls=PullFigures(**d["pulls"]) if d.get("pulls") else None))
