"""Placement policies by name: the one list the router, pools.yaml and the CLI choose from.

    round-robin    next prefill and next decode worker in turn                 (round_robin.py)
    least-loaded   fewest queued prompt tokens / most free KV                  (least_loaded.py)
    cache-aware    longest prefix hit in the global index, ties by load        (cache_aware.py)
    llm-d          llm-d's weighted prefix / queue / KV-load scorers            (llmd.py)
    dynamo-kv      Dynamo's KV router cost: overlap weight x prefill blocks + decode blocks  (dynamo.py)
    cost-model     lowest estimated TTFT over every (p, d) and local option    (cost_model.py), default;
                   found without pricing every pair (linear in workers, see CostModel.choose)
llm-d and dynamo-kv are the published policies of those systems, implemented from their docs
(for comparisons: bench/sim_studies.py). The first three prefill locally when remote prefill is off, no prefill worker is up, or the prompt
has at most `local_prefill_max_tokens` tokens; the cost model decides local vs remote itself.
"""
from __future__ import annotations

from dataclasses import fields

from pdcluster.router.cost_config import CostConfig
from pdcluster.router.placement.base import Policy
from pdcluster.router.placement.cache_aware import CacheAware
from pdcluster.router.placement.cost_model import CostModel
from pdcluster.router.placement.dynamo import DynamoKV
from pdcluster.router.placement.llmd import LlmD
from pdcluster.router.placement.least_loaded import LeastLoaded
from pdcluster.router.placement.round_robin import RoundRobin

DEFAULT_POLICY = "cost-model"


def _cost_model(index=None, telemetry=None, config=None, remote_prefill=True, local_prefill_max_tokens=None,
                **cfg_fields) -> CostModel:
    # local_prefill_max_tokens is the other policies' switch; the cost model decides local itself
    if not remote_prefill:
        cfg_fields["allow_remote"] = False
    return CostModel(config, index, telemetry, **cfg_fields)


def _with_block_size(cls):
    """A factory taking the KV block size as given, else the router's (its Telemetry's CostConfig)."""
    def make(telemetry=None, block_size=None, **kw):
        bs = block_size or (telemetry.cfg.block_size if telemetry is not None else CostConfig().block_size)
        return cls(block_size=bs, **kw)
    return make


_SWITCH = {"local_prefill_max_tokens", "remote_prefill"}
_FACTORIES = {      # name -> (factory, the keywords it takes)
    "round-robin": (RoundRobin, _SWITCH),
    "least-loaded": (LeastLoaded, _SWITCH),
    "cache-aware": (CacheAware, _SWITCH | {"index"}),
    "llm-d": (_with_block_size(LlmD), {"index", "telemetry", "remote_prefill", "block_size", "prefix_weight",
                                       "queue_weight", "load_weight", "pd_threshold"}),
    "dynamo-kv": (_with_block_size(DynamoKV), {"index", "telemetry", "remote_prefill", "block_size",
                                               "overlap_score_weight", "busy_decode_blocks", "busy_prefill_tokens"}),
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
