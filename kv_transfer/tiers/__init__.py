"""A worker's KV cache tiers below the device pool: host memory, then local disk (issue 19).

index.py        TierIndex: chain hash -> slot, capacity, segmented LRU, pins (pure Python)
stats.py        per-tier counters and latency histograms (pure Python)
block_format.py one block's layout below the device, its geometry and codec
host.py         HostPool: block-sized slots in (pinned) host memory
disk.py         DiskStore: one checksummed file per block
connector.py    TierConnector: write-behind of evicted blocks, load-back, warm restart, block events
multi.py        MultiConnector: the tiers beside a worker's transfer connector
attach.py       tier_config / attach_tiers: from an engine's CacheConfig to its connector
"""
import importlib

# imported on first use (PEP 562): the pure-Python bookkeeping (index, stats) loads without torch
_EXPORTS = {"TierConfig": "connector", "TierConnector": "connector", "MultiConnector": "multi",
            "tier_config": "attach", "attach_tiers": "attach"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
