"""The router's handles on worker actors: the only Ray code on the router side."""
from __future__ import annotations

from typing import AsyncIterator


class PrefillClient:
    def __init__(self, worker_id: str, handle):
        self.worker_id, self.handle = worker_id, handle

    async def prefill(self, rid: str, prompt_ids: list[int], params: dict, dest: dict | None,
                      cache_salt: str | None) -> dict:
        return await self.handle.prefill.remote(rid, prompt_ids, params, dest, cache_salt)

    async def abort(self, rid: str) -> None:
        await self.handle.abort.remote(rid)

    async def status(self) -> dict:
        return await self.handle.status.remote()


class DecodeClient:
    def __init__(self, worker_id: str, handle):
        self.worker_id, self.handle = worker_id, handle

    async def reserve(self, rid: str, prompt_ids: list[int], params: dict, cache_salt: str | None) -> dict:
        return await self.handle.reserve.remote(rid, prompt_ids, params, cache_salt)

    async def stream(self, rid: str, first_token: int | None, prompt_ids: list[int] | None = None,
                     params: dict | None = None, cache_salt: str | None = None) -> AsyncIterator[dict]:
        gen = self.handle.stream.options(num_returns="streaming").remote(
            rid, first_token, prompt_ids, params, cache_salt)
        async for ref in gen:
            yield await ref

    async def abort(self, rid: str) -> None:
        await self.handle.abort.remote(rid)

    async def status(self) -> dict:
        return await self.handle.status.remote()
