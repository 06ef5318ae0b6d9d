"""From an engine's CacheConfig to its tiers: the one place a worker or the offline LLM builds them."""
from __future__ import annotations

import os

from pdcluster.engine.kv_connector import KVConnector
from pdcluster.engine.weights_id import kv_identity
from pdcluster.kv_transfer.tiers.connector import TierConfig, TierConnector
from pdcluster.kv_transfer.tiers.multi import MultiConnector

GIB = 2**30


def tier_config(cache, worker_id: str | None = None, model: str = "") -> TierConfig:
    """The tiers an engine's CacheConfig asks for. worker_id: the disk tier goes in its own
    subdirectory (workers on one host share --kv-disk-cache-dir; a restarted worker finds its own).
    model: the weights' identity (engine/weights_id.py kv_identity), which the disk files carry."""
    d = cache.disk_cache_dir
    if d is not None and worker_id is not None:
        d = os.path.join(d, worker_id)
    return TierConfig(host_bytes=int(cache.host_cache_gb * GIB), disk_dir=d, disk_bytes=int(cache.disk_cache_gb * GIB),
                      codec=cache.tier_codec, protected_fraction=cache.protected_fraction,
                      layerwise=cache.tier_layerwise, write_through=cache.tier_write_through, model=model)


def attach_tiers(engine, inner: KVConnector | None = None, worker_id: str | None = None) -> TierConnector | None:
    """Set engine's connector: `inner` (none: the engine's plain one) beside the tiers its config asks
    for. The TierConnector, or None when no tier is configured (then the connector is `inner`)."""
    inner = inner if inner is not None else KVConnector()
    cache = engine.cfg.cache
    cfg = tier_config(cache, worker_id, kv_identity(engine.cfg) if cache.disk_cache_dir and cache.disk_cache_gb else "")
    if not cfg.enabled:
        engine.connector = inner
        return None
    tiers = TierConnector(cfg, engine.block_events(), disk_in_step=not inner.saves)   # a sender can't unsend a layer
    engine.connector = MultiConnector(tiers, inner)
    return tiers


def tier_figures(tiers: TierConnector | None) -> tuple:
    """A worker's WorkerStatus.tiers: one TierFigures per tier (none without tiers)."""
    from pdcluster.messages import TierFigures
    return () if tiers is None else tuple(TierFigures.of(f) for f in tiers.figures())


def tier_load_counters(tiers: TierConnector | None, device_block_bytes: int) -> dict:
    """EngineFigures' cumulative host/disk load counters, from which the router learns each tier's
    load rate (router/telemetry.py): blocks loaded x device_block_bytes (the workers pass a block's K and V in the
    model's dtype, LLMEngine.kv_block_model_bytes: the unit the router prices a load in, whatever the pool's or the
    tier's codec) and the seconds the loads took."""
    out = {}
    for f in (tiers.figures() if tiers is not None else ()):
        if f["tier"] in ("host", "disk"):
            out[f"{f['tier']}_load_bytes"] = f["hits"] * device_block_bytes
            out[f"{f['tier']}_load_s"] = f["load_sum_s"]
    return out


def cache_snapshot(device: tuple[int, list[int]], tiers: TierConnector | None):
    """The router's index resync: the device pool's (seq, hashes) and, with tiers, theirs too. The
    device pool's event number stands for both (events after it are replayed; stored/removed are
    idempotent)."""
    from pdcluster.messages import CacheSnapshot
    seq, hashes = device
    lower = tiers.tier_hashes()[1] if tiers is not None else {}
    return CacheSnapshot(seq, list(hashes), host=list(lower.get("host", ())), disk=list(lower.get("disk", ())))
