"""The router's front door: admit a request (or refuse it at once), run it, record how it went.

    admit (capacity, queue bound, expected wait)  ->  RequestRun (run.py)  ->  metrics + log line
"""
from __future__ import annotations

import asyncio
import time
import uuid

from pdcluster.engine.hashing import block_hashes
from pdcluster.engine.rules import blocks_for_lifetime
from pdcluster.engine.sampling_params import SamplingParams
from pdcluster.router.admission import refusal
from pdcluster.router.placement.cost_model import cached_tokens
from pdcluster.router.config import RouterConfig
from pdcluster.router.cost_config import CostConfig
from pdcluster.router.errors import Overloaded, Unavailable
from pdcluster.router.lifecycle.log import Trace, log_request
from pdcluster.router.lifecycle.run import RequestRun
from pdcluster.router.metrics import RouterMetrics
from pdcluster.router.placement import make_policy
from pdcluster.router.prefix_index import PrefixIndex
from pdcluster.router.registry import WorkerRegistry
from pdcluster.router.telemetry import Telemetry
from pdcluster.router.validate import InvalidRequest


class Router:
    def __init__(self, cfg: RouterConfig, tokenizer, eos_token_ids: tuple[int, ...], max_context: int,
                 metrics: RouterMetrics | None = None, cost_config: CostConfig | None = None):
        self.cfg = cfg
        self.metrics = metrics if metrics is not None else RouterMetrics()
        self.tokenizer = tokenizer
        self.tokenize_pool = None       # its one tokenizing thread, made by validate.tokenize_executor
        self.eos = tuple(eos_token_ids)
        self.max_context = max_context
        # the global prefix index (fed by the workers' block events) and learned rates
        self.index = PrefixIndex()
        self.telemetry = Telemetry(cost_config or CostConfig(block_size=cfg.block_size))
        self.workers = WorkerRegistry(cfg, self.metrics, self.index, self.telemetry)
        self.policy = make_policy(cfg.policy, index=self.index, telemetry=self.telemetry,
                                  local_prefill_max_tokens=cfg.local_prefill_max_tokens,
                                  remote_prefill=cfg.remote_prefill,
                                  **({"config": cost_config} if cost_config and cfg.policy == "cost-model" else {}))
        if hasattr(self.policy, "warm"):        # compiled pricing loaded before the first placement
            self.policy.warm()
        self.in_flight: set[str] = set()

    # workers (router/registry.py)
    def add_worker(self, role: str, client, zone: str = "") -> None:
        self.workers.add(role, client, zone)

    async def retire_worker(self, worker_id: str, stop, drain_timeout_s: float = 30.0,
                            migrate_timeout_s: float = 60.0) -> dict:
        return await self.workers.retire(worker_id, stop, drain_timeout_s, migrate_timeout_s)

    async def refresh_loads(self, wait_s: float | None = None) -> None:
        """Poll every worker (WorkerRegistry.refresh; wait_s: return then, slower polls going on)."""
        await self.workers.refresh(wait_s)

    def ready(self) -> bool:
        return self.workers.ready()

    async def close(self) -> None:
        await self.workers.close()
        if self.tokenize_pool is not None:       # (the servers that shared it are stopped)
            self.tokenize_pool.shutdown(wait=False, cancel_futures=True)
            self.tokenize_pool = None

    # requests
    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str = "",
                       cache_salt: str | None = None, deadline_s: float | None = None):
        """Async iterator of Events. Raises InvalidRequest / Overloaded / Unavailable before the
        first event; after it, failures end the stream with finish_reason "abort". deadline_s: the
        client's remaining time (None: none set)."""
        request_id = request_id or uuid.uuid4().hex
        self._admit(request_id, len(prompt_ids), params.max_tokens, deadline_s,
                    prompt_ids if params.prompt_logprobs is None else None, cache_salt)   # no cache serves those
        trace = Trace(time.perf_counter())
        run = RequestRun(self, request_id, prompt_ids, params, cache_salt, trace).events()   # (raising: nothing
        self.in_flight.add(request_id)                                                        # counted yet)
        self.metrics.admitted()
        try:
            async for ev in run:
                if trace.t_first is None and ev.token_ids:
                    trace.t_first = time.perf_counter()
                    self.metrics.first_token(trace.t_first - trace.t0)
                if ev.finish_reason:
                    trace.status = ev.finish_reason
                yield ev
        except (asyncio.CancelledError, GeneratorExit):
            trace.status = trace.status or "cancelled"
            raise
        except Unavailable:
            trace.status = "unavailable"
            raise
        except Overloaded:                  # refused at placement (router/lifecycle/place.py)
            trace.status = "overloaded"
            raise
        finally:
            trace.status = trace.status or "error"
            self.in_flight.discard(request_id)
            try:
                await run.aclose()   # run's own cleanup (aborts on the workers) before the figures are final
            finally:                 # ... which a repeated cancellation may cut short: counted all the same
                e2e = time.perf_counter() - trace.t0
                ttft = trace.t_first - trace.t0 if trace.t_first is not None else None
                self.metrics.finished(trace.status, ttft, e2e, trace.n_out)
                log_request(request_id, trace, len(prompt_ids), ttft, e2e)

    # admission
    def _admit(self, request_id: str, n_prompt: int, max_tokens: int, deadline_s: float | None,
               prompt_ids: list[int] | None = None, cache_salt: str | None = None) -> None:
        """Refuse now what could never or not in time be served; the checks in the order a client sees them."""
        if request_id in self.in_flight:
            raise InvalidRequest(f"request_id {request_id!r} is already in flight", code="ALREADY_EXISTS")
        if deadline_s is not None and deadline_s <= 0:      # (API.md: a passed deadline, not an overload)
            self.metrics.rejected("deadline")
            raise InvalidRequest("the request's deadline passed before it was admitted", code="DEADLINE_EXCEEDED")
        self._check_capacity(n_prompt, max_tokens)
        self.check_room()
        self._admit_by_wait(n_prompt, deadline_s, prompt_ids, cache_salt)

    def check_room(self) -> None:
        """Overloaded when the admission queue is full. The APIs ask before they tokenize a request
        too, so that a full queue is answered at once, not behind other requests' tokenizing."""
        if len(self.in_flight) >= self.cfg.max_in_flight:
            self.metrics.rejected("overloaded")
            raise Overloaded(f"admission queue full ({self.cfg.max_in_flight} requests in flight)")

    def _admit_by_wait(self, n_prompt: int, deadline_s: float | None, prompt_ids: list[int] | None = None,
                       cache_salt: str | None = None) -> None:
        """Overloaded (RESOURCE_EXHAUSTED) now when the prompt's prefill could not start within
        --max-queue-wait, or its first token not come within the client's deadline
        (router/admission.py). The deadline's check credits each worker's cached prefix of prompt_ids
        (the prefix index's device hits, discounted by its confidence, as the cost model counts them)."""
        c = self.cfg
        if c.max_queue_wait_s is None and deadline_s is None:
            return
        may_prefill = self.workers.loads_of("prefill") if c.remote_prefill else []
        cost = self.telemetry.cfg           # the cost model prefills locally only where its config lets it
        local_ok = (cost.allow_local and (cost.local_max_tokens is None or n_prompt <= cost.local_max_tokens)
                    if c.policy == "cost-model"     # the other policies' LocalSwitch: short, or no prefill worker up
                    else n_prompt <= c.local_prefill_max_tokens or not any(w.placeable for w in may_prefill))
        if not c.remote_prefill or local_ok:
            may_prefill += self.workers.loads_of("decode")          # a local prefill is an option too
        cached = None
        if deadline_s is not None and prompt_ids and may_prefill:
            hashes = block_hashes(prompt_ids, c.block_size, cache_salt)
            now = time.time()
            cached = {w: cached_tokens(n, n_prompt, c.block_size, self.index.confidence(w, now))
                      for w, n in self.index.match(hashes, [x.worker_id for x in may_prefill]).items()}
        why = refusal(may_prefill, self.telemetry.prefill_tps, n_prompt, c.max_queue_wait_s, deadline_s, cached)
        if why:
            self.metrics.rejected("overloaded")
            raise Overloaded(why)

    @property
    def context_tokens(self) -> int:
        """The context length served: the model's (max_context), or less where no decode worker's KV
        pool (as last reported) holds that many tokens, as vLLM never serves a max_model_len its
        cache cannot hold. What /v1/models and GetModelInfo report, what requests are checked
        against, and what an OpenAI request without max_tokens may fill."""
        most = self._largest_pool()
        return self.max_context if most is None else min(self.max_context, most * self.cfg.block_size)

    def _largest_pool(self) -> int | None:
        """Blocks of the largest decode worker's KV pool as last reported; None before any report."""
        return max((w.num_blocks for w in self.workers.loads_of("decode") if w.capacity_known), default=None)

    def _check_capacity(self, n_prompt: int, max_tokens: int) -> None:
        """InvalidRequest when no decode worker's KV pool (as last reported) can ever hold the
        request: its worker would refuse it on every placement."""
        most = self._largest_pool()
        need = blocks_for_lifetime(n_prompt, max_tokens, self.cfg.block_size)    # the workers' own rule
        if most is not None and need > most:
            raise InvalidRequest(f"prompt ({n_prompt} tokens) + sampling.max_tokens ({max_tokens}) needs {need} KV "
                                 f"blocks of {self.cfg.block_size} tokens; the largest decode worker holds {most}")
