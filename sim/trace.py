"""Mooncake traces (FAST'25 release, /work/shared/traces/README.md): one JSON request per line,
{timestamp ms, input_length, output_length, hash_ids over 512-token blocks}. Pure Python."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace

TRACE_BLOCK = 512           # tokens per hash id


@dataclass(frozen=True)
class Request:
    rid: int
    arrival_s: float
    input_len: int
    output_len: int
    hashes: tuple[int, ...]     # chain hashes of the prompt's full 512-token blocks


@dataclass(frozen=True)
class TraceLine:
    """One checked trace line, in the trace's units."""
    timestamp_ms: float
    input_length: int           # tokens, >= 1
    output_length: int          # tokens, >= 0
    hash_ids: list[int]         # one per 512-token block (the last may be partial), each >= 0


def parse_line(line: str, where: str) -> TraceLine:
    """A trace line, its types checked (numbers not bool, lengths whole, hash ids a list of ints);
    ValueError naming `where` (path:line) otherwise."""
    try:
        d = json.loads(line)
        ts, n_in, n_out, ids = d["timestamp"], d["input_length"], d["output_length"], d["hash_ids"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{where}: not a Mooncake trace line ({e})") from None
    if not _number(ts) or not all(_number(n) and n == int(n) for n in (n_in, n_out)):
        raise ValueError(f"{where}: timestamp, input_length and output_length must be numbers, lengths whole")
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"{where}: hash_ids must be a list of non-negative integers")
    if n_in < 1 or n_out < 0:
        raise ValueError(f"{where}: input_length must be >= 1 and output_length >= 0")
    return TraceLine(float(ts), int(n_in), int(n_out), ids)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf")


def chain(ids) -> tuple[int, ...]:
    """Chain hashes of a block id sequence: each names its whole prefix (equal ids at the same
    position after an equal prefix give equal hashes; Python's int-tuple hash is deterministic)."""
    out, parent = [], 0
    for i in ids:
        parent = hash((parent, i))
        out.append(parent)
    return tuple(out)


def load_trace(path: str, limit: int | None = None, start_s: float | None = None, duration_s: float | None = None,
               rate_scale: float = 1.0, length_scale: float = 1.0) -> list[Request]:
    """Requests arriving in [start_s, start_s + duration_s) of the trace (seconds; start_s None: the
    first line's timestamp), re-timed so the first one kept arrives at 0 (a file cut from the middle of a trace starts at once, as
    bench/trace_dataset.py replays it) and compressed by rate_scale (2.0 = twice the arrival rate);
    length_scale scales input and output lengths (hash blocks kept whole: a block covers
    512 * length_scale tokens, used to replay on a small model). Bad lines: ValueError naming the line."""
    if rate_scale <= 0 or length_scale <= 0:
        raise ValueError("rate_scale and length_scale must be > 0")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (got {limit})")
    out = []
    with open(path) as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = parse_line(line, f"{path}:{ln}")
            t, n_in, n_out, ids = r.timestamp_ms / 1000.0, r.input_length, r.output_length, r.hash_ids
            start_s = t if start_s is None else start_s
            if t < start_s or (duration_s is not None and t >= start_s + duration_s):
                continue
            n_in_s = max(1, round(n_in * length_scale))
            n_full = n_in // TRACE_BLOCK          # hash ids of full blocks only (the last may be partial)
            out.append(Request(len(out), t, n_in_s, max(1, round(n_out * length_scale)), chain(ids[:n_full])))
            if limit is not None and len(out) >= limit:
                break
    t0 = min((r.arrival_s for r in out), default=0.0)
    return [replace(r, arrival_s=(r.arrival_s - t0) / rate_scale) for r in out]


def warp(requests: list[Request], profile: list[tuple[float, float]]) -> list[Request]:
    """Re-time arrivals so the arrival rate is multiplied by m(t), piecewise linear through
    profile [(trace second, multiplier), ...] (flat beyond its ends): new time = integral of
    1 / m over the original time (a 3x stretch of the profile's time runs at 3x the rate)."""
    if not profile or any(m <= 0 for _, m in profile):
        raise ValueError("profile needs points with multipliers > 0")
    pts = sorted(profile)

    def m(t: float) -> float:
        if t <= pts[0][0]:
            return pts[0][1]
        for (t0, m0), (t1, m1) in zip(pts, pts[1:]):
            if t <= t1:
                return m0 + (m1 - m0) * (t - t0) / (t1 - t0)
        return pts[-1][1]

    out, tau, last, step = [], 0.0, 0.0, 1.0
    for r in sorted(requests, key=lambda r: r.arrival_s):
        while last < r.arrival_s:       # integrate 1/m in <= 1 s steps (midpoint rule)
            dt = min(step, r.arrival_s - last)
            tau += dt / m(last + dt / 2)
            last += dt
        out.append(Request(r.rid, tau, r.input_len, r.output_len, r.hashes))
    return out
