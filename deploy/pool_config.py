"""The worker pools of the config tree: replica bounds, zones, autoscaling rules. Pure Python.

Also the bounds on starting, restarting and draining replicas."""
from __future__ import annotations

from dataclasses import dataclass, field

from pdcluster.router.autoscaler import ScalingRule

SLO_KEY = {"p90_ttft": "ttft_slo_ms", "p90_tpot": "tpot_slo_ms",     # latency signals take their target here
           "decode_step_ms": "tpot_slo_ms"}


@dataclass(frozen=True)
class AutoscaleConfig:
    signal: str                         # one of router.autoscaler.SIGNALS[pool]
    target: float | None = None         # queued_prompt_tokens_per_replica: tokens; kv_utilization and
                                        #   prefill_utilization: fraction
    ttft_slo_ms: float | None = None    # target of p90_ttft
    tpot_slo_ms: float | None = None    # target of p90_tpot and decode_step_ms
    scale_up_above: float = 1.0         # x target
    scale_down_below: float = 0.5       # x target
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 300.0
    max_step: int = 1
    cooldown_s: float = 60.0
    window_s: float = 60.0              # prefill_utilization: seconds of sent prompt tokens it averages

    @property
    def signal_target(self) -> float:
        return getattr(self, SLO_KEY[self.signal]) if self.signal in SLO_KEY else self.target


@dataclass(frozen=True)
class PoolTiers:
    """A pool's own KV cache tiers below the device pool (kv_transfer/tiers/); None: the engine
    section's (--kv-host-cache-gb, --kv-disk-cache-dir, --kv-disk-cache-gb, --kv-tier-codec,
    --kv-tier-block-loads, --kv-tier-write-back)."""
    host_cache_gb: float | None = None
    disk_cache_dir: str | None = None      # each worker keeps its blocks in <dir>/<worker id>
    disk_cache_gb: float | None = None
    tier_codec: str | None = None
    tier_layerwise: bool | None = None     # host and disk hits load layer by layer in step (False: whole blocks first)
    tier_write_through: bool | None = None  # store blocks below when computed (False: only when evicted)

    def overrides(self) -> dict:
        """The CacheConfig fields (engine keywords) this pool sets."""
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass(frozen=True)
class PoolConfig:
    """One pool. Without bounds (min/max None) it stays at initial_replicas: nothing to autoscale."""
    autoscale: AutoscaleConfig
    initial_replicas: int = field(default=1, metadata={     # "{pool}": the parent field's metadata
        "cli": "--{pool}-workers", "help": "{pool} worker actors (one device each)"})
    min_replicas: int | None = None     # None: initial_replicas
    max_replicas: int | None = None     # None: initial_replicas; a Ray started here offers this many pool units
    zone: str = ""                      # topology label: the cost model prices links inside a zone and
                                        #   across zones apart
    # Per-pool engine tuning (pools.yaml); None: the engine section's value (the flags'). The two pools'
    # block sizes must agree (ClusterConfig checks): KV blocks ship as they are, never re-blocked.
    quantization: str | None = None     # weight quantization (engine/quant/policy.py): none | int8 | int4
    dtype: str | None = None            # weights/activations: float32 | bfloat16 | float16
    kv_cache_dtype: str | None = None   # auto | int8 | fp8 (engine/kv_quant.py)
    block_size: int | None = None       # tokens per KV block
    threads: int | None = None          # torch threads (and Ray CPUs) per worker actor
    max_num_seqs: int | None = None     # most requests one worker batches in a step
    speculative: str | None = None      # speculative decoding: ngram | off
    cpu_compile: bool | None = None     # CPU decode steps through the AOTInductor-compiled layer (engine/cpu_compile.py)
    cpu_int8_rows: int | None = None    # CPU, int4: steps of >= this many rows on an int8 copy (engine/quant/int8_rows.py)
    kv_tiers: PoolTiers = field(default_factory=PoolTiers)   # host/disk KV cache tiers

    # PoolConfig field -> the engine keyword it overrides (engine.llm_engine.build_config)
    ENGINE_KEYS = ("quantization", "dtype", "kv_cache_dtype", "block_size", "max_num_seqs", "speculative",
                   "cpu_compile", "cpu_int8_rows")

    def engine_overrides(self) -> dict:
        """The engine keywords this pool sets (None: not set)."""
        return {k: getattr(self, k) for k in self.ENGINE_KEYS if getattr(self, k) is not None}

    @property
    def lo(self) -> int:
        return self.initial_replicas if self.min_replicas is None else self.min_replicas

    @property
    def hi(self) -> int:
        return self.initial_replicas if self.max_replicas is None else self.max_replicas

    def scaling_rule(self) -> ScalingRule:
        a = self.autoscale
        return ScalingRule(signal=a.signal, target=a.signal_target, min_replicas=self.lo, max_replicas=self.hi,
                           up_ratio=a.scale_up_above, down_ratio=a.scale_down_below,
                           upscale_delay_s=a.upscale_delay_s, downscale_delay_s=a.downscale_delay_s,
                           max_step=a.max_step, cooldown_s=a.cooldown_s, window_s=a.window_s)


@dataclass(frozen=True)
class AutoscalerLoop:
    enabled: bool = True                # false: each pool stays at initial_replicas (dead ones replaced)
    interval_s: float = 5.0             # control-loop tick


def _pool(name: str, signal: str, target: float):
    """A pool field: its default autoscaling signal and target; metadata names it for its flags."""
    return field(default_factory=lambda: PoolConfig(AutoscaleConfig(signal, target)), metadata={"pool": name})


@dataclass(frozen=True)
class PoolsSection:
    prefill: PoolConfig = _pool("prefill", "queued_prompt_tokens_per_replica", 4096.0)
    decode: PoolConfig = _pool("decode", "kv_utilization", 0.75)
    autoscaler: AutoscalerLoop = field(default_factory=AutoscalerLoop)
    max_restarts: int = field(default=3, metadata={
        "help": "Ray restarts a crashed worker actor this often; it re-registers with the router"})
    start_timeout_s: float = 600.0           # give up (clear error) if workers cannot be placed/loaded
    replica_start_timeout_s: float = 600.0   # a replica added while serving must load within this (node launch too)
    drain_timeout_s: float = 30.0            # scale-down: running requests finish within this, else they migrate

    def pool(self, role: str) -> PoolConfig:
        return self.prefill if role == "prefill" else self.decode

    def scaling_rules(self) -> dict[str, ScalingRule]:
        return {name: self.pool(name).scaling_rule() for name in ("prefill", "decode")}

    def autoscaling_rules(self) -> dict[str, ScalingRule]:
        """The rules `serve` runs the pool autoscaler with: pools with min_replicas < max_replicas, none
        when autoscaler.enabled is false (then each pool stays at initial_replicas)."""
        if not self.autoscaler.enabled:
            return {}
        return {name: r for name, r in self.scaling_rules().items() if r.min_replicas < r.max_replicas}
