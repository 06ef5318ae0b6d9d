"""The Ray actor part both workers share: build the engine in the actor's process, wrap the role's
plain worker (prefill_worker/worker.py, decode_worker/worker.py), run its blocking calls on threads.
With each role's actor.py, the only Ray code on the worker side."""
from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

import ray

from pdcluster.deploy.worker_options import leave_terminal_group
from pdcluster.messages import CacheSnapshot, PullOrder, PullResult, WorkerStatus


OMP_WAIT_POLICY = "PASSIVE"     # the workers' default (the environment's, when set, wins)


class WorkerActor:
    """Subclasses name their `role` and build their worker in `_make_worker`; their RPCs call the
    worker's blocking methods through `_run`."""
    role: str  # "prefill" | "decode"

    def __init__(self, worker_id: str, engine_kwargs: dict, num_threads: int, worker_kwargs: dict):
        # Before torch loads libgomp, which reads it once: OpenMP threads idle at a barrier sleep
        # instead of spinning. A worker shares its cores with the router, the client, Ray and other
        # workers, and a spinning team stalls at every barrier while one of its threads waits for
        # a core: a 2-thread worker serving on the 2-core build host decoded 1.9x slower spinning
        # (TPOT at concurrency 1; 3-6x with more load), though the engine alone steps 1.6x faster
        # (bench/RESULTS.md, serving-path overhead). The environment's OMP_WAIT_POLICY wins.
        os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
        import torch

        from pdcluster.logs import install_escaping
        install_escaping()              # request ids reach this worker's log lines
        leave_terminal_group()

        from pdcluster.engine.llm_engine import LLMEngine, build_config
        torch.set_num_threads(num_threads)

        def build() -> LLMEngine:       # on the worker's engine thread: all its torch work on one thread
            engine = LLMEngine(build_config(**engine_kwargs, num_threads=num_threads))
            engine.warmup()             # the router's first status poll brings a measured prefill rate
            return engine
        if worker_kwargs.pop("bind_node_ip", False):  # multi-node: peers reach this node's IP
            worker_kwargs["kv_host"] = ray.util.get_node_ip_address()
        self.worker = self._make_worker(worker_id, build, worker_kwargs)
        # runs the worker's blocking calls, so the actor's event loop keeps serving
        self.rpc_threads = ThreadPoolExecutor(max_workers=256, thread_name_prefix=f"{self.role}-rpc")

    def _make_worker(self, worker_id: str, engine, worker_kwargs: dict):
        """The role's worker around `engine`: an LLMEngine builder for its engine thread."""
        raise NotImplementedError

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.rpc_threads, fn, *args)

    async def abort(self, request_id: str) -> None:
        await self._run(self.worker.abort, request_id)

    async def status(self, drain_events: bool = False) -> WorkerStatus:
        return self.worker.status(drain_events)

    async def cached_hashes(self) -> CacheSnapshot:
        return await self._run(self.worker.cached_hashes)

    async def tier_hashes(self) -> tuple[int, dict[str, list[int]]]:
        return await self._run(self.worker.tier_hashes)

    async def serve_pull(self, order: PullOrder) -> PullResult:
        """A peer's pull of blocks this worker holds (kv_transfer/pull.py serve_pull)."""
        return await self._run(self.worker.serve_pull, order)

    async def shutdown(self) -> None:
        await self._run(self.worker.close)      # joins the engine's and the tiers' threads: off the event loop

    @classmethod
    def spawn(cls, worker_id: str, engine_kwargs: dict, num_threads: int, use_gpu: bool = False,
              max_restarts: int = 0, **worker_kwargs):
        """A worker actor; Ray restarts it up to max_restarts times after a crash (same arguments, fresh
        process: the router sees a new incarnation and re-registers it)."""
        from pdcluster.deploy.worker_options import actor_options
        opts = actor_options(cls.role, worker_id, num_threads, use_gpu, max_restarts)
        return ray.remote(cls).options(**opts).remote(worker_id, engine_kwargs, num_threads, worker_kwargs)
