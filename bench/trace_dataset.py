"""Mooncake-format trace replay (`--dataset mooncake:PATH`), scaled to fit a small machine. Pure Python + numpy.

A trace line is {"timestamp": ms from the trace's start, "input_length": tokens, "output_length": tokens,
"hash_ids": [ids of the prompt's 512-token blocks]} (the Mooncake FAST'25 release's format). Equal ids
at the same position name the same prefix, so a replay must give them identical tokens.

Scaling (`TraceScale`):
  - each 512-token trace block becomes `token_scale` engine blocks of `block_size` tokens, i.e.
    B = token_scale * block_size tokens: the length factor is s = B / 512;
  - block j of a prompt is the B tokens of its hash id (`block_tokens`): a pure function of
    (seed, hash id), so equal ids give identical token blocks (whatever prompt they are in) and
    different ids give different blocks; whole trace blocks stay whole engine blocks, so the
    engine's prefix cache sees exactly the trace's reuse;
  - the last (partial) trace block keeps round(its tokens * s) tokens, at least 1 and at most B:
    a prefix of its hash id's block;
  - output tokens = max(1, round(output_length * output_scale)); output_scale defaults to s;
  - arrival = (timestamp - first replayed timestamp) / 1000 * time_scale seconds (0.5 replays
    twice as fast);
  - `start` skips that many trace lines, `max_requests` caps the replay (None: to the end);
  - `conversation_sample` K > 1 keeps whole conversations, one in K, so that a short replay still
    sees the trace's reuse (its turns come minutes apart: the first 48 lines share only the system
    prompt's block, while 48 requests sampled 1 in 40 from the first 2000 lines reuse 22% of their
    blocks). A request's conversation key is its second hash id (its first, a one-block prompt's):
    the trace's prompts open with shared system-prompt blocks, and a later turn resends the
    earlier ones. Kept: key % K == 0.
Tokens are drawn uniformly from `ordinary_ids` (the vocabulary without the tokenizer's special
and added tokens), by a counter-based hash (splitmix64 of seed, hash id, position): no state, so a
slice replays the same tokens as the whole trace.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from pdcluster.sim.trace import TraceLine, parse_line

TRACE_BLOCK_TOKENS = 512        # tokens per hash id in the Mooncake traces

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True)
class TraceScale:
    block_size: int = 16                # engine tokens per KV block (CacheConfig.block_size)
    token_scale: int = 1                # engine blocks per 512-token trace block
    output_scale: float | None = None   # output tokens per trace output token (None: the length factor)
    time_scale: float = 1.0             # replay seconds per trace second
    start: int = 0                      # trace lines skipped
    max_requests: int | None = None     # requests replayed (None: all after start)
    conversation_sample: int = 1        # keep 1 conversation in this many (see the module doc)
    seed: int = 0                       # picks the tokens of every hash id

    def __post_init__(self):
        if self.block_size < 1 or self.token_scale < 1:
            raise ValueError(f"block_size and token_scale must be >= 1, got {self.block_size}, {self.token_scale}")
        if self.output_scale is not None and self.output_scale <= 0:
            raise ValueError(f"output_scale must be > 0, got {self.output_scale}")
        if self.time_scale < 0:
            raise ValueError(f"time_scale must be >= 0, got {self.time_scale}")
        if self.conversation_sample < 1:
            raise ValueError(f"conversation_sample must be >= 1, got {self.conversation_sample}")
        if self.start < 0 or (self.max_requests is not None and self.max_requests < 1):
            raise ValueError(f"start must be >= 0 and max_requests >= 1, got {self.start}, {self.max_requests}")

    @property
    def block_tokens(self) -> int:
        """Tokens of one scaled trace block."""
        return self.token_scale * self.block_size

    @property
    def length_factor(self) -> float:
        return self.block_tokens / TRACE_BLOCK_TOKENS

    @property
    def output_factor(self) -> float:
        return self.length_factor if self.output_scale is None else self.output_scale


@dataclass(frozen=True)
class TraceRequest:
    """One replayed request: its prompt, max output tokens and send time (s from the first)."""
    prompt_ids: list[int]
    output_len: int
    arrival_s: float
    hash_ids: tuple[int, ...]


def ordinary_ids(vocab_size: int, reserved: Iterable[int] = ()) -> np.ndarray:
    """Token ids 0..vocab_size-1 without `reserved` (special / added tokens), as an int64 array."""
    keep = np.ones(vocab_size, dtype=bool)
    bad = [i for i in reserved if 0 <= i < vocab_size]
    keep[bad] = False
    out = np.flatnonzero(keep)
    if out.size == 0:
        raise ValueError("no ordinary token ids to draw from")
    return out


def _splitmix64(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def block_tokens(hash_id: int, n: int, ids: np.ndarray, seed: int = 0) -> list[int]:
    """The first n tokens of trace block `hash_id`: a pure function of (seed, hash_id, position)."""
    if hash_id < 0:
        raise ValueError(f"hash ids must be >= 0, got {hash_id}")
    with np.errstate(over="ignore"):
        key = _splitmix64(np.uint64(seed & (2**64 - 1)) * _GOLDEN + np.uint64(hash_id & (2**64 - 1)))
        pos = np.arange(1, n + 1, dtype=np.uint64)
        z = _splitmix64(key ^ (pos * _GOLDEN))
    return ids[(z % np.uint64(ids.size)).astype(np.int64)].tolist()


def conversation_key(hash_ids: list[int]) -> int:
    return hash_ids[1] if len(hash_ids) > 1 else hash_ids[0]


def read_trace(path: str, start: int = 0, max_requests: int | None = None,
               conversation_sample: int = 1) -> list[TraceLine]:
    """The first max_requests lines from line `start` of a Mooncake JSONL trace whose conversation is
    sampled (conversation_key % conversation_sample == 0), checked."""
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i < start or not line.strip():
                continue
            if max_requests is not None and len(out) >= max_requests:
                break
            r = parse_line(line, f"{path}:{i + 1}")
            ts, n_in, n_out, ids = r.timestamp_ms, r.input_length, r.output_length, r.hash_ids
            if -(-n_in // TRACE_BLOCK_TOKENS) != len(ids):
                raise ValueError(f"{path}:{i + 1}: input_length {n_in} does not fill {len(ids)} blocks of "
                                 f"{TRACE_BLOCK_TOKENS} tokens")
            if conversation_sample > 1 and conversation_key(ids) % conversation_sample:
                continue
            if out and ts < out[-1].timestamp_ms:
                raise ValueError(f"{path}:{i + 1}: timestamp {ts:g} before the previous line's")
            out.append(r)
    if not out:
        raise ValueError(f"{path}: no trace lines from line {start + 1}")
    return out


def scale_rows(rows: list[TraceLine], scale: TraceScale, ids: np.ndarray) -> list[TraceRequest]:
    """The replayed requests of trace rows (already sliced by start / max_requests)."""
    b = scale.block_tokens
    cache: dict[int, list[int]] = {}        # hash id -> its B tokens (a trace repeats ids a lot)

    def block(h: int) -> list[int]:
        toks = cache.get(h)
        if toks is None:
            toks = cache[h] = block_tokens(h, b, ids, scale.seed)
        return toks

    t0 = rows[0].timestamp_ms
    out = []
    for row in rows:
        hs = row.hash_ids
        last = row.input_length - TRACE_BLOCK_TOKENS * (len(hs) - 1)     # 1..512 tokens
        last_n = min(b, max(1, round(last * scale.length_factor)))
        prompt = [t for h in hs[:-1] for t in block(h)] + block(hs[-1])[:last_n]
        out.append(TraceRequest(prompt, max(1, round(row.output_length * scale.output_factor)),
                                (row.timestamp_ms - t0) / 1000.0 * scale.time_scale, tuple(hs)))
    return out


def load_trace(path: str, scale: TraceScale, vocab_size: int, reserved_ids: Iterable[int] = ()) -> list[TraceRequest]:
    return scale_rows(read_trace(path, scale.start, scale.max_requests, scale.conversation_sample), scale,
                      ordinary_ids(vocab_size, reserved_ids))
