"""An instance's KV cache tiers below its device prefix cache: host memory and disk. Pure Python.

As the real workers' tiers (kv_transfer/tiers/): every block the device cache evicts is written to
each tier (write-through below the device: the disk holds what the host holds and more); a block a
tier already holds is only touched. Each tier is an LRU of `capacity` blocks (the real TierIndex is
a segmented LRU: loaded blocks protected; here a hit makes the block the most recent), and logs its
changes as ("stored" | "removed", hashes, tier) in the device cache's event log, so one worker's
events carry one sequence as a real BlockEventLog's do. Writes cost nothing on the simulated clock
(the real write-behind copies out on a side stream and writes from a thread); loads cost
bytes / the tier's bandwidth, charged by the instance (sim/instances.py) before the step that uses
them: serially, an upper bound (the real host loads, and disk loads on a decode worker, go layer
by layer under the step's compute; RESULTS "KV cache tiers" measured how much stays exposed).

`lookup(hashes, start, stop)` walks on from the device prefix as the real load-back does
(LoadBack.external_tokens): blocks [start, stop) while a tier holds the next one, each served by the
faster tier holding it (host, else disk). Shapes: hashes are chain hashes, one per prompt block.
"""
from __future__ import annotations

from collections import OrderedDict

TIER_NAMES = ("host", "disk")          # fastest first


class TierLRU:
    """One lower tier: an LRU of at most `capacity` blocks; log(kind, hashes, tier) records changes."""

    def __init__(self, name: str, capacity_blocks: int, log):
        if capacity_blocks < 0:
            raise ValueError(f"{name} tier capacity must be >= 0 blocks, got {capacity_blocks}")
        self.name, self.capacity, self._log = name, capacity_blocks, log
        self._lru: OrderedDict[int, None] = OrderedDict()      # oldest first

    def __contains__(self, h: int) -> bool:
        return h in self._lru

    def __len__(self) -> int:
        return len(self._lru)

    def store(self, hashes) -> None:
        """Write these blocks (the most recent now); evict the least recently used past capacity."""
        new = []
        for h in hashes:
            if h in self._lru:
                self._lru.move_to_end(h)
            elif self.capacity:
                self._lru[h] = None
                new.append(h)
        if new:
            self._log("stored", new, self.name)
        gone = []
        while len(self._lru) > self.capacity:
            gone.append(self._lru.popitem(last=False)[0])
        if gone:
            self._log("removed", gone, self.name)

    def touch(self, h: int) -> None:
        self._lru.move_to_end(h)


class TierStack:
    """The lower tiers of one instance (host, disk; a 0-block one is left out) and their load rates.

    load_bps: {tier: KV bytes/s one load moves back into the device pool}; block_bytes: KV bytes of
    one block in the pool's layout (what the router's cost model prices)."""

    def __init__(self, capacity_blocks: dict[str, int], load_bps: dict[str, float], block_bytes: int, log):
        self.tiers = [TierLRU(n, capacity_blocks[n], log) for n in TIER_NAMES if capacity_blocks.get(n, 0) > 0]
        for t in self.tiers:
            if load_bps.get(t.name, 0) <= 0:
                raise ValueError(f"{t.name} tier needs a load bandwidth > 0 bytes/s")
        self.load_bps, self.block_bytes = load_bps, block_bytes

    def evicted(self, hashes) -> None:
        """The device cache dropped these blocks: written behind into every tier."""
        for t in self.tiers:
            t.store(hashes)

    def lookup(self, hashes, start: int, stop: int, names=TIER_NAMES) -> dict[str, int]:
        """Blocks [start, stop) served from the tiers in `names`, by tier ({"host": n, "disk": m}),
        stopping at the first block none of them holds; those blocks become their tiers' most recent."""
        got = dict.fromkeys(TIER_NAMES, 0)
        tiers = [t for t in self.tiers if t.name in names]
        for h in hashes[start:stop]:
            t = next((t for t in tiers if h in t), None)
            if t is None:
                break
            t.touch(h)
            got[t.name] += 1
        return got

    def load_s(self, got: dict[str, int]) -> dict[str, float]:
        """Seconds each tier takes to load `got` blocks back (bytes / the tier's bandwidth)."""
        return {n: got[n] * self.block_bytes / self.load_bps[n] for n in TIER_NAMES if got.get(n)}
