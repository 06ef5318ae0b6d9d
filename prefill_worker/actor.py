"""Ray actor around PrefillWorker (with pdcluster/worker_actor.py, the only Ray code on the prefill side)."""
from __future__ import annotations

from pdcluster.engine.sampling_params import SamplingParams
from pdcluster.messages import KVDestination, PrefillResult
from pdcluster.worker_actor import WorkerActor


class PrefillActor(WorkerActor):
    role = "prefill"

    def _make_worker(self, worker_id: str, engine, worker_kwargs: dict):
        from pdcluster.prefill_worker.worker import PrefillWorker
        return PrefillWorker(worker_id, engine, **worker_kwargs)

    async def prefill(self, request_id: str, prompt_ids: list[int], params: SamplingParams, dest: KVDestination | None,
                      cache_salt: str | None = None, output_ids: list[int] = ()) -> PrefillResult:
        return await self._run(self.worker.prefill, request_id, prompt_ids, params, dest, cache_salt, output_ids)

    async def probe(self, address: str, dst_id: str) -> float | None:
        return await self._run(self.worker.probe, address, dst_id)


spawn = PrefillActor.spawn
