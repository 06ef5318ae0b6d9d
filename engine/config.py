"""The frozen config tree. Parsed from CLI/YAML only at the edge; everything inside reads it.

    EngineConfig
      model: ModelConfig        architecture facts of the checkpoint (from config.json / GGUF metadata)
      cache: CacheConfig        paged KV pool geometry and budget
      sched: SchedulerConfig    batching limits
      device, dtype, weight quantization, KV cache dtype, attention backend, threads

A field's `metadata["help"]` makes it a `pdcluster serve` flag (deploy/flags.py); "scale" is the
flag's unit in the field's units (MiB -> bytes).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}   # the dtypes a worker runs in, bytes per element
TIER_CODECS = ("none", "int8", "fp8")   # KV below the device pool (kv_transfer/codec.py CODECS)
SPECULATIVE = ("ngram", "off")       # speculative decoding modes (engine/spec/)
LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")   # what logprobs are of (vLLM's logprobs_mode; engine/sampler.py)

@dataclass(frozen=True)
class ModelConfig:
    """Llama-family decoder geometry. Units: tokens, elements; never bytes."""

    name: str                       # display name (folder or file stem)
    path: str                       # HF folder or .gguf file
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None   # frozen dict items (llama3 scaling etc.)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False    # Qwen2: bias on q/k/v projections
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    gguf_file: str | None = None    # set when `path` is a GGUF file (tokenizer uses it too)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V for every layer of one token."""
        return 2 * self.num_layers * self.kv_size * dtype_bytes

    def kv_bytes_per_block(self, kv_cache_dtype: str, dtype_bytes: int, block_size: int) -> int:
        """K and V for every layer of one block in a cache of kv_cache_dtype (engine/kv_quant.py:
        auto = dtype_bytes per element; int8 / fp8 = 1 byte per element + a float32 scale per
        (block, kv head))."""
        from pdcluster.engine.kv_quant import block_bytes
        return 2 * self.num_layers * block_bytes(kv_cache_dtype, dtype_bytes, block_size, self.num_kv_heads,
                                                 self.head_dim)


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16                 # tokens per KV block
    num_blocks: int | None = None        # explicit pool size; None = derive from the budget below
    kv_cache_memory: int | None = field(  # bytes for K+V of all layers; None = use memory_fraction
        default=None, metadata={"help": "MiB of KV cache per worker", "scale": 2**20, "above": 0})
    memory_fraction: float = 0.3         # of free device memory (host RAM on CPU) when no budget given
    enable_prefix_caching: bool = True
    protected_fraction: float = 0.9      # most of the pool that reused prefix blocks may hold when
                                         #   free, ahead of used-once blocks (SLRU, engine/block_pool.py)
    # lower cache tiers (kv_transfer/tiers/): evicted prefix blocks are kept there and loaded back
    host_cache_gb: float = field(default=0.0, metadata={"cli": "--kv-host-cache-gb", "min": 0, "help": (
        "GiB of host memory per worker that keeps KV blocks evicted from the device pool (0 = off)")})
    disk_cache_dir: str | None = field(default=None, metadata={"cli": "--kv-disk-cache-dir", "help": (
        "directory for a per-worker disk tier of evicted KV blocks (one checksummed file each; a "
        "restarted worker verifies and re-announces them)")})
    disk_cache_gb: float = field(default=0.0, metadata={"cli": "--kv-disk-cache-gb", "min": 0, "help": (
        "GiB of disk per worker for --kv-disk-cache-dir (0 = off)")})
    tier_codec: str = field(default="none", metadata={"cli": "--kv-tier-codec", "choices": TIER_CODECS, "help": (
        "how the host and disk tiers keep KV blocks: as computed, or int8 / fp8 with a scale per block, "
        "layer and KV head (kv_transfer/codec.py; ~4x smaller for float32 caches, lossy)")})
    tier_write_through: bool = field(default=True, metadata={"cli": "--kv-tier-write-back", "help": (
        "store KV blocks in the host and disk tiers only when the device pool evicts them, instead of as "
        "soon as they are computed (write-through, the default: a restarted worker finds on disk the hot "
        "prefixes the device pool never evicted, and the host tier holds copies of device blocks)")})
    tier_layerwise: bool = field(default=True, metadata={"cli": "--kv-tier-block-loads", "help": (
        "host- and disk-tier hits load whole blocks before their request's step, instead of layer by layer "
        "inside it (overlapped with computing the prompt's tail; a disk layer is checked before it is used, "
        "a corrupt one recomputes the prompt; on a prefill worker disk hits always load whole blocks first)")})

    def __post_init__(self):
        check_fields(self)
        if self.block_size < 1 or (self.num_blocks is not None and self.num_blocks < 1):
            raise ValueError(f"block_size and num_blocks must be >= 1, got {self.block_size}, {self.num_blocks}")
        if not 0 < self.memory_fraction <= 1 or not 0 <= self.protected_fraction <= 1:
            raise ValueError(f"memory_fraction must be in (0, 1] and protected_fraction in [0, 1], got "
                             f"{self.memory_fraction}, {self.protected_fraction}")
        if self.tier_codec not in TIER_CODECS:
            raise ValueError(f"tier_codec must be one of {TIER_CODECS}, got {self.tier_codec!r}")
        if (self.disk_cache_gb > 0) != bool(self.disk_cache_dir):
            raise ValueError("the disk KV tier needs both disk_cache_dir and disk_cache_gb > 0 "
                             "(--kv-disk-cache-dir, --kv-disk-cache-gb)")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = field(default=64, metadata={"help": "most requests one worker batches in a step", "min": 1})
    max_num_batched_tokens: int = field(   # token budget per step (prefill chunks + decodes)
        default=2048, metadata={"min": 1, "help": (
            "token budget of one engine step (longer prompts prefill in chunks of it)")})
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = field(   # engine/scheduler.py: a per-request chunk cap (vLLM's flag)
        default=0, metadata={"min": 0, "help": (
            "most prompt tokens one request computes in a step (0: up to the step's budget); a long prompt then "
            "shares each step with the short ones behind it instead of holding them for its whole prefill")})
    wait_for_inflight_prefix: bool = True  # a waiting request whose next uncached block a running
                                           #   request is computing waits for it (then hits) instead
                                           #   of computing the same prefix twice

    def __post_init__(self):
        check_fields(self)      # (a max_num_seqs or step budget of 0 scheduled nothing: generate() spun for ever)


KINDS = {"int": "an integer", "float": "a finite number", "bool": "True or False"}   # annotation -> what it takes


def of_kind(v: Any, kind: str) -> bool:
    """v is a value of annotated kind `kind`: "int" an integer, "float" a finite number (neither a bool), "bool" a
    bool; any other kind takes anything."""
    if kind == "bool":
        return isinstance(v, bool)
    if isinstance(v, bool):
        return kind not in KINDS
    if kind == "int":
        return isinstance(v, numbers.Integral)
    return kind != "float" or finite(v)


def finite(v: Any) -> bool:
    """v is a real number (not a bool) that a float holds finitely: an int past float's range (10**400) is not
    (math.isfinite raises OverflowError on it)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def in_bounds(v: Any, lo: float | None, above: float | None) -> bool:
    """v >= lo and v > above, each where given."""
    return (lo is None or v >= lo) and (above is None or v > above)


def check_fields(cfg: Any) -> None:
    """ValueError naming the first field of `cfg` whose value is not of its annotated kind (of_kind; None only
    where annotated) or is outside its metadata's "min" / "above" (the bounds its flag shows: deploy/flags.py,
    which checks a flag's value with the same two). Offline LLM(...) keywords reach the tree without the flags'
    checks: a NaN, 1.5 blocks or "false" got in."""
    for f in fields(cfg):
        kind, v = str(f.type), getattr(cfg, f.name)
        base = kind.replace(" | None", "")
        if v is None and kind.endswith("| None"):
            continue
        if not of_kind(v, base):
            raise ValueError(f"{f.name} must be {KINDS[base]}, got {v!r}")
        lo, above = f.metadata.get("min"), f.metadata.get("above")
        if not in_bounds(v, lo, above):
            raise ValueError(f"{f.name} must be {f'>= {lo}' if lo is not None else f'> {above}'}, got {v!r}")


def check_tier_codec(kv_cache_dtype: str, tier_codec: str, where: str = "") -> None:
    """ValueError unless the host/disk tiers' codec suits the KV cache: a quantized cache keeps its own codes."""
    if kv_cache_dtype != "auto" and tier_codec not in ("none", kv_cache_dtype):
        raise ValueError(f"{where}a quantized ({kv_cache_dtype}) KV cache keeps its own codes in the host/disk tiers: "
                         f"tier codec (--kv-tier-codec) must be none or {kv_cache_dtype}, got {tier_codec}")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    sched: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: str = "cpu"
    dtype: str = "float32"               # float32 | bfloat16 | float16
    quantization: str | None = "none"    # weight-only: none | int8 | int4; None = the checkpoint's own
                                         #   (a GGUF file's stays packed; engine/quant/policy.py). Default
                                         #   none (float): the packed CPU kernels' results depend on the
                                         #   batch's row count, so a batched server's greedy tokens can
                                         #   differ near ties from the same prompt run alone
                                         #   (tests/faults/test_worker_faults.py saw 13/16 exact)
    kv_cache_dtype: str = "auto"         # auto (= dtype) | int8 | fp8: a quantized KV cache with a
                                         #   scale per (block, kv head) (engine/kv_quant.py), ~4x (vs
                                         #   float32) / 2x (vs 16-bit) the blocks in the same memory
    attention_backend: str = "auto"      # auto (triton on cuda, torch on cpu) | torch | triton
    speculative: str = "ngram"           # decode-time drafts (engine/spec/): ngram (prompt lookup) | off
    spec_ngram_k: int = 4                # most draft tokens per request per step (adaptive below it)
    spec_ngram_n: int = 4                # longest n-gram matched (shortest: 2)
    spec_max_step_tokens: int = 16       # drafts only while a step has fewer rows than this (engine/spec/decoder.py)
    logprobs_mode: str = "raw_logprobs"  # raw_logprobs: the model's distribution (a grammar's mask applied, no
                                         #   bias, penalty or temperature: vLLM's default) | processed_logprobs: the
                                         #   distribution the token is drawn from (after them), untruncated
    num_threads: int | None = field(default=None, metadata={"min": 1})   # torch.set_num_threads on CPU hosts
    cuda_graphs: bool = True             # pure-decode steps replayed as CUDA graphs captured at start
                                         #   (engine/cuda_graphs.py; Triton backend on CUDA only, CPU
                                         #   steps: cpu_compile below); False = vLLM's --enforce-eager
    cpu_compile: bool = False            # CPU: pure-decode steps through one AOTInductor-compiled decoder
                                         #   layer (engine/cpu_compile.py): the same tokens with packed
                                         #   linears, faster steps (bench/RESULTS.md); the first start per
                                         #   model / threads / dtype compiles for ~20-60 s (then cached on
                                         #   disk); eager on any failure
    cpu_int8_rows: int = 0               # CPU, packed int4 linears: steps of >= this many rows run an int8
                                         #   copy of the weights with x rounded to int8 per row
                                         #   (engine/quant/int8_rows.py; 1 byte per weight more): 1.6x
                                         #   (16 rows) to 2.3x (32) faster linears; 0 = off
    greedy_head: bool = True             # CPU float32 head: greedy rows' tokens through an int8 screen of it and
                                         #   float32 scores of the few it keeps (kernels/greedy_head.py): the
                                         #   float32 argmax, ~6 ms less a step; False = the full head every step
    weight_codes: bool = True            # CPU float32 linears whose weights are all GGUF Q4_1 values (a float32
                                         #   engine on a Q4_1 file) held as their 4-bit codes (kernels/q4f32_mm.py):
                                         #   the same results bit for bit, 5.3x fewer bytes a step; False = float32

    def __post_init__(self):
        check_fields(self)
        from pdcluster.engine.quant.policy import check_mode
        check_mode(self.quantization)        # ValueError naming the modes
        if self.speculative not in SPECULATIVE:
            raise ValueError(f"speculative must be one of {SPECULATIVE}, got {self.speculative!r}")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {self.logprobs_mode!r}")
        if self.cpu_int8_rows < 0:
            raise ValueError(f"cpu_int8_rows must be >= 0 (0 = off), got {self.cpu_int8_rows}")
        if self.spec_ngram_k < 1 or self.spec_ngram_n < 2 or self.spec_max_step_tokens < 1:
            raise ValueError(f"spec_ngram_k and spec_max_step_tokens must be >= 1 and spec_ngram_n >= 2, got "
                             f"{self.spec_ngram_k}, {self.spec_max_step_tokens}, {self.spec_ngram_n}")
        from pdcluster.engine.kv_quant import check_kv_cache_dtype
        check_kv_cache_dtype(self.kv_cache_dtype)
        check_tier_codec(self.kv_cache_dtype, self.cache.tier_codec)

    @property
    def max_model_len(self) -> int:
        return self.model.max_position_embeddings
