"""What the router knows of one worker: its load as placement, admission and the autoscaler read it."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(eq=False)
class WorkerLoad:
    """One live worker as the router knows it. Compared by identity (eq=False): two records are the
    same worker's only if they are one object, so a list of them compares with `==` at C speed
    (placement/cost_columns.py) and an equal-valued copy is never taken for the original."""
    worker_id: str
    role: str                       # "prefill" | "decode"
    in_flight: int = 0              # requests this router has on it now
    queued_tokens: int = 0          # prompt tokens this router sent and not yet finished (prefill)
    free_blocks: int = 0            # last reported (decode)
    free_cached_blocks: int = 0     # of free_blocks, those holding cached prefix blocks: a prompt's hits among them
                                    #   are counted free, yet the prompt takes them (cost_model.kv_fits)
    num_blocks: int = 1
    healthy: bool = True            # answered its last status poll
    incarnation: str | None = None  # the worker process's id as last reported; changes on a restart
    kv_address: str = ""            # decode: its advertised KV endpoint (what a probe measures)
    draining: bool = False          # being removed (scale-down): takes no new placements
    links: tuple = ()               # prefill: measured KV links (messages.LinkFigures)
    # optional, for the cache-aware and cost-model policies (defaults keep older callers working)
    zone: str = ""                  # topology label; links inside a zone are priced apart from across
    running: int = 0                # decode: requests in its running batch (last reported)
    waiting_tokens: int = 0         # prompt tokens waiting in its scheduler (last reported)
    serving_s: float = 0.0          # peer pulls this router ordered from it, not yet done: seconds of serving
                                    # (also in queued_tokens at its prefill rate; router/lifecycle/pull.py)
    spill_tier: str = ""            # its first KV cache tier below the device pool ("host" | "disk"; "": none),
                                    # where the blocks its pool evicts go (last status poll)
    prefill_tps: float | None = None        # prefill rate override, tokens/s (else learned online)
    decode_step_s: tuple | None = None      # decode step-time override (base_s, per_seq_s)

    def __setattr__(self, name, value):
        # every write tells the watchers (cost-model caches of per-worker figures, see
        # placement/cost_vector.py): each is a set that collects the ids of objects changed since it looked
        object.__setattr__(self, name, value)
        sinks = self.__dict__.get("_sinks")
        if sinks:
            for s in sinks:
                s.add(id(self))

    def charge(self, requests: int, tokens: int) -> None:
        """in_flight += requests, queued_tokens += tokens: both written, the watchers told once."""
        d = self.__dict__
        d["in_flight"] += requests
        d["queued_tokens"] += tokens
        for s in d.get("_sinks") or ():
            s.add(id(self))

    def touch(self) -> None:
        """Tell the watchers this worker's figures changed without a field write (Telemetry learned
        a new rate or step time for it)."""
        for s in self.__dict__.get("_sinks", ()):
            s.add(id(self))

    def watch(self, sink: set) -> None:
        """Add id(self) to `sink` on every later change (a cache's dirty set; unwatch to stop)."""
        sinks = self.__dict__.get("_sinks") or []
        if not any(s is sink for s in sinks):      # a new list each time: a copy.copy never shares changes
            object.__setattr__(self, "_sinks", sinks + [sink])

    def unwatch(self, sink: set) -> None:
        sinks = self.__dict__.get("_sinks")
        if sinks:
            object.__setattr__(self, "_sinks", [s for s in sinks if s is not sink])

    @property
    def placeable(self) -> bool:
        """May take a new request: answered its last status poll and is not draining."""
        return self.healthy and not self.draining

    @property
    def capacity_known(self) -> bool:
        """False until a status poll reported the KV pool (a fresh WorkerLoad has num_blocks=1)."""
        return self.num_blocks > 1


def usable(workers: list[WorkerLoad], exclude) -> list[WorkerLoad]:
    """The placeable workers not in `exclude` (ids)."""
    if not exclude:         # (placeable spelled out: no property call per worker)
        return [w for w in workers if w.healthy and not w.draining]
    return [w for w in workers if w.healthy and not w.draining and w.worker_id not in exclude]


def candidates(index, prefills: list[WorkerLoad], decodes: list[WorkerLoad], exclude, remote: bool, hashes, now
               ) -> tuple[list[WorkerLoad], list[WorkerLoad], dict[str, float]]:
    """A scoring policy's view: (usable decodes, usable prefills (none unless `remote`), confidence-
    weighted prefix hit blocks per worker from `index`, {} without hashes)."""
    ds = usable(decodes, exclude)
    ps = usable(prefills, exclude) if remote and ds else []
    hits = index.match_weighted(hashes, [w.worker_id for w in ps + ds], now) if hashes and ds else {}
    return ds, ps, hits


def decode_key(w: WorkerLoad) -> float:
    """Lower is a better decode worker: requests on it, less its free share of KV."""
    return w.in_flight - w.free_blocks / max(w.num_blocks, 1)
