"""Ray actor around DecodeWorker (with pdcluster/worker_actor.py, the only Ray code on the decode
side). Tokens stream back through a Ray streaming generator."""
from __future__ import annotations

import asyncio

from pdcluster.decode_worker.token_queue import TokenQueue
from pdcluster.engine.sampling_params import SamplingParams
from pdcluster.messages import Heartbeat, NoRoom, PullOrder, PullPlan, PullResult, Reservation
from pdcluster.worker_actor import WorkerActor


# A stream with no token for this long yields a heartbeat carrying the engine's step count: the
# router judges a worker by it (alive, and stepping) rather than by the time to its next token.
HEARTBEAT_S = 2.0


class DecodeActor(WorkerActor):
    role = "decode"

    def _make_worker(self, worker_id: str, engine, worker_kwargs: dict):
        from pdcluster.decode_worker.worker import DecodeWorker
        return DecodeWorker(worker_id, engine, **worker_kwargs)

    async def reserve(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                      cache_salt: str | None = None, output_ids: list[int] = ()) -> Reservation | NoRoom:
        """A Reservation, or NoRoom when the pool cannot hold the prompt right now."""
        from pdcluster.abort_fence import RequestAborted
        from pdcluster.engine.kv_connector import NoKVCapacity
        try:
            return await self._run(self.worker.reserve, request_id, prompt_ids, params, cache_salt, output_ids)
        except (NoKVCapacity, RequestAborted) as e:     # aborted: its router has left, nothing holds it
            return NoRoom(str(e))

    async def stream(self, request_id: str, first_token: int | None, prompt_ids: list[int] | None = None,
                     params: SamplingParams | None = None, cache_salt: str | None = None, output_ids: list[int] = (),
                     pull: PullPlan | None = None, holder=None):
        """Yields token items until finished. first_token given: continue a remote prefill whose KV
        was reserved; else prefill prompt_ids (then output_ids, outputs already sent) locally, pulling
        the blocks `pull` names from the worker actor `holder` (a handle) when given."""
        q = TokenQueue(asyncio.get_running_loop())
        sink = q.put_threadsafe
        if first_token is not None:
            await self._run(self.worker.start, request_id, first_token, sink)
        else:
            order_fn = self._order_fn(holder) if pull is not None and holder is not None else None
            await self._run(self.worker.generate, request_id, prompt_ids, params, cache_salt, sink, output_ids,
                            pull, order_fn)
        try:
            while True:
                item = await q.get(HEARTBEAT_S)     # every token queued by now, in one item
                if item is None:                    # nothing new (a long prefill): prove life and progress
                    yield Heartbeat(self.worker.steps())
                    continue
                yield item
                if item.finished:
                    break
        finally:
            self.worker.finished(request_id)

    def _order_fn(self, holder):
        """Orders a pull from the holder actor (called on the puller's pull thread, blocking); a dead
        or silent holder raises, which the connector turns into a recompute."""
        import ray
        timeout = self.worker.transfer_timeout_s + 5.0

        def order(o: PullOrder) -> PullResult:
            return ray.get(holder.serve_pull.remote(o), timeout=timeout)
        return order


spawn = DecodeActor.spawn
