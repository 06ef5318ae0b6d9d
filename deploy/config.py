"""The cluster's one frozen config tree, parsed from the CLI and pools.yaml at the edge.

deploy/flags.py and deploy/pools.py build it; Cluster and the workers only read it.

    ClusterConfig
      model, address
      server: ServerSection       public gRPC endpoint, metrics, auth, TLS, shutdown drain
      pools: PoolsSection         prefill/decode PoolConfig (size, zone, AutoscaleConfig), restarts, start bounds
      engine: EngineSection       every worker's engine: CacheConfig, SchedulerConfig, dtype, quantization,
                                  KV cache dtype, threads, device (a pool may override dtype, quantization,
                                  KV cache dtype, block size, threads, max batch: PoolConfig)
      kv: KVSection               prefill -> decode KV: transport, layer-wise, compression, link, secret
      router: RouterConfig        admission, placement policy
      timeouts: Timeouts          bounds on every router -> worker call
      cost: CostConfig            the cost model's priors and weights

Each default is defined once, on its field. Values that several consumers need (the KV block
size: engine, router prefix hashes, cost model; the KV codec: workers and cost model) live on one
node and are passed down at start (Cluster.start), whatever the other nodes say.
A field with `metadata["help"]` is a `pdcluster serve` flag (deploy/flags.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pdcluster.deploy.flags import check_bounds
from pdcluster.deploy.netns import ShapedLink
from pdcluster.deploy.pool_config import SLO_KEY, PoolsSection
from pdcluster.engine.config import (DTYPE_BYTES, LOGPROBS_MODES, SPECULATIVE, CacheConfig, EngineConfig, SchedulerConfig,
                                     check_tier_codec)
from pdcluster.engine.kv_quant import KV_CACHE_DTYPES
from pdcluster.engine.quant.policy import QUANTIZATIONS
from pdcluster.kv_transfer import registry
from pdcluster.kv_transfer.codec_policy import MODES, CompressionPolicy
from pdcluster.router.config import RouterConfig, Timeouts
from pdcluster.router.cost_config import CostConfig

@dataclass(frozen=True)
class ServerSection:
    host: str = field(default="127.0.0.1", metadata={"help": "router bind address"})
    port: int = field(default=50051, metadata={"help": "router gRPC port"})
    http_port: int = field(default=8000, metadata={
        "help": "OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models, vLLM's /tokenize "
                "and /detokenize, /health) on --host:PORT (0 = off)"})
    metrics_port: int = field(default=9090, metadata={
        "help": "Prometheus /metrics of the router on --host:PORT (0 = off)"})
    auth_token_file: str | None = field(default=None, metadata={"help": (   # None = no auth
        "require `authorization: Bearer <token>`; one token (or tenant:token) per line, each at least 16 "
        "characters; the tenant also "
        "isolates its prefix cache")})
    tls_cert: str | None = field(default=None, metadata={
        "help": "PEM certificate: serve the public endpoint over TLS"})
    tls_key: str | None = field(default=None, metadata={"help": "PEM private key for --tls-cert"})
    slow_reader_timeout_s: float = 30.0      # a client write stalled this long cancels the request
    shutdown_drain_s: float = field(default=30.0, metadata={"cli": "--drain-timeout", "help": (
        "on SIGINT/SIGTERM: seconds the streams in flight may take to finish (new requests are refused at "
        "once, health turns NOT_SERVING); those left then end with UNAVAILABLE")})


@dataclass(frozen=True)
class EngineSection:
    """What every worker's engine is built with (engine.llm_engine.build_config)."""
    cache: CacheConfig = field(default_factory=lambda: CacheConfig(kv_cache_memory=512 * 2**20))
    sched: SchedulerConfig = field(default_factory=SchedulerConfig)
    dtype: str = field(default=EngineConfig.dtype, metadata={
        "choices": tuple(DTYPE_BYTES), "help": "weights, activations and KV cache dtype of every worker"})
    quantization: str | None = field(default=EngineConfig.quantization, metadata={
        "choices": QUANTIZATIONS, "help": (
            "weight-only quantization of the linear weights (and int8 for the embedding / LM head): int4 "
            "(groups of 32) or int8 (per channel), quantized at load (a GGUF file's own Q4/Q8 blocks stay packed "
            "exactly); none = float in --dtype; pools.yaml may set it per pool")})
    speculative: str = field(default=EngineConfig.speculative, metadata={
        "choices": SPECULATIVE, "help": (
            "speculative decoding: ngram drafts tokens by prompt lookup (the sequence's last tokens matched "
            "earlier in it) and verifies them in the decode step, exact for greedy and sampled requests, "
            "adaptive per request (engine/spec/); off decodes one token per step; pools.yaml may set it per pool")})
    logprobs_mode: str = field(default=EngineConfig.logprobs_mode, metadata={
        "choices": LOGPROBS_MODES, "help": (
            "what returned logprobs are of: raw_logprobs, the model's distribution (vLLM's default; a response "
            "format's grammar applied) or processed_logprobs, the one each token is drawn from (after logit bias, "
            "penalties and temperature), untruncated; prompt logprobs are always raw")})
    kv_cache_dtype: str = field(default=EngineConfig.kv_cache_dtype, metadata={
        "choices": KV_CACHE_DTYPES, "help": (
            "KV cache of every worker: auto (= --dtype) or int8 / fp8 codes with a scale per (block, KV head), "
            "the --kv-compression format (an int8 transfer lands in an int8 cache as it is); ~4x the blocks of a "
            "float32 cache in the same memory; pools.yaml may set it per pool")})
    max_model_len: int | None = field(default=None, metadata={"min": 1,
        "help": "context length cap, prompt + output tokens (default: the model's own)"})
    threads_per_worker: int = field(default=1, metadata={   # also the Ray CPUs reserved per actor
        "help": "CPU hosts: torch threads per worker actor"})
    use_gpu: bool = field(default=False, metadata={"cli": "--gpu", "help": "one GPU per worker actor (CUDA hosts)"})
    enforce_eager: bool = field(default=False, metadata={"help": (
        "CUDA hosts: run every step eagerly; by default decode steps replay CUDA graphs captured at start, one "
        "per batch-size bucket (CPU steps are eager unless --cpu-compile)")})
    cpu_compile: bool = field(default=False, metadata={"help": (
        "CPU hosts: run pure-decode steps through one AOTInductor-compiled decoder layer (the same tokens, less "
        "per-op overhead); a worker's first start per model, dtype and threads compiles it (~20-60 s, cached "
        "under PDCLUSTER_AOTI_CACHE or ~/.cache/pdcluster/aoti); eager when compiling fails")})
    cpu_int8_rows: int = field(default=0, metadata={"min": 0, "help": (
        "CPU hosts, packed int4 weights: steps of at least this many rows (decode batches, prefill chunks) run an "
        "int8 copy of the linears with activations rounded to int8 per row (1 byte per weight more; 1.3x per "
        "decode step at 16 rows, 1.8x at 32, 3x faster prefill); 12 is the break-even measured against q4x8 "
        "(10 against torch's int4 kernel; bench/RESULTS.md); 0 = off")})

    @property
    def device(self) -> str:
        return "cuda" if self.use_gpu else "cpu"

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def engine_kwargs(self, model: str | None) -> dict:
        """build_config's keywords (plain data: they cross to the worker actors)."""
        from dataclasses import asdict
        return dict(model=model, dtype=self.dtype, quantization=self.quantization, kv_cache_dtype=self.kv_cache_dtype,
                    device=self.device, speculative=self.speculative, logprobs_mode=self.logprobs_mode,
                    max_model_len=self.max_model_len,
                    cuda_graphs=not self.enforce_eager, cpu_compile=self.cpu_compile,
                    cpu_int8_rows=self.cpu_int8_rows,
                    **asdict(self.cache), **asdict(self.sched))


@dataclass(frozen=True)
class KVSection:
    """How KV goes from prefill to decode workers."""
    transport: str = field(default=registry.TRANSPORTS[0], metadata={
        "cli": "--kv-transport", "choices": registry.TRANSPORTS, "help": (
        "how KV goes from prefill to decode workers: a plain TCP socket (default), gRPC, or mooncake (the decode "
        "side pulls over the Mooncake Transfer Engine, RDMA where NICs exist; needs pip install "
        "'pdcluster[rdma]' and libibverbs1)")})
    layerwise: bool = True                   # False: ship a request's KV only after its last layer (whole-request)
    compression: str = field(default=CompressionPolicy.mode, metadata={
        "cli": "--kv-compression", "choices": MODES, "help": (
            "KV compression on the wire (tcp and grpc transports): int8 or fp8 (e4m3) with a scale per block "
            "and KV head, ~4x fewer bytes for fp32 caches, 2x for 16-bit ones; auto compresses (int8) a "
            "transfer when the link's measured bandwidth would make it take longer than the prefill it "
            "overlaps with (off: every byte exact)")})
    bandwidth_limit: float | None = None     # bytes/s: emulate a slow prefill->decode link (token bucket)
    link: ShapedLink | None = None           # a real shaped link (deploy/netns.py; tcp transport, one host): the
                                             #   decode workers' KV servers listen on its decode end, the
                                             #   prefill workers connect from its prefill end
    secret_file: str | None = field(default=None, metadata={"cli": "--cluster-secret-file", "help": (
        "shared secret (first line, >= 16 chars) that the internal KV endpoints require; without it, a fresh "
        "random secret per serve (the router hands it to the workers it spawns)")})
    transfer_timeout_s: float = field(default=registry.TRANSFER_TIMEOUT_S, metadata={"cli": "--transfer-timeout", "help": (
        "seconds one request's KV transfer may take on either end before it fails and is recomputed")})


@dataclass(frozen=True)
class ClusterConfig:
    model: str | None = field(default=None, metadata={   # None = embedded SmolLM2-135M-Instruct
        "help": "HF folder or .gguf file (default: embedded SmolLM2-135M-Instruct)"})
    address: str | None = field(default=None, metadata={   # None = start a single-host Ray here
        "help": "join a running Ray cluster ('auto'); default: start one here"})
    server: ServerSection = field(default_factory=ServerSection)
    pools: PoolsSection = field(default_factory=PoolsSection)
    engine: EngineSection = field(default_factory=EngineSection)
    kv: KVSection = field(default_factory=KVSection)
    router: RouterConfig = field(default_factory=RouterConfig)
    timeouts: Timeouts = field(default_factory=Timeouts)
    cost: CostConfig = field(default_factory=CostConfig)   # geometry, block size and codec: filled in at start

    def __post_init__(self):
        registry.check(self.kv.transport)        # ValueError naming the transports
        CompressionPolicy(self.kv.compression)   # ValueError naming the modes
        registry.check_compression(self.kv.transport, self.kv.compression)      # (else every prefill actor fails)
        check_ranges(self)
        check_pools(self)
        if self.kv.link is not None and (self.kv.transport != "tcp" or self.address):
            raise ValueError(f"kv_link (a shaped link between namespaces of this host) needs kv_transport "
                             f"'tcp' and a cluster on this host, not {self.kv.transport!r} / address "
                             f"{self.address!r}")

    def engine_kwargs(self, role: str) -> dict:
        """The engine keywords of `role`'s workers: the engine section's, with the pool's own tuning
        (dtype, quantization, KV cache dtype, block size, max batch, speculative decoding) and KV
        cache tiers where pools.yaml sets them."""
        pool = self.pools.pool(role)
        return self.engine.engine_kwargs(self.model) | pool.engine_overrides() | pool.kv_tiers.overrides()

    def threads(self, role: str) -> int:
        """Torch threads (= Ray CPUs) per `role` worker actor."""
        t = self.pools.pool(role).threads
        return self.engine.threads_per_worker if t is None else t

    @property
    def block_size(self) -> int:
        """The KV block size of every worker (both pools agree: check_pools)."""
        return self.engine_kwargs("decode")["block_size"]

    @property
    def local_chunk_tokens(self) -> int:
        """Prompt tokens a decode worker's step computes at most while prefilling locally (its engine's
        step budget, or its chunk cap where one is set): what the cost model's TPOT guard prices."""
        k = self.engine_kwargs("decode")
        cap = k["long_prefill_token_threshold"] if k["enable_chunked_prefill"] else 0
        return min(k["max_num_batched_tokens"], cap) if cap > 0 else k["max_num_batched_tokens"]

    def dtype_bytes(self, role: str) -> int:
        return DTYPE_BYTES[self.engine_kwargs(role)["dtype"]]

    def workers(self, role: str) -> int:
        """Workers `role` starts with (no prefill pool without remote prefill)."""
        if role == "prefill" and not self.router.remote_prefill:
            return 0
        return self.pools.pool(role).initial_replicas


def check_ranges(c: ClusterConfig) -> None:
    """ValueError naming the flag (or field) of a count, port or duration out of its range: what pools.yaml's
    parser checks for the file, checked for the flags too (a zero-worker pool never serves, a port past
    65535 wraps)."""
    s = c.server
    ports = (("port", "--port", s.port), ("http_port", "--http-port", s.http_port),
             ("metrics_port", "--metrics-port", s.metrics_port))
    for name, flag, v in ports:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 65535:
            raise ValueError(f"{flag} must be a port in [0, 65535] (0: any / off), got {v!r}")
    for i, (_, flag, v) in enumerate(ports):        # each is free alone: the second listener failed after the
        clash = next((f for _, f, w in ports[i + 1:] if v and w == v), None)      # model had loaded
        if clash:
            raise ValueError(f"{flag} and {clash} are both {v}: each listener needs its own port (router.port, "
                             "router.http_port, router.metrics_port in --config)")
    if not isinstance(s.host, str) or not s.host.strip():
        raise ValueError(f"--host must be an address to bind (127.0.0.1, 0.0.0.0, ::), got {s.host!r}")
    counts = (("--decode-workers", c.pools.decode.initial_replicas, 1),
              ("--prefill-workers", c.pools.prefill.initial_replicas, 0),     # 0: local prefills only
              ("--threads-per-worker", c.engine.threads_per_worker, 1), ("--max-restarts", c.pools.max_restarts, 0))
    for flag, v, lo in counts:
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{flag} must be an integer >= {lo}, got {v!r}")
    if c.pools.prefill.initial_replicas == 0 and c.router.remote_prefill:
        raise ValueError("--prefill-workers 0 needs --local-prefill: remote prefills need a prefill worker, and "
                         "the router is not ready (health NOT_SERVING) until one is up")
    check_bounds(c)                         # the flags' own "min" / "above" bounds (deploy/flags.py)
    for flag, v, zero_ok in (("--drain-timeout", s.shutdown_drain_s, True),
                             ("--transfer-timeout", c.kv.transfer_timeout_s, False),
                             ("slow_reader_timeout_s", s.slow_reader_timeout_s, False)):
        if not (v >= 0 if zero_ok else v > 0) or v == float("inf"):          # NaN fails both
            raise ValueError(f"{flag} must be a finite number {'>=' if zero_ok else '>'} 0 seconds, got {v!r}")


def check_pools(c: ClusterConfig) -> None:
    """ValueError unless each pool's engine tuning is valid and the two pools' block sizes agree."""
    from pdcluster.engine.kv_quant import check_kv_cache_dtype
    from pdcluster.engine.quant.policy import check_mode
    for role in ("prefill", "decode"):
        p = c.pools.pool(role)
        if p.dtype is not None and p.dtype not in DTYPE_BYTES:
            raise ValueError(f"{role} pool: dtype must be one of {tuple(DTYPE_BYTES)}, got {p.dtype!r}")
        if p.kv_cache_dtype is not None:
            check_kv_cache_dtype(p.kv_cache_dtype)
        if p.quantization is not None:
            check_mode(p.quantization)
        for k in ("block_size", "threads", "max_num_seqs"):
            v = getattr(p, k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{role} pool: {k} must be an integer >= 1, got {v!r}")
        kw = c.engine_kwargs(role)
        check_tier_codec(kw["kv_cache_dtype"], kw["tier_codec"], f"{role} pool: ")
        rows = kw["cpu_int8_rows"]                                # the pool's, else the flag's
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
            raise ValueError(f"{role} pool: cpu_int8_rows must be an integer >= 0 (0 = off), got {rows!r}")
        if not 0 <= p.lo <= p.initial_replicas <= p.hi:    # pools.yaml's parser names the line; any tree holds it
            raise ValueError(f"{role} pool: need 0 <= min_replicas ({p.lo}) <= initial_replicas "
                             f"({p.initial_replicas}) <= max_replicas ({p.hi})")
        t = p.autoscale.signal_target
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf"):
            key = SLO_KEY.get(p.autoscale.signal, "target")
            raise ValueError(f"{role} pool: autoscale signal {p.autoscale.signal} needs {key} > 0, got {t!r}")
    pre, dec = (c.engine_kwargs(r)["block_size"] for r in ("prefill", "decode"))
    if pre != dec:
        raise ValueError(block_size_mismatch(pre, dec))


def block_size_mismatch(prefill: int, decode: int) -> str:
    return (f"block_size: prefill {prefill} != decode {decode}: both pools must use one KV block size (KV "
            f"blocks ship between them as they are, and prefix hashes are per block; re-blocking is not "
            f"supported)")
