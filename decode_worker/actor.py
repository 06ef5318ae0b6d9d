"""Ray actor around DecodeWorker (the only Ray code on the decode side). Tokens stream back
through a Ray streaming generator."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import ray

from pdcluster.deploy.worker_options import leave_terminal_group
from pdcluster.engine.sampling_params import SamplingParams
from pdcluster.messages import Heartbeat, NoRoom, Reservation


# A stream with no token for this long yields a heartbeat carrying the engine's step count: the
# router judges a worker by it (alive, and stepping) rather than by the time to its next token.
HEARTBEAT_S = 2.0


class DecodeActor:
    def __init__(self, worker_id: str, engine_kwargs: dict, num_threads: int, worker_kwargs: dict):
        import torch

        from pdcluster.logs import install_escaping
        install_escaping()              # request ids reach this worker's log lines
        leave_terminal_group()

        from pdcluster.decode_worker.worker import DecodeWorker
        from pdcluster.engine.llm_engine import LLMEngine, build_config
        torch.set_num_threads(num_threads)
        engine = LLMEngine(build_config(**engine_kwargs, num_threads=num_threads))
        engine.warmup()                 # the router's first status poll brings a measured prefill rate
        if worker_kwargs.pop("bind_node_ip", False):
            worker_kwargs["kv_host"] = ray.util.get_node_ip_address()
        self.worker = DecodeWorker(worker_id, engine, **worker_kwargs)
        self.pool = ThreadPoolExecutor(max_workers=256, thread_name_prefix="decode-rpc")

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def reserve(self, request_id: str, prompt_ids: list[int], params: dict,
                      cache_salt: str | None = None) -> Reservation | NoRoom:
        """A Reservation, or NoRoom when the pool cannot hold the prompt right now."""
        from pdcluster.engine.kv_connector import NoKVCapacity
        try:
            return await self._run(self.worker.reserve, request_id, prompt_ids, SamplingParams(**params), cache_salt)
        except NoKVCapacity as e:
            return NoRoom(str(e))

    async def stream(self, request_id: str, first_token: int | None, prompt_ids: list[int] | None = None,
                     params: dict | None = None, cache_salt: str | None = None):
        """Yields token items until finished. first_token given: continue a remote prefill whose KV
        was reserved; else prefill prompt_ids locally."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        sink = lambda item: loop.call_soon_threadsafe(q.put_nowait, item)  # noqa: E731
        if first_token is not None:
            await self._run(self.worker.start, request_id, first_token, sink)
        else:
            await self._run(self.worker.generate, request_id, prompt_ids, SamplingParams(**params), cache_salt, sink)
        try:
            while True:
                try:
                    async with asyncio.timeout(HEARTBEAT_S):    # no task per token, unlike wait_for
                        item = await q.get()
                except TimeoutError:            # nothing new (a long prefill): prove life and progress
                    yield Heartbeat(self.worker.steps())
                    continue
                yield item
                if item.finished:
                    break
        finally:
            self.worker.finished(request_id)

    async def abort(self, request_id: str) -> None:
        await self._run(self.worker.abort, request_id)

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
    opts = actor_options("decode", worker_id, num_threads, use_gpu, max_restarts)
    return ray.remote(DecodeActor).options(**opts).remote(
        worker_id, engine_kwargs, num_threads, worker_kwargs)
