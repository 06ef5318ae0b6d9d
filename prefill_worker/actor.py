"""Ray actor around PrefillWorker (the only Ray code on the prefill side)."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import ray

from pdcluster.deploy.worker_options import leave_terminal_group
from pdcluster.engine.sampling_params import SamplingParams
from pdcluster.messages import KVDestination, PrefillResult


class PrefillActor:
    def __init__(self, worker_id: str, engine_kwargs: dict, num_threads: int, worker_kwargs: dict):
        import torch

        from pdcluster.logs import install_escaping
        install_escaping()              # request ids reach this worker's log lines
        leave_terminal_group()

        from pdcluster.engine.llm_engine import LLMEngine, build_config
        from pdcluster.prefill_worker.worker import PrefillWorker
        torch.set_num_threads(num_threads)
        engine = LLMEngine(build_config(**engine_kwargs, num_threads=num_threads))
        engine.warmup()                 # the router's first status poll brings a measured prefill rate
        if worker_kwargs.pop("bind_node_ip", False):  # multi-node: decode workers reach this node's IP
            worker_kwargs["kv_host"] = ray.util.get_node_ip_address()
        self.worker = PrefillWorker(worker_id, engine, **worker_kwargs)
        self.pool = ThreadPoolExecutor(max_workers=256, thread_name_prefix="prefill-rpc")

    async def prefill(self, request_id: str, prompt_ids: list[int], params: dict, dest: KVDestination | None,
                      cache_salt: str | None = None) -> PrefillResult:
        return await asyncio.get_running_loop().run_in_executor(
            self.pool, self.worker.prefill, request_id, prompt_ids, SamplingParams(**params), dest, cache_salt)

    async def abort(self, request_id: str) -> None:
        await asyncio.get_running_loop().run_in_executor(self.pool, self.worker.abort, request_id)

    async def probe(self, address: str, dst_id: str) -> float | None:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self.worker.probe, address, dst_id)

    async def status(self, drain_events: bool = False) -> dict:
        return self.worker.status(drain_events)

    async def cached_hashes(self) -> tuple[int, list[int]]:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self.worker.cached_hashes)

    async def shutdown(self) -> None:
        self.worker.close()


def spawn(worker_id: str, engine_kwargs: dict, num_threads: int, use_gpu: bool = False, max_restarts: int = 0,
          **worker_kwargs):
    """A worker actor; Ray restarts it up to max_restarts times after a crash (same arguments, fresh
    process: the router sees a new incarnation and re-registers it)."""
    from pdcluster.deploy.worker_options import actor_options
    opts = actor_options("prefill", worker_id, num_threads, use_gpu, max_restarts)
    return ray.remote(PrefillActor).options(**opts).remote(
        worker_id, engine_kwargs, num_threads, worker_kwargs)
