"""The router's handles on worker actors: the only Ray code on the router side.

Every call is bounded in time, and a dead, restarting, hung or unreachable actor surfaces as
WorkerLost (the router re-places or migrates the request), never as a Ray exception type; one dead
for good (Ray's ActorDiedError: no restart left) as WorkerGone, a WorkerLost.
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator

import ray.exceptions

from pdcluster.engine.sampling_params import SamplingParams
from pdcluster.messages import (CacheSnapshot, Heartbeat, KVDestination, NoRoom, PrefillResult, PullPlan, Reservation,
                                TokenItem, WorkerStatus)
from pdcluster.router.config import Timeouts
from pdcluster.router.errors import WorkerGone, WorkerLost


LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.WorkerCrashedError,
        ray.exceptions.ObjectLostError)


async def _call(worker_id: str, ref, timeout: float):
    try:
        return await asyncio.wait_for(ref, timeout)
    except asyncio.TimeoutError:
        raise WorkerLost(worker_id, f"no answer in {timeout:.0f}s") from None
    except ray.exceptions.ActorDiedError:   # (a restart in progress reads as ActorUnavailableError)
        raise WorkerGone(worker_id, "ActorDiedError") from None
    except LOST as e:
        raise WorkerLost(worker_id, type(e).__name__) from None


async def _next_item(worker_id: str, gen, timeout: float):
    """A streaming generator's next item, within timeout seconds (StopAsyncIteration at its end).
    Per token: one deadline and no task (wait_for makes one), and the value read without a second
    wait when __anext__ already waited for it (the usual case)."""
    try:
        async with asyncio.timeout(timeout):
            ref = await gen.__anext__()
            try:
                return ray.get(ref, timeout=0)
            except ray.exceptions.GetTimeoutError:
                return await ref
    except TimeoutError:
        raise WorkerLost(worker_id, f"no answer in {timeout:.0f}s") from None
    except ray.exceptions.ActorDiedError:
        raise WorkerGone(worker_id, "ActorDiedError") from None
    except LOST as e:
        raise WorkerLost(worker_id, type(e).__name__) from None


class WorkerClient:
    """The calls every worker answers: abort a request, report its status, list its cached blocks."""

    def __init__(self, worker_id: str, handle, timeouts: Timeouts = Timeouts()):
        self.worker_id, self.handle, self.t = worker_id, handle, timeouts

    async def abort(self, request_id: str) -> None:
        await _call(self.worker_id, self.handle.abort.remote(request_id), self.t.control_s)

    async def status(self, drain_events: bool = False) -> WorkerStatus:
        return await _call(self.worker_id, self.handle.status.remote(drain_events), self.t.health_s)

    async def cached_hashes(self) -> CacheSnapshot:
        return await _call(self.worker_id, self.handle.cached_hashes.remote(), self.t.control_s)


class PrefillClient(WorkerClient):
    async def prefill(self, request_id: str, prompt_ids: list[int], params: SamplingParams, dest: KVDestination | None,
                      cache_salt: str | None, output_ids: list[int] = ()) -> PrefillResult:
        return await _call(self.worker_id,
                           self.handle.prefill.remote(request_id, prompt_ids, params, dest, cache_salt, output_ids),
                           self.t.prefill_s)

    async def probe(self, address: str, dst_id: str) -> float | None:
        """bytes/s of the link to a decode worker's KV endpoint (None: the transport cannot probe)."""
        return await _call(self.worker_id, self.handle.probe.remote(address, dst_id), self.t.prefill_s)


class DecodeClient(WorkerClient):
    async def reserve(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                      cache_salt: str | None, output_ids: list[int] = ()) -> Reservation | NoRoom:
        return await _call(self.worker_id,
                           self.handle.reserve.remote(request_id, prompt_ids, params, cache_salt, output_ids),
                           self.t.stream_gap_s)

    async def stream(self, request_id: str, first_token: int | None, prompt_ids: list[int] | None = None,
                     params: SamplingParams | None = None, cache_salt: str | None = None,
                     output_ids: list[int] = (), pull: PullPlan | None = None,
                     holder: WorkerClient | None = None) -> AsyncIterator[TokenItem]:
        """Token items. pull, holder: a local prefill pulls the plan's blocks from holder (its handle
        goes to the worker, which orders the blocks from it; kv_transfer/pull.py). The worker is lost
        after stream_gap_s without an item, or after stream_gap_s of heartbeats whose engine step count
        stands still (alive but stuck); a long prefill that keeps stepping is never lost. Heartbeats
        are consumed here."""
        extra = (pull, holder.handle) if pull is not None and holder is not None else ()
        gen = self.handle.stream.options(num_returns="streaming").remote(
            request_id, first_token, prompt_ids, params, cache_salt, output_ids, *extra)
        loop = asyncio.get_running_loop()
        steps, since = None, loop.time()        # the last step count seen, and when it last moved
        while True:
            try:
                item = await _next_item(self.worker_id, gen, self.t.stream_gap_s)
            except StopAsyncIteration:
                return
            if not isinstance(item, Heartbeat):
                steps, since = None, loop.time()
                yield item
                continue
            if item.steps != steps:
                steps, since = item.steps, loop.time()
            elif loop.time() - since > self.t.stream_gap_s:
                raise WorkerLost(self.worker_id, f"no engine step in {self.t.stream_gap_s:.0f}s")
