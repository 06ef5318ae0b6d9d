"""Bring a cluster up: Ray, the worker actors (one device each), the router's gRPC server.

Used by `pdcluster serve` and by the end-to-end tests. `Cluster.start()` returns once every
worker has loaded the model and the router is SERVING.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import replace

from pdcluster.deploy.config import ClusterConfig
from pdcluster.deploy.scaling import Scaling
from pdcluster.messages import WorkerStatus

log = logging.getLogger(__name__)


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
    if not (s.isascii() and s.isprintable()):      # it travels as gRPC metadata (gRPC and Mooncake transports)
        raise ValueError(f"{path}: the cluster secret must be printable ASCII (gRPC metadata carries it)")
    return s


RAY_START_TRIES = 2     # a local Ray head whose raylet misses Ray's 30 s registration wait is started afresh once
                        # (ray-project/ray#62883; seen once in a clean-clone CI run on this 2-core host, 12-06)


def init_local_ray(threads_per_worker: int | tuple[int, int], n_prefill: int, n_decode: int) -> None:
    """A fresh single-host Ray instance with room for n_prefill + n_decode workers: address="local"
    even where a `ray start` cluster runs on this host; every port on loopback, no dashboard UI."""
    import ray

    from pdcluster.deploy.ray_env import loopback_only, runtime_env
    pre_t, dec_t = threads_per_worker if isinstance(threads_per_worker, tuple) else (threads_per_worker,) * 2
    for attempt in range(1, RAY_START_TRIES + 1):
        try:
            with loopback_only() as loopback:
                ray.init(address="local", num_cpus=pre_t * n_prefill + dec_t * n_decode + 1,
                         resources={"prefill_pool": n_prefill, "decode_pool": n_decode},
                         include_dashboard=False, log_to_driver=False, runtime_env=runtime_env(), **loopback)
            return
        except Exception as e:      # Ray raises a bare Exception for it
            if attempt == RAY_START_TRIES or "timed out during startup" not in str(e):
                raise
            log.warning("the local Ray node did not start (%s); starting a fresh one", e)
            ray.shutdown()


def worker_kwargs(c: ClusterConfig, secret: str) -> dict[str, dict]:
    """The worker constructors' keywords per role, from the KV section and the bounds."""
    kv = c.kv
    pre = dict(bandwidth_limit_bytes_per_s=kv.bandwidth_limit, transport=kv.transport, kv_layerwise=kv.layerwise,
               kv_compression=kv.compression, secret=secret, max_restarts=c.pools.max_restarts,
               transfer_timeout_s=kv.transfer_timeout_s,
               bind_node_ip=bool(c.address))   # Mooncake: decode workers READ from this node's IP
    dec = dict(bind_node_ip=bool(c.address), kv_transport=kv.transport, secret=secret,
               max_restarts=c.pools.max_restarts, transfer_timeout_s=kv.transfer_timeout_s,
               # the router gives up on a prefill after prefill_s and aborts; only a reservation
               # whose router lost track of it lives past that
               reservation_ttl_s=c.timeouts.prefill_s + 2 * kv.transfer_timeout_s)
    if kv.link is not None:   # checked in ClusterConfig: tcp, one host
        pre["kv_netns"] = kv.link.prefill_ns
        dec |= dict(kv_tcp_netns=kv.link.decode_ns, kv_tcp_host=kv.link.decode_ip)
    return {"prefill": pre, "decode": dec}


class StartFailed(RuntimeError):
    """The workers could not be placed and loaded in time (serve says so in one line)."""


class Cluster(Scaling):
    def __init__(self, cfg: ClusterConfig):
        self.cfg = cfg
        self.router = None
        self.server = None
        self.http = None                         # router.openai.server.HttpServer when --http-port is set
        self.actors: dict[str, object] = {}
        self._owns_ray = False
        self.on_ray_up = None                    # called once Ray is up in start() (serve: its signal handlers
                                                 # again, as ray.init installs its own)
        self._poller = None
        self.metrics_port: int | None = None     # bound /metrics port when served
        # scaling (deploy/scaling.py): ids prefill-0.. / decode-0.. are taken by start(), later ones count on;
        self._next_index = {r: cfg.pools.pool(r).initial_replicas for r in ("prefill", "decode")}
        self.starting: dict[str, object] = {}    # worker id -> actor spawned by add_replica, still loading
        self.autoscaler = None                   # router.autoscaler.PoolAutoscaler once start_autoscaler ran
        self._autoscaler_task = None
        self.stopping = False                                # stop() began: nothing new is started
        self.replacing: set[asyncio.Task] = set()           # replace_dead's tasks in flight
        # replace_dead's replacements still live: worker id -> (monotonic s it joined, the wait before it, s)
        self.replaced: dict[str, tuple[float, float]] = {}
        self.tier_keys: dict[str, str] = {}                  # worker id -> its disk tier's key, where not its id
        self.free_tier_keys: dict[str, list[str]] = {}       # role -> keys left by workers gone for good

    async def start(self) -> "Cluster":
        """Start Ray (unless running), the workers, the router and its servers. On any failure what had
        started is stopped again (stop()) before the error propagates; a cancel (serve's Ctrl-C) while that
        runs neither cuts it short nor hides the start's own error."""
        try:
            return await self._start()
        except BaseException:
            cleanup = asyncio.ensure_future(self._stop_after_failed_start())
            try:
                await asyncio.shield(cleanup)
            except asyncio.CancelledError:
                asyncio.current_task().uncancel()
                await cleanup
            raise

    async def _stop_after_failed_start(self) -> None:
        try:
            await self.stop()
        except Exception:       # the start's own error is the one to see
            log.exception("stopping what a failed start had started failed too")

    async def _start(self) -> "Cluster":
        import ray

        from pdcluster.deploy.ray_env import runtime_env
        from pdcluster.engine.loader import load_model_config
        from pdcluster.engine.tokenizer import load_tokenizer
        from pdcluster.router.lifecycle import Router
        from pdcluster.router.server import RouterServer
        from pdcluster.router.workers import DecodeClient, PrefillClient

        c = self.cfg
        self.timeouts = c.timeouts
        if not ray.is_initialized():
            if c.address:
                ray.init(address=c.address, log_to_driver=False, runtime_env=runtime_env())
            else:
                # pool units: room up to each pool's max replicas
                n_pre, n_dec = (max(p.initial_replicas, p.hi) for p in (c.pools.prefill, c.pools.decode))
                init_local_ray((c.threads("prefill"), c.threads("decode")), n_pre, n_dec)
                self._owns_ray = True
        if self.on_ray_up is not None:
            self.on_ray_up()
        mcfg = load_model_config(c.model)
        if c.engine.max_model_len:
            mcfg = replace(mcfg, max_position_embeddings=min(c.engine.max_model_len, mcfg.max_position_embeddings))
        tok = load_tokenizer(mcfg)
        self.engine_kwargs = {role: c.engine_kwargs(role) for role in ("prefill", "decode")}
        self.worker_kwargs = worker_kwargs(c, cluster_secret(c.kv.secret_file))   # what every spawn of a role gets
        pre = {f"prefill-{i}": self._spawn("prefill", f"prefill-{i}") for i in range(c.workers("prefill"))}
        dec = {f"decode-{i}": self._spawn("decode", f"decode-{i}") for i in range(c.workers("decode"))}
        self.actors = pre | dec
        from tqdm import tqdm  # each actor answers status once its model is loaded
        with tqdm(total=len(self.actors), desc="starting workers (loading the model)", unit="worker",
                  disable=None) as bar:     # no terminal (a log file, a service): a log line per worker instead
            if bar.disable:
                log.info("starting %d workers (loading the model) ...", len(self.actors))
            polls = {wid: asyncio.ensure_future(a.status.remote()) for wid, a in self.actors.items()}
            try:
                for k, fut in enumerate(asyncio.as_completed(polls.values(), timeout=c.pools.start_timeout_s), 1):
                    st = await fut
                    bar.update(1)
                    if bar.disable:
                        log.info("worker %s ready (%d/%d)", st.worker_id, k, len(self.actors))
            except asyncio.TimeoutError:
                for a in self.actors.values():      # not loaded: killed at once (stop() would ask each to shut down)
                    ray.kill(a)
                self.actors = {}
                need = "GPU and " if c.engine.use_gpu else ""
                raise StartFailed(
                    f"workers did not start within {c.pools.start_timeout_s:.0f}s: does the Ray cluster have free "
                    f"{need}prefill_pool/decode_pool resources? (ray status shows them)") from None
            finally:    # a start cut short (a signal, a failed worker): a worker still loading is killed at once (stop()
                for wid, t in polls.items():        # would wait for its load to ask it to shut down), and a poll that
                    if not t.done():                # ended failing is not logged as "never retrieved"
                        t.cancel()
                        if wid in self.actors:
                            ray.kill(self.actors.pop(wid))
                    elif not t.cancelled():
                        t.exception()
        # the block size and the KV codec are the engine's and the KV section's: passed down, not repeated
        block_size = c.block_size
        self.router = Router(replace(c.router, block_size=block_size), tok, mcfg.eos_token_ids,
                             mcfg.max_position_embeddings,
                             cost_config=replace(c.cost, kv_compression=c.kv.compression,
                                                 local_chunk_tokens=c.local_chunk_tokens).with_model(
                                 mcfg, c.dtype_bytes("prefill"), block_size))
        for wid, h in pre.items():
            self.router.add_worker("prefill", PrefillClient(wid, h, self.timeouts), zone=c.pools.prefill.zone)
        for wid, h in dec.items():
            self.router.add_worker("decode", DecodeClient(wid, h, self.timeouts), zone=c.pools.decode.zone)
        self.router.workers.on_gone = self.forget_dead      # (deploy/scaling.py)
        await self.router.refresh_loads()
        if self.router.context_tokens < self.router.max_context:
            log.warning("the decode workers' KV pools hold %d tokens: the served context length is %d, not the "
                        "model's %d (--kv-cache-memory raises it)", self.router.context_tokens,
                        self.router.context_tokens, self.router.max_context)
        from pdcluster.router.auth import TokenAuth
        sv = c.server
        auth = TokenAuth.from_file(sv.auth_token_file) if sv.auth_token_file else None
        self.server = RouterServer(self.router, mcfg.name, mcfg.vocab_size, sv.host, sv.port, auth=auth,
                                   tls_cert=sv.tls_cert, tls_key=sv.tls_key,
                                   slow_reader_timeout_s=sv.slow_reader_timeout_s)
        await self.server.start()
        if sv.http_port:
            from pdcluster.router.openai.server import HttpServer
            self.http = HttpServer(self.router, mcfg.name, mcfg.vocab_size, sv.host, sv.http_port, auth=auth,
                                   tls_cert=sv.tls_cert, tls_key=sv.tls_key,
                                   slow_reader_timeout_s=sv.slow_reader_timeout_s)
            await self.http.start()
        self._poller = asyncio.ensure_future(self._poll())
        if sv.metrics_port:
            self.metrics_port = self.router.metrics.serve_http(sv.host, sv.metrics_port)
        log.info("serving %s on %s:%d (gRPC)%s (%d prefill, %d decode workers)", mcfg.name, sv.host,
                 self.server.port, f", {sv.host}:{self.http.port} (HTTP)" if self.http else "", len(pre), len(dec))
        return self

    @property
    def address(self) -> str:
        from pdcluster.ports import host_port
        return host_port(self.cfg.server.host, self.server.port)

    async def _poll(self) -> None:
        """A round every status_interval_s, however long its polls take (a round waits for them at most
        that long, and one still out goes on): a slow or hung worker neither delays nor spaces out the
        others' polls."""
        clock, interval = asyncio.get_running_loop(), self.router.cfg.status_interval_s
        due = clock.time()
        while True:
            due = max(due + interval, clock.time())     # a round that overran starts the next one now
            await asyncio.sleep(due - clock.time())
            try:
                await self.router.refresh_loads(wait_s=interval)
            except Exception:
                log.exception("status poll failed")

    async def worker_status(self, timeout_s: float = 60.0) -> dict[str, WorkerStatus]:
        """{worker id: its WorkerStatus (pdcluster.messages)}; TimeoutError naming the workers that did not
        answer within timeout_s (a hung actor does not hang the caller)."""
        ids = list(self.actors)
        tasks = [asyncio.ensure_future(self.actors[i].status.remote()) for i in ids]
        done, late = await asyncio.wait(tasks, timeout=timeout_s)
        for t in late:
            t.cancel()
        if late:
            raise TimeoutError(f"no status within {timeout_s:g}s from "
                               + ", ".join(i for i, t in zip(ids, tasks) if t in late))
        return {i: t.result() for i, t in zip(ids, tasks)}

    async def stop(self) -> None:
        import ray
        self.stopping = True
        await self.stop_autoscaler()
        await self.stop_replacing()
        if self._poller:
            self._poller.cancel()
            try:
                await self._poller
            except (asyncio.CancelledError, Exception):
                pass
        if self.router is not None:
            self.router.metrics.stop_http()
        if self.http:
            await self.http.stop()
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
