"""The router's handles on worker actors: the only Ray code on the router side.

Every call is bounded in time, and a dead, restarting or unreachable actor surfaces as WorkerLost
(the router re-places or migrates the request), never as a Ray exception type.
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator

import ray.exceptions

from router.errors import WorkerLost


async def _call(worker_id: str, ref, timeout: float):
    try:
        return await asyncio.wait_for(ref, timeout)
    except asyncio.TimeoutError:
        raise WorkerLost(worker_id, f"no answer in {timeout:.0f}s") from None
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
            ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError) as e:
        raise WorkerLost(worker_id, type(e).__name__) from None


class PrefillClient:
    def __init__(self, worker_id: str, handle, timeout_s: float = 120.0):
        self.worker_id, self.handle, self.timeout_s = worker_id, handle, timeout_s

    async def prefill(self, rid: str, prompt_ids: list[int], params: dict, dest: dict | None,
                      cache_salt: str | None) -> dict:
        return await _call(self.worker_id, self.handle.prefill.remote(rid, prompt_ids, params, dest, cache_salt),
                           self.timeout_s)

    async def abort(self, rid: str) -> None:
        await _call(self.worker_id, self.handle.abort.remote(rid), 10.0)

    async def status(self, drain_events: bool = False) -> dict:
        return await _call(self.worker_id, self.handle.status.remote(drain_events), 5.0)

    async def cached_hashes(self) -> tuple[int, list[int]]:
        return await _call(self.worker_id, self.handle.cached_hashes.remote(), 10.0)


class DecodeClient:
    def __init__(self, worker_id: str, handle, timeout_s: float = 60.0):
        self.worker_id, self.handle, self.timeout_s = worker_id, handle, timeout_s

    async def reserve(self, rid: str, prompt_ids: list[int], params: dict, cache_salt: str | None) -> dict:
        return await _call(self.worker_id, self.handle.reserve.remote(rid, prompt_ids, params, cache_salt),
                           self.timeout_s)

    async def stream(self, rid: str, first_token: int | None, prompt_ids: list[int] | None = None,
                     params: dict | None = None, cache_salt: str | None = None) -> AsyncIterator[dict]:
        """Token items; a gap longer than timeout_s between items counts as a lost worker."""
        gen = self.handle.stream.options(num_returns="streaming").remote(
            rid, first_token, prompt_ids, params, cache_salt)
        it = gen.__aiter__()
        while True:
            try:
                ref = await _call(self.worker_id, it.__anext__(), self.timeout_s)
            except StopAsyncIteration:
                return
            yield await _call(self.worker_id, ref, self.timeout_s)

    async def abort(self, rid: str) -> None:
        await _call(self.worker_id, self.handle.abort.remote(rid), 10.0)

    async def status(self, drain_events: bool = False) -> dict:
        return await _call(self.worker_id, self.handle.status.remote(drain_events), 5.0)

    async def cached_hashes(self) -> tuple[int, list[int]]:
        return await _call(self.worker_id, self.handle.cached_hashes.remote(), 10.0)
