"""Bring a cluster up: Ray, the worker actors (one device each), the router's gRPC server.

Used by `pdcluster serve` and by the end-to-end tests. `Cluster.start()` returns once every
worker has loaded the model and the router is SERVING.
"""
from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field

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
    kv_bandwidth_limit: float | None = None  # bytes/s: emulate a slow prefill->decode link
    kv_transport: str = "tcp"                # "tcp" (plain socket, default) or "grpc": how KV goes prefill->decode
    engine_extra: dict = field(default_factory=dict)
    metrics_port: int = 0                    # router's Prometheus /metrics on host:port; 0 = not served
    start_timeout_s: float = 600.0           # give up (clear error) if workers cannot be placed/loaded
    policy: str = "least-loaded"             # placement: round-robin | least-loaded | cache-aware | cost-model
    auth_token_file: str | None = None       # bearer tokens (`tenant:token` lines); None = no auth
    tls_cert: str | None = None              # PEM files: serve the public endpoint over TLS
    tls_key: str | None = None

    def engine_kwargs(self) -> dict:
        kw = dict(model=self.model, dtype=self.dtype, device="cuda" if self.use_gpu else "cpu",
                  kv_cache_memory=self.kv_cache_memory, max_num_seqs=self.max_num_seqs,
                  max_num_batched_tokens=self.max_num_batched_tokens, max_model_len=self.max_model_len)
        return kw | dict(self.engine_extra)


class Cluster:
    def __init__(self, cfg: ClusterConfig):
        self.cfg = cfg
        self.router = None
        self.server = None
        self.actors: dict[str, object] = {}
        self._owns_ray = False
        self._poller = None
        self.metrics_port: int | None = None     # bound /metrics port when served

    async def start(self) -> "Cluster":
        import ray

        from decode_worker import actor as decode_actor
        from engine.loader import load_model_config
        from engine.tokenizer import load_tokenizer
        from prefill_worker import actor as prefill_actor
        from router.lifecycle import Pools, Router, RouterConfig
        from router.server import RouterServer
        from router.workers import DecodeClient, PrefillClient

        c = self.cfg
        if not ray.is_initialized():
            if c.address:
                ray.init(address=c.address, log_to_driver=False)
            else:
                n = c.threads_per_worker
                ray.init(num_cpus=n * (c.prefill_workers + c.decode_workers) + 1,
                         resources={"prefill_pool": c.prefill_workers, "decode_pool": c.decode_workers},
                         include_dashboard=False, log_to_driver=False,
                         runtime_env={"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
                                                   "TOKENIZERS_PARALLELISM": "false"}})
                self._owns_ray = True
        mcfg = load_model_config(c.model)
        if c.max_model_len:
            from dataclasses import replace
            mcfg = replace(mcfg, max_position_embeddings=min(c.max_model_len, mcfg.max_position_embeddings))
        tok = load_tokenizer(mcfg)
        ek = c.engine_kwargs()
        wk_pre = dict(bandwidth_limit_bytes_per_s=c.kv_bandwidth_limit, transport=c.kv_transport)
        wk_dec = dict(bind_node_ip=bool(c.address), kv_transport=c.kv_transport)
        pre = {f"prefill-{i}": prefill_actor.spawn(f"prefill-{i}", ek, c.threads_per_worker, c.use_gpu, **wk_pre)
               for i in range(c.prefill_workers if c.remote_prefill else 0)}
        dec = {f"decode-{i}": decode_actor.spawn(f"decode-{i}", ek, c.threads_per_worker, c.use_gpu, **wk_dec)
               for i in range(c.decode_workers)}
        self.actors = pre | dec
        from tqdm import tqdm  # each actor answers status once its model is loaded
        with tqdm(total=len(self.actors), desc="starting workers (loading the model)", unit="worker",
                  disable=None) as bar:
            try:
                for fut in asyncio.as_completed([a.status.remote() for a in self.actors.values()],
                                                timeout=c.start_timeout_s):
                    await fut
                    bar.update(1)
            except asyncio.TimeoutError:
                for a in self.actors.values():
                    ray.kill(a)
                need = "GPU and " if c.use_gpu else ""
                raise RuntimeError(
                    f"workers did not start within {c.start_timeout_s:.0f}s: does the Ray cluster have free "
                    f"{need}prefill_pool/decode_pool resources? (ray status shows them)") from None
        from router.cost_model import CostConfig
        dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[c.dtype]
        block_size = int(ek.get("block_size", 16))
        self.router = Router(RouterConfig(max_in_flight=c.max_in_flight, remote_prefill=c.remote_prefill,
                                          local_prefill_max_tokens=c.local_prefill_max_tokens, policy=c.policy,
                                          block_size=block_size),
                             tok, mcfg.eos_token_ids, mcfg.max_position_embeddings, Pools(),
                             cost_config=CostConfig.for_model(mcfg, dtype_bytes, block_size))
        for wid, h in pre.items():
            self.router.add_worker("prefill", PrefillClient(wid, h))
        for wid, h in dec.items():
            self.router.add_worker("decode", DecodeClient(wid, h))
        await self.router.refresh_loads()
        from router.auth import TokenAuth
        auth = TokenAuth.from_file(c.auth_token_file) if c.auth_token_file else None
        self.server = RouterServer(self.router, mcfg.name, mcfg.vocab_size, c.host, c.port, auth=auth,
                                   tls_cert=c.tls_cert, tls_key=c.tls_key)
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
        for a in self.actors.values():
            try:
                await asyncio.wait_for(a.shutdown.remote(), 10)
            except Exception:
                pass
            ray.kill(a)
        self.actors = {}
        if self._owns_ray:
            ray.shutdown()
