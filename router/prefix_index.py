"""Global prefix index: which worker holds which KV block (by chain hash). Pure Python.

Workers publish their block pool's events (`engine.block_pool.BlockPool(on_event=...)`):
("stored" | "removed", [chain hashes], tier), each numbered by a per-worker sequence number. Because a
chain hash names its whole prefix (`engine.hashing`), "worker w holds hashes[0..n)" means w can
skip the first n blocks of the prompt; the tenant's cache salt is inside every hash, so prompts of
different tenants never match each other's blocks.

Tiers: an event's tier is "device" (the worker's KV pool), "host" or "disk" (its lower cache tiers,
which load a block back into the pool). One (worker, hash) may be in several tiers at once; each
tier's events add and remove it there only. `match` answers from the device tier alone (the
prefix the pool can skip without loading anything); `match_tiers` walks the chain as a worker
serves it: its device prefix (the pool's own lookup), then on while the next block is in a lower
tier, each counted in the faster one holding it (host, else disk); a block held only on device past
the device prefix ends the hit there (the pool's lookup stopped before it). TierHits(device, host,
disk) says how many blocks come free and how many each lower tier must load.
Memory: device entries are kept as before (a hash's holder set + the worker's hash set); a lower-tier
entry costs one slot in its hash's {worker: tier bits} dict and one in the worker's lower-tier set.

Exactness and how it degrades (the documented choice)
- A worker is EXACT while its events arrive in order (seq = last + 1) and it was heard from (an
  event or a heartbeat) within `silent_after_s`.
- It turns APPROXIMATE when
    * it goes silent (nothing for > silent_after_s): stale since its last message, or
    * a sequence gap shows events were lost (an event or heartbeat with seq > last + 1): stale
      since the gap was seen, until `resync(w, all_hashes, seq)` replaces its entries.
  Its entries stay in the index and still answer `match`, but `confidence(w)` = exp(-age / tau_s)
  (age = seconds stale) discounts them; the cost model multiplies the cached-token estimate by it.
  Events that arrive after a gap are still applied (they are true), the worker just stays
  approximate until resynced.
- Past `horizon_s` stale its confidence is 0, and `expire(now)` (call it from the status loop)
  drops its entries outright: it then counts as holding nothing, which only under-promises, and
  `needs_resync()` lists it until a resync arrives.
- Placements run ahead of events: `expect(w, hashes)` (the router, when it sends a prompt to w)
  counts w as holding those blocks at once, tentatively, so the next prompts with the same prefix
  follow it instead of racing to other workers while the first one prefills and the status poll
  has not reported its blocks yet. A "stored" event confirms a tentative block, "removed" drops
  it, and `expire` drops what no event confirmed within `expect_ttl_s`. A placement that fails or
  is abandoned before the worker computes them takes its expectation back: `expect` returns a claim
  ({hash: the tentative entry's generation}) and `unexpect(w, claim)` withdraws it. Each expectation
  of a still-tentative entry is counted, and the entry goes when the last is withdrawn; a claim never
  touches an entry made after its own (the first confirmed, removed or expired, a newer one expected).
Time is the caller's clock (`now`, default time.time()); single-threaded (the router's event loop).

Kept across queries, for placement at fleet scale (router/placement/cost_vector.py):
- `match_levels(hashes)`: match() over every worker, as levels (n, frozenset of the workers whose
  match is n), from a memo of walk steps keyed by chain hash: the step at hash h holds the workers
  holding every block up to h, and is dropped whenever h's holder set changes; a step is reused only
  if the step it was built on is the one the walk just used (so a change at block i invalidates
  every later step of its chains). A popular prefix held by most workers costs dict lookups, not
  set intersections, once walked.
- `inexact(now)`: the workers whose confidence is below 1, without a pass over all workers: those
  with a gap or dropped entries (a set), and the silent ones, found from the front of the workers
  kept in order of when they were last heard (a full pass only while callers' clocks go backwards).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterable, Mapping, NamedTuple

TIERS = ("device", "host", "disk")
_LOWER_BIT = {"host": 1, "disk": 2}             # bits of a lower-tier entry's mask
_EMPTY: frozenset = frozenset()


class TierHits(NamedTuple):
    """A worker's cached prefix of a prompt, in blocks, by the tier each block is served from."""
    device: int = 0
    host: int = 0
    disk: int = 0

    @property
    def total(self) -> int:
        return self.device + self.host + self.disk


_NO_HITS = TierHits()
_MAX_STEPS = 1 << 17                            # memoized walk steps; past it the memo starts over


class _Step:
    """One memoized block of match_levels' walk: `alive` hold every block up to and including this
    one (their match is >= n); `dropped` held every block before it but not this one (match n - 1)."""
    __slots__ = ("parent", "alive", "dropped", "n", "levels")

    def __init__(self, parent, alive: frozenset, dropped: frozenset, n: int):
        self.parent, self.alive, self.dropped, self.n, self.levels = parent, alive, dropped, n, None


@dataclass
class WorkerIndexState:
    last_seq: int | None = None      # last applied event's seq (None: unnumbered so far)
    last_heard: float = 0.0          # time of the last event or heartbeat
    gap_since: float | None = None   # time a sequence gap was seen (None: no gap since the last resync)
    dropped: bool = False            # entries dropped after the horizon (until a resync)


class PrefixIndex:
    def __init__(self, silent_after_s: float = 5.0, tau_s: float = 30.0, horizon_s: float = 300.0,
                 expect_ttl_s: float = 30.0):
        if silent_after_s < 0 or tau_s <= 0 or horizon_s < 0 or expect_ttl_s < 0:
            raise ValueError("silent_after_s, horizon_s and expect_ttl_s must be >= 0 and tau_s > 0")
        self.silent_after_s, self.tau_s, self.horizon_s = silent_after_s, tau_s, horizon_s
        self.expect_ttl_s = expect_ttl_s
        self._tentative: dict[str, dict[int, float]] = {}   # worker -> {hash: expiry} not yet confirmed
        self._shared: dict[str, dict[int, int]] = {}   # worker -> {tentative hash: expectations beyond the first}
        self._born: dict[str, dict[int, int]] = {}     # worker -> {tentative hash: generation (the expect call
        self._expects = 0                              #   that made the entry: claims name it)}
        self._holders: dict[int, set[str]] = {}       # chain hash -> workers holding it on device
        self._by_worker: dict[str, set[int]] = {}     # worker -> chain hashes it holds on device
        self._lower: dict[int, dict[str, int]] = {}   # chain hash -> {worker: _LOWER_BIT mask}, mask != 0
        self._lower_by_worker: dict[str, set[int]] = {}   # worker -> chain hashes in its lower tiers
        self._state: dict[str, WorkerIndexState] = {}
        self._steps: dict[int, _Step] = {}            # match_levels' memo (see the module doc)
        self._marked: set[str] = set()                # workers with a gap or dropped entries
        self._heard: dict[str, float] = {}            # worker -> last_heard, in the order of those writes
        self._heard_max = -math.inf                   # the latest last_heard written
        self._heard_sorted = True                     # _heard is in non-decreasing last_heard order

    # events
    def add_worker(self, worker_id: str, now: float | None = None) -> None:
        """Know a worker (holding nothing yet); idempotent."""
        if worker_id not in self._state:
            t = _now(now)
            self._state[worker_id] = WorkerIndexState(last_heard=t)
            self._heard_at(worker_id, t)
            self._by_worker[worker_id] = set()

    def apply(self, worker_id: str, kind: str, hashes: Iterable[int], seq: int | None = None,
              now: float | None = None, tier: str = "device") -> bool:
        """Apply one block event of `tier`. seq: the worker's event number, 1, 2, ... from its start
        (or from the seq of the last resync); an old or repeated seq is ignored (returns False), a
        jump marks the worker approximate. Returns True if applied."""
        if kind not in ("stored", "removed"):
            raise ValueError(f"unknown block event kind {kind!r}")
        if tier != "device" and tier not in _LOWER_BIT:
            raise ValueError(f"unknown cache tier {tier!r}; one of {', '.join(TIERS)}")
        t = _now(now)
        self.add_worker(worker_id, t)
        st = self._state[worker_id]
        st.last_heard = t
        self._heard_at(worker_id, t)
        if seq is not None:
            if st.last_seq is not None and seq <= st.last_seq:
                return False
            expected = 1 if st.last_seq is None else st.last_seq + 1
            if seq > expected and st.gap_since is None:
                st.gap_since = t
                self._marked.add(worker_id)
            st.last_seq = seq
        if tier != "device":
            self._apply_lower(worker_id, kind, hashes, _LOWER_BIT[tier])
            return True
        mine, tentative, steps = self._by_worker[worker_id], self._tentative.get(worker_id, {}), self._steps
        if tentative:
            hashes = list(hashes)
            shared, born = self._shared.get(worker_id, {}), self._born.get(worker_id, {})
            for h in hashes:
                shared.pop(h, None)             # confirmed or removed: no longer anyone's to take back
                born.pop(h, None)
        if kind == "stored":
            for h in hashes:
                tentative.pop(h, None)          # confirmed
                if h not in mine:
                    mine.add(h)
                    self._holders.setdefault(h, set()).add(worker_id)
                    steps.pop(h, None)
        else:
            for h in hashes:
                tentative.pop(h, None)
                if h in mine:
                    mine.discard(h)
                    self._unhold(h, worker_id)
        return True

    def _apply_lower(self, worker_id: str, kind: str, hashes: Iterable[int], bit: int) -> None:
        mine = self._lower_by_worker.setdefault(worker_id, set())
        for h in hashes:
            entry = self._lower.get(h)
            if kind == "stored":
                if entry is None:
                    entry = self._lower[h] = {}
                entry[worker_id] = entry.get(worker_id, 0) | bit
                mine.add(h)
            elif entry is not None and worker_id in entry:
                mask = entry[worker_id] & ~bit
                if mask:
                    entry[worker_id] = mask
                else:
                    del entry[worker_id]
                    mine.discard(h)
                    if not entry:
                        del self._lower[h]

    def expect(self, worker_id: str, hashes: Iterable[int], now: float | None = None) -> dict[int, int]:
        """A prompt with these chain hashes was just sent to worker_id, which will cache its blocks:
        count them as held now, tentatively, until an event confirms or removes them or
        expect_ttl_s passes. Returns the claim unexpect() takes: {hash: generation} of the tentative
        entries this call counted (none for blocks the worker holds confirmed)."""
        t = _now(now)
        if worker_id not in self._state:
            self.add_worker(worker_id, t)
        mine = self._by_worker[worker_id]
        tentative = self._tentative.get(worker_id)
        if tentative is None:
            tentative = self._tentative[worker_id] = {}
        # set operations (no Python step per held block); the worker's big hash set is probed only
        # for the blocks not still tentative (tentative is a subset of mine)
        expiry, hs = t + self.expect_ttl_s, set(hashes)
        self._expects += 1
        gen, born = self._expects, self._born.setdefault(worker_id, {})
        claim = {}
        still = tentative.keys() & hs if tentative else _EMPTY
        if still:
            tentative.update(dict.fromkeys(still, expiry))      # still tentative: expiry moves
            shared = self._shared.setdefault(worker_id, {})
            for h in still:
                shared[h] = shared.get(h, 0) + 1
                claim[h] = born[h]
        new = (hs - still if still else hs) - mine
        if new:
            holders, steps = self._holders, self._steps
            for h in new:
                s = holders.get(h)
                if s is None:
                    holders[h] = {worker_id}
                else:
                    s.add(worker_id)
                steps.pop(h, None)
            mine |= new
            tentative.update(dict.fromkeys(new, expiry))
            fresh = dict.fromkeys(new, gen)
            born.update(fresh)
            claim.update(fresh)
        return claim

    def unexpect(self, worker_id: str, claim: Mapping[int, int]) -> None:
        """Withdraw one expect(worker_id, ...)'s claim: its prompt will not be computed there (the
        placement failed or was abandoned). An entry goes once every expectation of it is withdrawn;
        a block an event confirmed, and an entry made after the claim's, stay."""
        tentative = self._tentative.get(worker_id)
        if not tentative:
            return
        shared, born, mine = self._shared.get(worker_id, {}), self._born[worker_id], self._by_worker[worker_id]
        for h, g in claim.items():
            if born.get(h) != g:
                continue                        # confirmed, removed or expired since, or a newer entry
            n = shared.get(h)
            if n:
                if n > 1:
                    shared[h] = n - 1
                else:
                    del shared[h]
                continue
            del tentative[h]
            del born[h]
            if h in mine:
                mine.discard(h)
                self._unhold(h, worker_id)

    def heartbeat(self, worker_id: str, seq: int | None = None, now: float | None = None) -> None:
        """The worker is alive; seq = the number of its latest event (all events up to it were sent).
        A seq beyond the last applied one means events were lost: approximate until resync."""
        t = _now(now)
        self.add_worker(worker_id, t)
        st = self._state[worker_id]
        st.last_heard = t
        self._heard_at(worker_id, t)
        if seq is not None:
            if st.last_seq is None:
                if seq > 0 and st.gap_since is None:   # events before we knew it are missing
                    st.gap_since = t
                    self._marked.add(worker_id)
                st.last_seq = seq
            elif seq > st.last_seq:
                if st.gap_since is None:
                    st.gap_since = t
                    self._marked.add(worker_id)
                st.last_seq = seq

    def resync(self, worker_id: str, all_hashes: Iterable[int], seq: int | None = None,
               now: float | None = None, lower: Mapping[str, Iterable[int]] | None = None) -> None:
        """Replace the worker's entries by a full snapshot taken at its event number `seq`
        (later events, seq + 1 on, apply on top): all_hashes on device, lower = {"host": [...],
        "disk": [...]} (a snapshot without it holds nothing in lower tiers). Clears the approximate state."""
        self._clear(worker_id)
        t = _now(now)
        self._state[worker_id] = WorkerIndexState(last_seq=seq, last_heard=t)
        self._heard_at(worker_id, t)
        self._marked.discard(worker_id)
        mine = self._by_worker[worker_id] = set(all_hashes)
        for h in mine:
            self._holders.setdefault(h, set()).add(worker_id)
            self._steps.pop(h, None)
        for tier, hashes in (lower or {}).items():
            if tier not in _LOWER_BIT:
                raise ValueError(f"unknown lower cache tier {tier!r}; one of host, disk")
            self._apply_lower(worker_id, "stored", hashes, _LOWER_BIT[tier])

    def remove_worker(self, worker_id: str) -> None:
        self._clear(worker_id)
        self._state.pop(worker_id, None)
        self._heard.pop(worker_id, None)
        self._marked.discard(worker_id)
        self._by_worker.pop(worker_id, None)
        self._lower_by_worker.pop(worker_id, None)

    # freshness
    def stale_age(self, worker_id: str, now: float | None = None) -> float:
        """Seconds the worker's entries have been approximate (0.0 = exact). Unknown: inf."""
        st = self._state.get(worker_id)
        if st is None:
            return math.inf
        t = _now(now)
        age = 0.0
        if t - st.last_heard > self.silent_after_s:
            age = t - st.last_heard
        if st.gap_since is not None:
            age = max(age, t - st.gap_since)
        return age

    def is_exact(self, worker_id: str, now: float | None = None) -> bool:
        st = self._state.get(worker_id)
        return (st is not None and not st.dropped and st.gap_since is None
                and _now(now) - st.last_heard <= self.silent_after_s)

    def confidence(self, worker_id: str, now: float | None = None) -> float:
        """1.0 when exact; exp(-age / tau_s) when approximate; 0.0 past the horizon (or unknown).
        Entries kept after a horizon drop are all true (a subset of the worker's cache), so they are
        trusted again once the worker is heard from in order."""
        age = self.stale_age(worker_id, now)
        if age > self.horizon_s:
            return 0.0
        return math.exp(-age / self.tau_s) if age > 0 else 1.0

    def expire(self, now: float | None = None) -> list[str]:
        """Drop tentative entries no event confirmed in time, and the entries of workers stale past
        the horizon; returns the workers dropped now."""
        t = _now(now)
        for w, tentative in self._tentative.items():
            shared, born = self._shared.get(w, {}), self._born.get(w, {})
            for h in [h for h, expiry in tentative.items() if expiry < t]:
                del tentative[h]
                shared.pop(h, None)
                born.pop(h, None)
                if h in self._by_worker.get(w, ()):
                    self._by_worker[w].discard(h)
                    self._unhold(h, w)
        out = []
        for w, st in self._state.items():
            if not st.dropped and self.stale_age(w, t) > self.horizon_s:
                self._clear(w)
                st.dropped = True
                self._marked.add(w)
                out.append(w)
        return out

    def needs_resync(self) -> list[str]:
        """Workers whose entries are known to be wrong (a sequence gap, or dropped), sorted."""
        return sorted(w for w, st in self._state.items() if st.gap_since is not None or st.dropped)

    # queries
    @property
    def workers(self) -> list[str]:
        return sorted(self._state)

    def num_blocks(self, worker_id: str, tier: str = "device") -> int:
        """Blocks the worker holds in `tier` ("device", "host", "disk"; "lower": host or disk)."""
        if tier == "device":
            return len(self._by_worker.get(worker_id, ()))
        lower = self._lower_by_worker.get(worker_id, ())
        if tier == "lower":
            return len(lower)
        bit = _LOWER_BIT[tier]
        return sum(1 for h in lower if self._lower[h][worker_id] & bit)

    @property
    def has_lower_tiers(self) -> bool:
        """Some worker holds blocks in a host or disk tier (match_tiers then differs from match)."""
        return bool(self._lower)

    def num_hashes(self) -> int:
        """Distinct chain hashes held on device by any worker."""
        return len(self._holders)

    def tiers_of(self, worker_id: str, block_hash: int) -> frozenset[str]:
        """The tiers in which worker_id holds the block."""
        out = {"device"} if worker_id in self._holders.get(block_hash, ()) else set()
        mask = self._lower.get(block_hash, {}).get(worker_id, 0)
        return frozenset(out | {t for t, b in _LOWER_BIT.items() if mask & b})

    def first_pending(self, worker_id: str, hashes: list[int], n: int) -> int:
        """The index of the first of hashes[:n] worker_id holds only tentatively (expected, not computed
        yet); n if none."""
        tentative = self._tentative.get(worker_id)
        if tentative:
            for i in range(min(n, len(hashes))):
                if hashes[i] in tentative:
                    return i
        return n

    def pending(self, worker_id: str) -> frozenset[int]:
        """Blocks counted for worker_id only tentatively (expect()ed, no event confirmed them yet)."""
        return frozenset(self._tentative.get(worker_id, ()))

    def holders(self, block_hash: int) -> frozenset[str]:
        return frozenset(self._holders.get(block_hash, ()))

    def match(self, hashes: Iterable[int], workers: Iterable[str] | None = None) -> dict[str, int]:
        """Longest cached prefix (in blocks) of a prompt with these chain hashes, on every known
        worker (or only `workers`) at once: one walk over the hashes, intersecting holder sets,
        stopping as soon as no worker holds the next block."""
        want = self._state.keys() if workers is None else list(workers)
        out = dict.fromkeys(want, 0)
        alive = set(out)
        n = 0
        for h in hashes:
            holders = self._holders.get(h)
            if not holders:
                break
            nxt = alive & holders
            for w in alive - nxt:
                out[w] = n
            alive = nxt
            if not alive:
                break
            n += 1
        for w in alive:
            out[w] = n
        return out

    def match_levels(self, hashes: Iterable[int]) -> tuple[tuple[int, frozenset], ...]:
        """match() over every known worker, as levels: ((n, workers whose match is n), ...), n >= 1
        descending; workers matching nothing are left out. Memoized walk steps (see the module doc)."""
        steps, holders_of = self._steps, self._holders
        prev = None
        for h in hashes:
            st = steps.get(h)
            if st is None or st.parent is not prev:
                holders = holders_of.get(h)
                if not holders:
                    break
                if prev is None:
                    st = _Step(None, frozenset(holders), _EMPTY, 1)
                else:
                    alive = prev.alive & holders
                    if not alive:
                        break
                    if len(alive) == len(prev.alive):       # nobody left: share the set
                        st = _Step(prev, prev.alive, _EMPTY, prev.n + 1)
                    else:
                        st = _Step(prev, alive, prev.alive - alive, prev.n + 1)
                if len(steps) >= _MAX_STEPS:
                    steps.clear()
                steps[h] = st
            prev = st
        if prev is None:
            return ()
        if prev.levels is None:
            out, s = [(prev.n, prev.alive)], prev
            while s.parent is not None:
                if s.dropped:
                    out.append((s.n - 1, s.dropped))
                s = s.parent
            prev.levels = tuple(out)
        return prev.levels

    def inexact(self, now: float | None = None) -> dict[str, float]:
        """{worker: confidence(worker)} for every known worker whose confidence is below 1.0 (the
        rest are exact); without a pass over all workers while the callers' clock runs forward."""
        t = _now(now)
        out = {}
        for w in self._marked:
            c = self.confidence(w, t)
            if c != 1.0:
                out[w] = c
        if not self._heard_sorted:          # a clock went back: sort once, then keep in order again
            self._heard = dict(sorted(self._heard.items(), key=lambda kv: kv[1]))
            self._heard_max = max(self._heard.values(), default=-math.inf)
            self._heard_sorted = True
        silent = self.silent_after_s
        for w, heard in self._heard.items():
            if not t - heard > silent:      # stale_age's test; later entries were heard later
                break
            if w not in out:
                c = self.confidence(w, t)
                if c != 1.0:
                    out[w] = c
        return out

    def match_tiers(self, hashes: Iterable[int], workers: Iterable[str] | None = None) -> dict[str, TierHits]:
        """Each worker's cached prefix by tier (see the module doc), in one walk over the hashes:
        `on_dev` are the workers still in their device prefix, `on_low` those past it and served
        from host or disk. Without lower-tier entries it is match()."""
        if not self._lower:
            return {w: TierHits(n) if n else _NO_HITS for w, n in self.match(hashes, workers).items()}
        want = self._state.keys() if workers is None else list(workers)
        total = dict.fromkeys(want, 0)
        device: dict[str, int] = {}
        host: dict[str, int] = {}
        on_dev, on_low = set(total), set()
        n = 0                                       # blocks walked so far
        for h in hashes:
            stay = on_dev & self._holders.get(h, _EMPTY)
            left = on_dev - stay
            for w in left:
                device[w] = n                       # its device prefix ends before block n
            lower = self._lower.get(h)
            tried = on_low | left
            on_dev, on_low = stay, {w for w in tried if w in lower} if lower else set()
            for w in tried - on_low:
                total[w] = n                        # its hit ends before block n
            for w in on_low:
                if lower[w] & 1:
                    host[w] = host.get(w, 0) + 1
            if not on_dev and not on_low:
                break
            n += 1
        for w in on_dev:
            device[w] = total[w] = n
        for w in on_low:
            total[w] = n
        return {w: TierHits(device[w], host.get(w, 0), t - device[w] - host.get(w, 0)) if t else _NO_HITS
                for w, t in total.items()}

    def match_weighted(self, hashes: Iterable[int], workers: Iterable[str] | None = None,
                       now: float | None = None) -> dict[str, float]:
        """match() times confidence(w): the expected number of reusable blocks per worker."""
        t = _now(now)
        out = dict.fromkeys(self._state.keys() if workers is None else workers, 0.0)
        levels = self.match_levels(hashes)       # the memoized walk; confidence only where below 1
        if levels:
            inexact = self.inexact(t)
            for n, ws in levels:
                for w in ws & out.keys():
                    c = inexact.get(w)
                    out[w] = n * (1.0 if c is None else c)
        return out

    # internals
    def _heard_at(self, worker_id: str, t: float) -> None:
        """Record last_heard = t in _heard's order (see inexact)."""
        self._heard.pop(worker_id, None)
        self._heard[worker_id] = t
        if t >= self._heard_max:
            self._heard_max = t
        else:
            self._heard_sorted = False

    def _unhold(self, h: int, worker_id: str) -> None:
        self._steps.pop(h, None)
        s = self._holders.get(h)
        if s is not None:
            s.discard(worker_id)
            if not s:
                del self._holders[h]

    def _clear(self, worker_id: str) -> None:
        self._tentative.pop(worker_id, None)
        self._shared.pop(worker_id, None)
        self._born.pop(worker_id, None)
        for h in self._by_worker.get(worker_id, ()):
            self._unhold(h, worker_id)
        if worker_id in self._by_worker:
            self._by_worker[worker_id] = set()
        for h in self._lower_by_worker.pop(worker_id, ()):
            entry = self._lower[h]
            del entry[worker_id]
            if not entry:
                del self._lower[h]


def _now(now: float | None) -> float:
    return time.time() if now is None else now
