"""Placement policies by name: the one list the router, pools.yaml and the CLI choose from.

    round-robin    next prefill and next decode worker in turn                 (round_robin.py)
    least-loaded   fewest queued prompt tokens / most free KV                  (least_loaded.py)
    cache-aware    longest prefix hit in the global index, ties by load        (cache_aware.py)
    cost-model     lowest estimated TTFT over every (p, d) and local option    (cost_model.py), default;
                   found without pricing every pair (linear in workers, see CostModel.choose)
The first three prefill locally when remote prefill is off, no prefill worker is up, or the prompt
has at most `local_prefill_max_tokens` tokens; the cost model decides local vs remote itself.
"""
from __future__ import annotations

from dataclasses import fields

from pdcluster.router.cost_config import CostConfig
from pdcluster.router.placement.base import Policy
from pdcluster.router.placement.cache_aware import CacheAware
from pdcluster.router.placement.cost_model import CostModel
from pdcluster.router.placement.least_loaded import LeastLoaded
from pdcluster.router.placement.round_robin import RoundRobin

DEFAULT_POLICY = "cost-model"


def _cost_model(index=None, telemetry=None, config=None, remote_prefill=True, local_prefill_max_tokens=None,
                **cfg_fields) -> CostModel:
    # local_prefill_max_tokens is the other policies' switch; the cost model decides local itself
    if not remote_prefill:
        cfg_fields["allow_remote"] = False
    return CostModel(config, index, telemetry, **cfg_fields)


_SWITCH = {"local_prefill_max_tokens", "remote_prefill"}
_FACTORIES = {      # name -> (factory, the keywords it takes)
    "round-robin": (RoundRobin, _SWITCH),
    "least-loaded": (LeastLoaded, _SWITCH),
    "cache-aware": (CacheAware, _SWITCH | {"index"}),
    "cost-model": (_cost_model, _SWITCH | {"index", "telemetry", "config"} | {f.name for f in fields(CostConfig)}),
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
