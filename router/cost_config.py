"""The cost model's configuration and the KV wire size it prices transfers at. Pure Python (no torch)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from pdcluster.engine.config import CacheConfig
from pdcluster.kv_transfer.codec_policy import CompressionPolicy   # pure Python, no torch


# Wire sizes of kv_transfer/codec.py (which needs torch; the router must not import it). Pinned to
# it by tests/unit/test_cost_model.py.
CODEC_ITEM_BYTES = {"int8": 1, "fp8": 1}                # codec.QUANT[codec].itemsize
SCALE_BYTES = 4                                         # codec.SCALE_BYTES: one float32 per scale


def wire_bytes_per_token(codec: str, kv_bytes_per_token: float, dtype_bytes: int, num_layers: int,
                         num_kv_heads: int, block_size: int) -> float:
    """Bytes one token's K+V (all layers) costs on the wire under `codec` ("none", "int8", "fp8"),
    payload + scales: kv_transfer/codec.py sends each element in CODEC_ITEM_BYTES instead of the
    cache's `dtype_bytes`, plus a float32 scale per (K/V, block, kv_head) of every layer, i.e.
    2 * num_layers * num_kv_heads * SCALE_BYTES per block of `block_size` tokens. Frame headers
    (a few hundred bytes per frame of ~2 MiB) are left out, compressed or not."""
    if codec == "none":
        return float(kv_bytes_per_token)
    if codec not in CODEC_ITEM_BYTES:
        raise ValueError(f"codec must be 'none' or one of {sorted(CODEC_ITEM_BYTES)}, got {codec!r}")
    payload = kv_bytes_per_token / dtype_bytes * CODEC_ITEM_BYTES[codec]
    return payload + 2 * num_layers * num_kv_heads * SCALE_BYTES / block_size


KV_FULL_FALLBACKS = ("wait", "cheapest", "local")    # router/placement/cost_model.kv_full_defer


@dataclass(frozen=True)
class CostConfig:
    block_size: int = CacheConfig.block_size   # tokens per KV block (the engine's)
    kv_bytes_per_token: int = 46_080        # K+V of all layers; SmolLM2-135M fp32 = 2*30*3*64*4
    num_layers: int = 30
    num_kv_heads: int = 3                   # with kv_dtype_bytes: a compressed transfer's scales and payload
    kv_dtype_bytes: int = 4                 # bytes per element of the KV cache (fp32 4, bf16/fp16 2)
    kv_compression: str = CompressionPolicy.mode   # the cluster's KV codec policy (ClusterConfig.kv.compression):
                                            #   off | int8 | fp8 | auto; transfers are priced at its wire bytes
    # priors until measurements arrive
    prior_prefill_tps: float = 2_000.0      # prefill worker, tokens/s
    prior_local_prefill_tps: float | None = None   # decode worker prefilling (None: prior_prefill_tps)
    prior_decode_base_s: float = 0.02       # decode step seconds = base + per_seq * running
    prior_decode_per_seq_s: float = 0.001
    alpha: float = 0.2                      # EWMA weight of the newest sample
    prior_host_load_bps: float = 2e9        # KV bytes/s loaded back from the host-memory tier
    prior_disk_load_bps: float = 5e8        # KV bytes/s loaded back from the disk tier
    # links, bytes/s
    intra_zone_bps: float = 1.25e9          # same zone, unmeasured (10 GbE)
    cross_zone_bps: float = 1.25e8          # across zones, unmeasured (1 GbE)
    zone_pair_bps: tuple = ()               # ((zone_a, zone_b, bytes/s), ...): priors per pair (both ways)
    probe_after_s: float = 30.0             # a link with no sample for this long wants a probe
    # choice
    remote_overhead_s: float = 0.005        # reserve + prefill RPC hops of a remote placement
    local_penalty: float = 0.5              # weight of running requests' stall vs the new TTFT
    duplicate_penalty: float = 1.0          # weight of recomputing a prefix another worker holds (s per s)
    local_chunk_tokens: int = 512           # prefill tokens per step on a decode worker (TPOT guard); a cluster
                                            #   sets its decode engine's (ClusterConfig.local_chunk_tokens)
    tpot_slo_s: float | None = field(default=0.25, metadata={   # None disables the guard
        "cli": "--tpot-slo", "zero_is_none": True, "min": 0, "help": (
            "cost model: the decode step time (seconds) a local prefill's chunks may not push a decode worker's "
            "running requests past, where another option keeps under it (0 = no guard)")})
    tpot_strict: bool = False               # True: no option past the guard -> None
    allow_local: bool = True
    allow_remote: bool = True
    local_max_tokens: int | None = None     # local only for prompts up to this (None: any)
    kv_full_fallback: str = field(default="wait", metadata={"choices": KV_FULL_FALLBACKS, "help": (
        "cost model, no decode worker with KV room: wait (the router waits for room while a prefill worker is "
        "usable), cheapest (wait only when remote prefill is the cheaper kind), local (the old rule: prefill "
        "on the cheapest decode worker at once)")})   # cost_model.kv_full_defer
    peer_pull: bool = field(default=False, metadata={"help": (   # router/placement/pull_pricing.py
        "a worker prefilling a prompt pulls prefix blocks another worker holds over the KV transport when the "
        "cost model finds the pull faster than recomputing them (cost-model policy)")})
    pull_overhead_s: float = 0.005          # a pull's order round trip, beyond its bytes
    pull_price_half_life_s: float = 60.0    # a puller's measured pull time (and failure share) halves its
                                            # weight against the link's price every this many seconds
                                            # without a new pull (Telemetry.pull_weight)

    def __post_init__(self):
        CompressionPolicy(self.kv_compression)   # ValueError naming the modes
        if not self.pull_price_half_life_s > 0:
            raise ValueError(f"pull_price_half_life_s must be > 0, got {self.pull_price_half_life_s!r}")
        if self.kv_full_fallback not in KV_FULL_FALLBACKS:
            raise ValueError(f"kv_full_fallback must be one of {', '.join(KV_FULL_FALLBACKS)}, "
                             f"got {self.kv_full_fallback!r}")

    @classmethod
    def for_model(cls, model_cfg, dtype_bytes: int, block_size: int, **kw) -> "CostConfig":
        """From engine.config.ModelConfig: the KV geometry the transfer is priced with."""
        return cls(**kw).with_model(model_cfg, dtype_bytes, block_size)

    def with_model(self, model_cfg, dtype_bytes: int, block_size: int) -> "CostConfig":
        """This config with the KV geometry of `model_cfg` (engine.config.ModelConfig) in `dtype_bytes`."""
        return replace(self, block_size=block_size, kv_bytes_per_token=model_cfg.kv_bytes_per_token(dtype_bytes),
                       num_layers=model_cfg.num_layers, num_kv_heads=model_cfg.num_kv_heads,
                       kv_dtype_bytes=dtype_bytes)

    def wire_bytes_per_token(self, codec: str) -> float:
        return wire_bytes_per_token(codec, self.kv_bytes_per_token, self.kv_dtype_bytes, self.num_layers,
                                    self.num_kv_heads, self.block_size)
