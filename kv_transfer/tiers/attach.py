"""From an engine's CacheConfig to its tiers: the one place a worker or the offline LLM builds them."""
from __future__ import annotations

import os

from pdcluster.engine.kv_connector import KVConnector
from pdcluster.kv_transfer.tiers.connector import TierConfig, TierConnector
from pdcluster.kv_transfer.tiers.multi import MultiConnector

GIB = 2**30


def tier_config(cache, worker_id: str | None = None) -> TierConfig:
    """The tiers an engine's CacheConfig asks for. worker_id: the disk tier goes in its own
    subdirectory (workers on one host share --kv-disk-cache-dir; a restarted worker finds its own)."""
    d = cache.disk_cache_dir
    if d is not None and worker_id is not None:
        d = os.path.join(d, worker_id)
    return TierConfig(host_bytes=int(cache.host_cache_gb * GIB), disk_dir=d, disk_bytes=int(cache.disk_cache_gb * GIB),
                      codec=cache.tier_codec, protected_fraction=cache.protected_fraction)


def attach_tiers(engine, inner: KVConnector | None = None, worker_id: str | None = None) -> TierConnector | None:
    """Set engine's connector: `inner` (none: the engine's plain one) beside the tiers its config asks
    for. The TierConnector, or None when no tier is configured (then the connector is `inner`)."""
    inner = inner if inner is not None else KVConnector()
    cfg = tier_config(engine.cfg.cache, worker_id)
    if not cfg.enabled:
        engine.connector = inner
        return None
    tiers = TierConnector(cfg, engine.block_events())
    engine.connector = MultiConnector(tiers, inner)
    return tiers


def tier_figures(tiers: TierConnector | None) -> tuple:
    """A worker's WorkerStatus.tiers: one TierFigures per tier (none without tiers)."""
    from pdcluster.messages import TierFigures
    return () if tiers is None else tuple(TierFigures.of(f) for f in tiers.figures())
