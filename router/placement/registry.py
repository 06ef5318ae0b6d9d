"""Placement policies by name. Pure Python.

Every policy answers
    choose(prompt_len, prefills, decodes, exclude=frozenset(), *, hashes=None, now=None) -> Decision | None
(prefills/decodes: lists of WorkerLoad; hashes: the prompt's chain hashes from
engine.hashing.block_hashes(ids, block_size, salt); now: time.time()). None = no decode worker.

    round-robin    next prefill and next decode worker in turn
    least-loaded   fewest queued prompt tokens / most free KV (router.placement.LeastLoaded)
    cache-aware    longest prefix hit in the global index (confidence-weighted), ties by load
    cost-model     lowest estimated TTFT over every (p, d) and local option (router.cost_model), default
The first three prefill locally when remote prefill is off, no prefill worker is up, or the prompt
has at most `local_prefill_max_tokens` tokens; the cost model decides local vs remote itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from pdcluster.router.cost_model import CostConfig, CostModel, Telemetry, config_fields
from pdcluster.router.placement import Decision, LeastLoaded, WorkerLoad
from pdcluster.router.prefix_index import PrefixIndex

DEFAULT_POLICY = "cost-model"


class Policy(Protocol):
    def choose(self, prompt_len: int, prefills: list[WorkerLoad], decodes: list[WorkerLoad],
               exclude=frozenset(), *, hashes=None, now=None) -> Decision | None: ...


def _usable(ws: list[WorkerLoad], exclude) -> list[WorkerLoad]:
    return [w for w in ws if w.placeable and w.worker_id not in exclude]


def _decode_key(w: WorkerLoad):
    return w.in_flight - w.free_blocks / max(w.num_blocks, 1)


@dataclass
class RoundRobin:
    local_prefill_max_tokens: int = 0
    remote_prefill: bool = True
    _next_p: int = field(default=0, repr=False)
    _next_d: int = field(default=0, repr=False)

    def choose(self, prompt_len, prefills, decodes, exclude=frozenset(), *, hashes=None, now=None):
        ds = _usable(decodes, exclude)
        if not ds:
            return None
        d = ds[self._next_d % len(ds)]
        self._next_d += 1
        ps = _usable(prefills, exclude)
        if not self.remote_prefill or not ps or prompt_len <= self.local_prefill_max_tokens:
            return Decision(None, d.worker_id, "local")
        p = ps[self._next_p % len(ps)]
        self._next_p += 1
        return Decision(p.worker_id, d.worker_id, "remote")


@dataclass
class CacheAware:
    index: PrefixIndex = field(default_factory=PrefixIndex)
    local_prefill_max_tokens: int = 0
    remote_prefill: bool = True

    def choose(self, prompt_len, prefills, decodes, exclude=frozenset(), *, hashes=None, now=None):
        ds = _usable(decodes, exclude)
        if not ds:
            return None
        ps = _usable(prefills, exclude)
        hits = self.index.match_weighted(hashes, [w.worker_id for w in ps + ds], now) if hashes else {}
        d = min(ds, key=lambda w: (-hits.get(w.worker_id, 0.0), _decode_key(w), w.worker_id))
        est = {"hit_blocks_decode": hits.get(d.worker_id, 0.0)}
        if not self.remote_prefill or not ps or prompt_len <= self.local_prefill_max_tokens:
            return Decision(None, d.worker_id, "local", est)
        p = min(ps, key=lambda w: (-hits.get(w.worker_id, 0.0), w.queued_tokens, w.in_flight, w.worker_id))
        return Decision(p.worker_id, d.worker_id, "remote", est | {"hit_blocks_prefill": hits.get(p.worker_id, 0.0)})


def _cost_model(index=None, telemetry=None, config=None, remote_prefill=True, local_prefill_max_tokens=None,
                **cfg_fields) -> CostModel:
    # local_prefill_max_tokens is the other policies' switch; the cost model decides local itself
    if not remote_prefill:
        cfg_fields["allow_remote"] = False
    return CostModel(config, index, telemetry, **cfg_fields)


_FACTORIES = {
    "round-robin": (RoundRobin, {"local_prefill_max_tokens", "remote_prefill"}),
    "least-loaded": (LeastLoaded, {"local_prefill_max_tokens", "remote_prefill"}),
    "cache-aware": (CacheAware, {"index", "local_prefill_max_tokens", "remote_prefill"}),
    "cost-model": (_cost_model, {"index", "telemetry", "config", "local_prefill_max_tokens", "remote_prefill"}
                   | config_fields()),
}
POLICY_NAMES = tuple(_FACTORIES)


def make_policy(name: str = DEFAULT_POLICY, **kw) -> Policy:
    """The policy called `name`. Keywords any policy understands may be passed to all (the router
    passes index=, telemetry=, local_prefill_max_tokens=, remote_prefill= whatever the name); each
    takes the ones it uses. A keyword no policy knows is a TypeError; an unknown name a ValueError."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown placement policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
    known = set().union(*(keys for _, keys in _FACTORIES.values()))
    unknown = sorted(set(kw) - known)
    if unknown:
        raise TypeError(f"unknown placement policy option(s): {', '.join(unknown)}")
    factory, keys = _FACTORIES[name]
    return factory(**{k: v for k, v in kw.items() if k in keys})


__all__ = ["CacheAware", "CostConfig", "CostModel", "DEFAULT_POLICY", "LeastLoaded", "POLICY_NAMES", "Policy",
           "RoundRobin", "Telemetry", "make_policy"]
