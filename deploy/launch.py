"""Bring a cluster up: Ray, the worker actors (one device each), the router's gRPC server.

Used by `pdcluster serve` and by the end-to-end tests. `Cluster.start()` returns once every
worker has loaded the model and the router is SERVING.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass, field

from pdcluster.deploy.netns import ShapedLink
from pdcluster.deploy.scaling import Scaling

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterConfig:
    model: str | None = None                 # None = embedded SmolLM2-135M-Instruct
    host: str = "127.0.0.1"
    port: int = 50051
    prefill_workers: int = 1
    decode_workers: int = 1
    address: str | None = None               # join an existing Ray cluster ("auto"); None = start one
    threads_per_worker: int = 1              # CPU hosts: torch threads and Ray CPUs per actor
    use_gpu: bool = False
    dtype: str = "float32"
    kv_cache_memory: int = 512 * 2**20       # bytes of KV per worker
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    remote_prefill: bool = True
    local_prefill_max_tokens: int = 0
    max_in_flight: int = 512
    max_queue_wait_s: float | None = 30.0    # admission: expected wait before a prefill starts (None: off)
    kv_bandwidth_limit: float | None = None  # bytes/s: emulate a slow prefill->decode link
    kv_link: ShapedLink | None = None        # a real shaped link (deploy/netns.py; tcp transport, one host): the
                                             #   decode workers' KV TCP servers listen on its decode end, the
                                             #   prefill workers connect from its prefill end
    kv_transport: str = "tcp"                # how KV goes prefill->decode: "tcp" (plain socket, default), "grpc"
                                             # or "mooncake" (decode pulls over Mooncake: RDMA/TCP)
    kv_layerwise: bool = True                # False: ship a request's KV only after its last layer (whole-request)
    kv_compression: str = "off"              # KV on the wire: "off", "int8", "fp8" or "auto" (compress when the
                                             #   link is the bottleneck; kv_transfer/codec_policy.py); tcp/grpc only
    prefill_zone: str = ""                   # topology labels of the pools' workers (cost model: links inside a
    decode_zone: str = ""                    #   zone and across zones are priced apart)
    engine_extra: dict = field(default_factory=dict)
    cost_model: dict = field(default_factory=dict)   # router.cost_model.CostConfig fields (e.g. tpot_slo_s)
    metrics_port: int = 0                    # router's Prometheus /metrics on host:port; 0 = not served
    start_timeout_s: float = 600.0           # give up (clear error) if workers cannot be placed/loaded
    policy: str = "cost-model"               # placement: round-robin | least-loaded | cache-aware | cost-model
    auth_token_file: str | None = None       # bearer tokens (`tenant:token` lines); None = no auth
    tls_cert: str | None = None              # PEM files: serve the public endpoint over TLS
    tls_key: str | None = None
    cluster_secret_file: str | None = None   # internal KV endpoints' shared secret; None = a fresh random one
    max_restarts: int = 3                    # Ray restarts a dead worker actor this often; it re-registers
    prefill_timeout_s: float = 120.0         # bound on one remote prefill + its KV transfer
    worker_timeout_s: float = 60.0           # bound on a reserve and on the silence inside a token stream
    health_timeout_s: float = 5.0            # a worker that misses a status poll this long is unhealthy
    transfer_timeout_s: float = 30.0         # one request's KV transfer (both ends); an unclaimed decode-side
                                             # reservation is freed after prefill_timeout_s + 2x this
    slow_reader_timeout_s: float = 30.0      # a client write stalled this long cancels the request
    max_prefill_workers: int = 0             # pool bounds for the autoscaler (0 = the initial count): a Ray
    max_decode_workers: int = 0              #   started here offers this many prefill_pool / decode_pool units
    replica_start_timeout_s: float = 600.0   # a replica added while serving must load within this (node launch too)
    drain_timeout_s: float = 30.0            # scale-down: running requests finish within this, else they migrate

    def __post_init__(self):
        if self.kv_link is not None and (self.kv_transport != "tcp" or self.address):
            raise ValueError(f"kv_link (a shaped link between namespaces of this host) needs kv_transport "
                             f"'tcp' and a cluster on this host, not {self.kv_transport!r} / address "
                             f"{self.address!r}")

    def zone(self, role: str) -> str:
        return self.prefill_zone if role == "prefill" else self.decode_zone

    def engine_kwargs(self) -> dict:
        kw = dict(model=self.model, dtype=self.dtype, device="cuda" if self.use_gpu else "cpu",
                  kv_cache_memory=self.kv_cache_memory, max_num_seqs=self.max_num_seqs,
                  max_num_batched_tokens=self.max_num_batched_tokens, max_model_len=self.max_model_len)
        return kw | dict(self.engine_extra)


def cluster_secret(path: str | None) -> str:
    """The secret every internal KV endpoint requires (HMAC handshake / metadata): the first line of
    `path` (the same file on every host), or a fresh random one for this cluster (the router spawns
    every worker, so it hands them the secret; nothing outside learns it)."""
    if path is None:
        return secrets.token_urlsafe(32)
    with open(path) as f:
        s = f.readline().strip()
    if len(s) < 16:
        raise ValueError(f"{path}: the cluster secret must be at least 16 characters on its first line")
    return s


class Cluster(Scaling):
    def __init__(self, cfg: ClusterConfig):
        self.cfg = cfg
        self.router = None
        self.server = None
        self.actors: dict[str, object] = {}
        self._owns_ray = False
        self._poller = None
        self.metrics_port: int | None = None     # bound /metrics port when served
        # scaling (deploy/scaling.py): ids prefill-0.. / decode-0.. are taken by start(), later ones count on;
        self._next_index = {"prefill": cfg.prefill_workers, "decode": cfg.decode_workers}
        self.starting: dict[str, object] = {}    # worker id -> actor spawned by add_replica, still loading
        self.autoscaler = None                   # router.autoscaler.PoolAutoscaler once start_autoscaler ran
        self._autoscaler_task = None

    async def start(self) -> "Cluster":
        import ray

        from pdcluster.decode_worker import actor as decode_actor
        from pdcluster.deploy.ray_env import loopback_only, runtime_env
        from pdcluster.engine.loader import load_model_config
        from pdcluster.engine.tokenizer import load_tokenizer
        from pdcluster.prefill_worker import actor as prefill_actor
        from pdcluster.router.config import RouterConfig
        from pdcluster.router.lifecycle import Router
        from pdcluster.router.server import RouterServer
        from pdcluster.router.config import Timeouts
        from pdcluster.router.workers import DecodeClient, PrefillClient

        c = self.cfg
        self.timeouts = Timeouts(prefill_s=c.prefill_timeout_s, stream_gap_s=c.worker_timeout_s,
                                 health_s=c.health_timeout_s)
        if not ray.is_initialized():
            if c.address:
                ray.init(address=c.address, log_to_driver=False, runtime_env=runtime_env())
            else:
                n = c.threads_per_worker
                n_pre = max(c.prefill_workers, c.max_prefill_workers)     # pool units: room up to max replicas
                n_dec = max(c.decode_workers, c.max_decode_workers)
                # address="local": a fresh instance, even where a `ray start` cluster runs on this host
                # a single-host Ray: every one of its ports on loopback, no dashboard UI (issue 15)
                with loopback_only() as loopback:
                    ray.init(address="local", num_cpus=n * (n_pre + n_dec) + 1,
                             resources={"prefill_pool": n_pre, "decode_pool": n_dec},
                             include_dashboard=False, log_to_driver=False, runtime_env=runtime_env(),
                             **loopback)
                self._owns_ray = True
        mcfg = load_model_config(c.model)
        if c.max_model_len:
            from dataclasses import replace
            mcfg = replace(mcfg, max_position_embeddings=min(c.max_model_len, mcfg.max_position_embeddings))
        tok = load_tokenizer(mcfg)
        ek = c.engine_kwargs()
        secret = cluster_secret(c.cluster_secret_file)
        wk_pre = dict(bandwidth_limit_bytes_per_s=c.kv_bandwidth_limit, transport=c.kv_transport,
                      kv_layerwise=c.kv_layerwise, kv_compression=c.kv_compression, secret=secret,
                      max_restarts=c.max_restarts, transfer_timeout_s=c.transfer_timeout_s,
                      bind_node_ip=bool(c.address))   # Mooncake: decode workers READ from this node's IP
        wk_dec = dict(bind_node_ip=bool(c.address), kv_transport=c.kv_transport, secret=secret,
                      max_restarts=c.max_restarts, transfer_timeout_s=c.transfer_timeout_s,
                      # the router gives up on a prefill after prefill_timeout_s and aborts; only a
                      # reservation whose router lost track of it lives past that
                      reservation_ttl_s=c.prefill_timeout_s + 2 * c.transfer_timeout_s)
        if c.kv_link is not None:   # checked in ClusterConfig: tcp, one host
            wk_pre["kv_netns"] = c.kv_link.prefill_ns
            wk_dec |= dict(kv_tcp_netns=c.kv_link.decode_ns, kv_tcp_host=c.kv_link.decode_ip)
        self.worker_kwargs = {"prefill": wk_pre, "decode": wk_dec}   # what every spawn of a role gets
        pre = {f"prefill-{i}": prefill_actor.spawn(f"prefill-{i}", ek, c.threads_per_worker, c.use_gpu, **wk_pre)
               for i in range(c.prefill_workers if c.remote_prefill else 0)}
        dec = {f"decode-{i}": decode_actor.spawn(f"decode-{i}", ek, c.threads_per_worker, c.use_gpu, **wk_dec)
               for i in range(c.decode_workers)}
        self.actors = pre | dec
        from tqdm import tqdm  # each actor answers status once its model is loaded
        with tqdm(total=len(self.actors), desc="starting workers (loading the model)", unit="worker",
                  disable=None) as bar:     # no terminal (a log file, a service): a log line per worker instead
            if bar.disable:
                log.info("starting %d workers (loading the model) ...", len(self.actors))
            try:
                for k, fut in enumerate(asyncio.as_completed([a.status.remote() for a in self.actors.values()],
                                                             timeout=c.start_timeout_s), 1):
                    st = await fut
                    bar.update(1)
                    if bar.disable:
                        log.info("worker %s ready (%d/%d)", st.get("worker_id", "?"), k, len(self.actors))
            except asyncio.TimeoutError:
                for a in self.actors.values():
                    ray.kill(a)
                need = "GPU and " if c.use_gpu else ""
                raise RuntimeError(
                    f"workers did not start within {c.start_timeout_s:.0f}s: does the Ray cluster have free "
                    f"{need}prefill_pool/decode_pool resources? (ray status shows them)") from None
        from pdcluster.router.cost_config import CostConfig
        dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[c.dtype]
        block_size = int(ek.get("block_size", 16))
        self.router = Router(RouterConfig(max_in_flight=c.max_in_flight, max_queue_wait_s=c.max_queue_wait_s,
                                          remote_prefill=c.remote_prefill,
                                          local_prefill_max_tokens=c.local_prefill_max_tokens, policy=c.policy,
                                          block_size=block_size),
                             tok, mcfg.eos_token_ids, mcfg.max_position_embeddings,
                             cost_config=CostConfig.for_model(mcfg, dtype_bytes, block_size,
                                                              **{"kv_compression": c.kv_compression, **c.cost_model}))
        for wid, h in pre.items():
            self.router.add_worker("prefill", PrefillClient(wid, h, self.timeouts), zone=c.zone("prefill"))
        for wid, h in dec.items():
            self.router.add_worker("decode", DecodeClient(wid, h, self.timeouts), zone=c.zone("decode"))
        await self.router.refresh_loads()
        from pdcluster.router.auth import TokenAuth
        auth = TokenAuth.from_file(c.auth_token_file) if c.auth_token_file else None
        self.server = RouterServer(self.router, mcfg.name, mcfg.vocab_size, c.host, c.port, auth=auth,
                                   tls_cert=c.tls_cert, tls_key=c.tls_key,
                                   slow_reader_timeout_s=c.slow_reader_timeout_s)
        await self.server.start()
        self._poller = asyncio.ensure_future(self._poll())
        if c.metrics_port:
            self.metrics_port = self.router.metrics.serve_http(c.host, c.metrics_port)
        log.info("serving %s on %s:%d (%d prefill, %d decode workers)", mcfg.name, c.host, self.server.port,
                 len(pre), len(dec))
        return self

    @property
    def address(self) -> str:
        return f"{self.cfg.host}:{self.server.port}"

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.router.cfg.status_interval_s)
            try:
                await self.router.refresh_loads()
            except Exception:
                log.exception("status poll failed")

    async def worker_status(self) -> dict[str, dict]:
        ids = list(self.actors)
        res = await asyncio.gather(*(self.actors[i].status.remote() for i in ids))
        return dict(zip(ids, res))

    async def stop(self) -> None:
        import ray
        await self.stop_autoscaler()
        if self._poller:
            self._poller.cancel()
            try:
                await self._poller
            except (asyncio.CancelledError, Exception):
                pass
        if self.router is not None:
            self.router.metrics.stop_http()
        if self.server:
            await self.server.set_serving(False)
            await self.server.stop(1.0)
        if self.router is not None:
            await self.router.close()
        for a in self.actors.values():
            try:
                await asyncio.wait_for(a.shutdown.remote(), 10)
            except Exception:
                pass
            ray.kill(a)
        self.actors = {}
        if self._owns_ray:
            ray.shutdown()
