"""The engine loop: scheduler + model runner + detokenizer behind add_request / step / abort.

Workers (prefill, decode, colocated) and the offline LLM all drive this one class.
"""
from __future__ import annotations

import logging
import numbers
import time
from dataclasses import dataclass, field

import torch

from pdcluster.engine.block_events import BlockEventLog
from pdcluster.engine.config import DTYPE_BYTES, CacheConfig, EngineConfig, SchedulerConfig
from pdcluster.engine.detokenizer import Detokenizer
from pdcluster.engine.kv_cache_manager import KVCacheManager
from pdcluster.engine.kv_connector import CompletingPrompt, KVConnector
from pdcluster.engine.llama import LlamaModel
from pdcluster.engine.model_runner import DTYPES, ModelRunner, num_kv_blocks
from pdcluster.engine.request import Request, Status
from pdcluster.engine.rules import stops_by_token
from pdcluster.engine.sampling_params import SamplingParams, TokenLogprobs
from pdcluster.engine.scheduler import Scheduler
from pdcluster.engine.spec.decoder import SpecDecoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemoteKV:
    """A reservation for a prompt's KV computed elsewhere (reserve_remote)."""
    skip_blocks: int                # leading blocks already here (prefix-cache hits)
    block_ids: list[int]            # the blocks to fill, in order
    cached_tokens: int              # skip_blocks x block size


@dataclass
class StepOutput:
    request: Request
    new_token_ids: list[int]
    new_text: str
    finished: bool
    logprobs: list[TokenLogprobs] = field(default_factory=list)   # one per new token, when asked

    @property
    def finish_reason(self) -> str | None:
        return self.request.status.value if self.finished else None


@dataclass
class StepStats:
    """Counters of forward steps (for metrics and the router's online rate estimates)."""
    steps: int = 0
    tokens: int = 0
    busy_s: float = 0.0
    last_step_s: float = 0.0
    last_step_tokens: int = 0
    last_step_seqs: int = 0
    prefill_tokens: int = 0    # steps with any prompt chunk in them
    prefill_s: float = 0.0
    decode_steps: int = 0      # steps of single-token decodes only
    decode_seqs: int = 0
    decode_s: float = 0.0

    def record(self, tokens: int, seqs: int, seconds: float, decode: bool | None = None) -> None:
        """decode: a step of decodes only (default: one token per sequence; a step verifying
        drafts has more and says so)."""
        self.steps += 1
        self.tokens += tokens
        self.busy_s += seconds
        self.last_step_s, self.last_step_tokens, self.last_step_seqs = seconds, tokens, seqs
        if tokens == seqs if decode is None else decode:
            self.decode_steps += 1
            self.decode_seqs += seqs
            self.decode_s += seconds
        else:
            self.prefill_tokens += tokens
            self.prefill_s += seconds

    def as_dict(self) -> dict:
        return dict(steps=self.steps, tokens=self.tokens, busy_s=self.busy_s, prefill_tokens=self.prefill_tokens,
                    prefill_s=self.prefill_s, decode_steps=self.decode_steps, decode_seqs=self.decode_seqs,
                    decode_s=self.decode_s)


def build_config(model: str | None = None, *, max_model_len: int | None = None, **knobs) -> EngineConfig:
    """The edge: keyword arguments (an offline LLM's, a worker's engine_kwargs) into the frozen tree.
    `knobs` are fields of EngineConfig, CacheConfig or SchedulerConfig by name: their defaults live
    there and only there."""
    from dataclasses import fields, replace

    from pdcluster.engine.loader import load_model_config

    parts = {cls: {f.name for f in fields(cls)} - {"model", "cache", "sched"}
             for cls in (EngineConfig, CacheConfig, SchedulerConfig)}
    unknown = sorted(set(knobs) - set().union(*parts.values()))
    if unknown:
        raise TypeError(f"build_config: unknown option(s) {', '.join(unknown)}")
    pick = {cls: {k: v for k, v in knobs.items() if k in names} for cls, names in parts.items()}
    if knobs.get("dtype", EngineConfig.dtype) not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {knobs['dtype']!r}")
    m = load_model_config(model)
    if max_model_len is not None:
        if (not isinstance(max_model_len, numbers.Integral) or isinstance(max_model_len, bool)
                or not 1 <= max_model_len <= m.max_position_embeddings):   # (vLLM refuses past the model's too)
            raise ValueError(f"max_model_len must be in [1, {m.max_position_embeddings}] (the model's context), "
                             f"got {max_model_len}")
        m = replace(m, max_position_embeddings=min(max_model_len, m.max_position_embeddings))
    return EngineConfig(model=m, cache=CacheConfig(**pick[CacheConfig]),
                        sched=SchedulerConfig(**pick[SchedulerConfig]), **pick[EngineConfig])


class LLMEngine:
    def __init__(self, cfg: EngineConfig, connector: KVConnector | None = None):
        from pdcluster.engine.loader import load_weights
        from pdcluster.engine.tokenizer import load_tokenizer

        self.cfg = cfg
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        if torch.device(cfg.device).type == "cpu":
            from pdcluster.engine.cpu_ext import slow_dtype_warning
            if (warning := slow_dtype_warning(cfg.dtype)) is not None:
                log.warning(warning)
        t0 = time.perf_counter()
        self.tokenizer = load_tokenizer(cfg.model)
        weights = load_weights(cfg.model, DTYPES[cfg.dtype], cfg.quantization)
        self.model = LlamaModel(cfg.model, weights, cfg.device, DTYPES[cfg.dtype], cfg.attention_backend,
                                 int8_rows=cfg.cpu_int8_rows, greedy_head=cfg.greedy_head,
                                 weight_codes=cfg.weight_codes)
        del weights
        n_blocks = num_kv_blocks(cfg)
        self.kv = KVCacheManager(n_blocks, cfg.cache.block_size, cfg.cache.enable_prefix_caching,
                                 protected_fraction=cfg.cache.protected_fraction)
        self.events: BlockEventLog | None = None        # prefix-cache events, once a worker asks for them
        # engine/spec/: drafts in decode steps. Not over a quantized KV cache: a rejected draft's row raises its
        # block's scale (kernels/store_kv.py: a scale only grows) and requantizes the rows before it, so drafting
        # changed greedy output there
        drafts = cfg.speculative == "ngram" and cfg.kv_cache_dtype == "auto"
        if cfg.speculative == "ngram" and not drafts:
            log.info("speculative decoding is off: the KV cache is %s (a rejected draft would change its block's "
                     "scale)", cfg.kv_cache_dtype)
        self.spec = (SpecDecoder(k_max=cfg.spec_ngram_k, n_max=cfg.spec_ngram_n,
                                 max_step_tokens=cfg.spec_max_step_tokens) if drafts else None)
        self.scheduler = Scheduler(cfg.sched, self.kv, cfg.max_model_len, spec=self.spec)
        self.runner = ModelRunner(cfg, self.model, n_blocks)
        self.connector = connector or KVConnector()     # KV in and out of this engine (engine/kv_connector.py)
        self.detoks: dict[str, Detokenizer] = {}
        self.stats = StepStats()
        self.idle_polls = 0             # steps that found work but nothing to schedule yet (room, loads)
        # the requests of the step in progress once scheduled; None while scheduling: what a failed step
        # aborts (engine/engine_thread.py: the batch only, or every queued request if it failed before)
        self.stepping: list[Request] | None = None
        self.load_seconds = time.perf_counter() - t0
        log.info("engine ready: %s, %d KV blocks x %d tokens (%.0f MiB), %.1fs", cfg.model.name, n_blocks,
                 cfg.cache.block_size, self.runner.kv_cache_bytes() / 2**20, self.load_seconds)

    @property
    def connector(self) -> KVConnector:
        return self.scheduler.connector

    @connector.setter
    def connector(self, connector: KVConnector) -> None:
        """Swap the connector (a worker sets its own once, before serving); it gets the caches."""
        connector.register_caches(self.runner.k_caches, self.runner.v_caches)
        self.scheduler.connector = connector
        self.kv.pool.on_evict = connector.evicted      # a lower cache tier keeps evicted blocks
        self.kv.on_cached = connector.computed         # ... and, writing through, computed ones

    def warmup(self, num_tokens: int = 256) -> float:
        """Before serving: one synthetic prompt of num_tokens (capped by the step budget, the context
        and the pool) prefilled, plus one decode step. It warms the kernels and gives the step
        counters (stats) a prefill and a decode sample of this host, so the router's rate estimates
        (admission, cost model) start measured rather than at their priors. Leaves the KV pool as
        it was: nothing cached, no block events, prefix-hit counters unchanged. Returns seconds."""
        c, pool = self.cfg, self.kv.pool
        n = min(num_tokens, c.sched.max_num_batched_tokens, c.max_model_len - 2,
                (pool.num_free_blocks - 1) * c.cache.block_size)
        if n < 1:
            return 0.0
        t0 = time.perf_counter()
        saved = pool.on_event, pool.queries, pool.hits
        pool.on_event = None
        ids = [(7919 * i) % c.model.vocab_size for i in range(n)]     # any in-vocabulary tokens
        req = self.add_request(ids, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
                               request_id="warmup", cache_salt=f"warmup-{time.time_ns()}", detokenize=False)
        try:
            while not req.is_finished:
                self.step()
        finally:
            if not req.is_finished:
                self.abort(req.request_id)
            pool.reset_prefix_cache(only=set(req.block_hashes()))    # its own blocks, salted: no one else's
            pool.on_event, pool.queries, pool.hits = saved
        return time.perf_counter() - t0

    # requests
    def validate(self, prompt_ids: list[int], params: SamplingParams, output_ids: list[int] = ()) -> None:
        """ValueError naming the field for anything this engine can never serve. output_ids: outputs
        an earlier attempt sampled (a migrated request resumes with them; they count in max_tokens)."""
        if not prompt_ids:
            raise ValueError("prompt is empty")
        V = self.cfg.model.vocab_size
        for name, ids in (("prompt", prompt_ids), ("output", output_ids)):
            bad = next((t for t in ids if type(t) is not int or not 0 <= t < V), None)
            if bad is not None:
                raise ValueError(f"{name} token id {bad!r} is outside the vocabulary [0, {V})")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        params.validate()
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", [t for t, _ in params.logit_bias])):
            bad = next((t for t in ids if not 0 <= t < V), None)
            if bad is not None:
                raise ValueError(f"{name}: token id {bad} is outside the vocabulary [0, {V})")
        if len(output_ids) >= params.max_tokens:
            raise ValueError(f"{len(output_ids)} output tokens already reach max_tokens ({params.max_tokens})")
        self.scheduler.check_fits(len(prompt_ids), params.max_tokens)
        if params.structured is not None:
            self.grammars().compile(params.structured)     # ValueError for a schema it cannot take
            if output_ids:
                self.grammars().check_prefix(params.structured, output_ids)

    def grammars(self):
        """This engine's structured-output grammars (engine/structured.py), made on first use."""
        if self.runner.grammars is None:
            from pdcluster.engine.structured import Grammars
            self.runner.grammars = Grammars(self.tokenizer, self.cfg.model.vocab_size)
        return self.runner.grammars

    def make_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                     cache_salt: str | None = None, output_ids: list[int] = ()) -> Request:
        self.validate(prompt_ids, params, output_ids)
        return Request(prompt_ids, params, request_id, cache_salt, self.cfg.model.eos_token_ids,
                       self.cfg.cache.block_size, output_ids)

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    cache_salt: str | None = None, detokenize: bool = True, output_ids: list[int] = ()) -> Request:
        """Queue a request. output_ids: it resumes after these outputs (prefilled with the prompt;
        the penalties, the grammar and max_tokens count them as sampled)."""
        req = self.make_request(prompt_ids, params, request_id, cache_salt, output_ids)
        self.scheduler.add(req)
        self._resume(req)
        if detokenize:
            self.detoks[req.request_id] = Detokenizer(self.tokenizer, req.token_ids, params.stop, params.min_tokens)
        return req

    def _resume(self, req: Request) -> None:
        """A request added with outputs: its grammar matcher replays them (validate checked they pass)."""
        if req.num_output_tokens and req.params.structured is not None:
            self.grammars()
            self.runner.accept(req, req.output_token_ids)

    def abort(self, request_id: str) -> Request | None:
        """End request_id wherever it is (queued, running, waiting for remote KV), free its blocks
        and tell the connector first (it fences late KV before the blocks are free); the request,
        or None if it was not here. Idempotent."""
        self.connector.request_aborted(request_id)
        req = self.scheduler.abort(request_id)
        self._release(request_id)
        return req

    # KV from outside (a decode worker's half of a remote prefill; engine/kv_connector.py)
    def reserve_remote(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                       cache_salt: str | None = None, output_ids: list[int] = ()) -> RemoteKV:
        """Allocate the whole prompt's blocks (prefix hits reused) for KV computed elsewhere; the
        connector learns of them through after_alloc and the request waits until start_remote.
        output_ids: as add_request's (their KV comes with the prompt's).
        NoKVCapacity (engine/kv_connector.py): no room now."""
        req = self.make_request(prompt_ids, params, request_id, cache_salt, output_ids)
        skip, block_ids = self.scheduler.add_remote(req)
        self._resume(req)
        return RemoteKV(skip_blocks=skip, block_ids=block_ids, cached_tokens=skip * self.cfg.cache.block_size)

    def start_remote(self, request_id: str, first_token: int) -> None:
        """The prompt's KV should be in (the connector says): the request runs from first_token on.
        RuntimeError (request aborted) if the KV is incomplete; ValueError (request finished) if
        first_token already ends it; KeyError if request_id holds no reservation."""
        req = self.scheduler.requests.get(request_id)
        if req is None or req.status is not Status.WAITING_FOR_REMOTE_KV:
            raise KeyError(f"no KV reservation for {request_id!r}")
        why = self.connector.take_loaded(request_id)
        if why is not None:
            self.abort(request_id)
            raise RuntimeError(f"KV for {request_id} not complete: {why}")
        if req.params.structured is not None:   # the prefill worker's grammar took it: so does ours
            try:
                self.grammars()
                self.runner.accept(req, [first_token])
            except Exception:                   # ours refused it (another grammar build?): the reservation
                self.abort(request_id)          # goes, not left for the router's abort to free
                raise
        try:
            self.scheduler.remote_kv_done(req, first_token)
        except ValueError:                      # finished by its first token: its matcher goes with it
            self._release(request_id)
            raise

    def queue_lengths(self) -> tuple[int, int]:
        """(running, waiting) requests; reservations for remote KV are in neither (those whose KV is in,
        waiting for a batch slot, count as waiting)."""
        s = self.scheduler
        return len(s.running), len(s.waiting) + len(s.joining)

    def kv_caches(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer K and V caches, [num_blocks, block_size, kv_heads, head_dim] each: what a
        transport registers or writes into (the cache outlives every connector)."""
        return self.runner.k_caches, self.runner.v_caches

    def kv_block_bytes(self) -> int:
        """Bytes of one block's K and V over all layers (scales included for a quantized cache)."""
        return self.runner.kv_cache_bytes() // self.kv.num_blocks

    def kv_block_model_bytes(self) -> int:
        """Bytes of one block's K and V over all layers in the model's dtype, whatever the pool's codec: the unit
        the router prices KV in (CostConfig.kv_bytes_per_token), so the tier load rates it learns use it too."""
        return self.cfg.cache.block_size * self.cfg.model.kv_bytes_per_token(DTYPE_BYTES[self.cfg.dtype])

    def block_events(self) -> BlockEventLog:
        """The log of this engine's prefix-cache events (created and attached on first call)."""
        if self.events is None:
            self.events = BlockEventLog()
            self.events.attach(self.kv.pool)
        return self.events

    def block_snapshot(self) -> tuple[int, list[int]]:
        """(event sequence number, every cached chain hash): a full resync; engine thread."""
        return self.block_events().snapshot(self.kv.pool)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def figures(self) -> dict:
        """KV pool, queue, prefix-cache and step counters: what every worker reports to the router."""
        kv = self.kv
        return dict(free_blocks=kv.num_free_blocks, free_cached_blocks=kv.num_free_cached_blocks,
                    num_blocks=kv.num_blocks,
                    waiting_tokens=self.scheduler.num_waiting_tokens, prefix_hits=kv.pool.hits,
                    prefix_queries=kv.pool.queries, **self.stats.as_dict())

    # step
    def step(self) -> list[StepOutput]:
        """One scheduler step. A saving connector gets each layer as soon as it is stored (the
        prefill worker streams that layer's blocks from there). The connector's finished loads
        and sends are taken in first. A request whose in-step load fails (failed_in_step, asked
        before scheduling and between the forward pass and sampling) is not sampled, its step's
        results are dropped and it recomputes (Scheduler.loads_failed)."""
        sched, conn = self.scheduler, self.connector
        self.stepping = None
        sched.loads_done(conn.finished_loading())
        sched.loads_failed(conn.failed_in_step())
        sched.sends_done(conn.finished_sending())
        batch = sched.schedule()
        self.stepping = batch.reqs
        if not batch.reqs:
            if sched.loading or sched.held or sched.waiting:
                # only the connector or a freed block can make progress: poll, don't spin; counted as the
                # engine's own progress (a heartbeat's: alive and waiting, not stuck; decode_worker/worker.py)
                self.idle_polls += 1
                time.sleep(0.001)
            return []
        t0 = time.perf_counter()
        hook = None
        if self.connector.saves:
            done = [CompletingPrompt(r.request_id, tuple(r.block_ids))
                    for i, r in enumerate(batch.reqs) if batch.samples(i)]
            k, v = self.runner.k_caches, self.runner.v_caches
            hook = lambda layer: self.connector.save_layer(layer, k, v, done)   # noqa: E731
        failed: set[str] = set()
        drop = None
        if conn.loads:
            def drop() -> set[str]:     # after every layer's wait: each load this step read has ended or is in
                failed.update(sched.loads_failed(conn.failed_in_step()))
                return failed
        sampled, logprobs = self.runner.run(batch, hook, conn.wait_layer if conn.loads else None, drop)
        # a decode step is one token per request plus drafts (engine/spec/): record it as a decode
        drafts = sum(len(r.spec_token_ids) for r in batch.reqs)
        decode = batch.total_tokens - drafts == len(batch)
        self.stats.record(batch.total_tokens, len(batch), time.perf_counter() - t0, decode)
        if failed:
            batch, sampled, logprobs = batch.without(failed, sampled, logprobs)
        before = [r.num_tokens for r in batch.reqs]
        finished = set(id(r) for r in self.scheduler.update(batch, sampled))
        outs = []
        for req, n0, tok, lp in zip(batch.reqs, before, sampled, logprobs):
            if tok is None or req.status is Status.FINISHED_ABORTED:
                continue
            toks = req.token_ids[n0:]          # what update appended: one token, or several verified ones
            text = ""
            d = self.detoks.get(req.request_id)
            if d is not None:
                for j, t in enumerate(toks):
                    if j == len(toks) - 1 and id(req) in finished and stops_by_token(t, req.params, req.eos_token_ids):
                        break                   # a stop token: in token_ids, not in the text (engine/rules.py)
                    text += d.push([t])
                    if d.stopped:               # a stop string: the tokens after this one are dropped
                        del req.token_ids[n0 + j + 1:]
                        toks = toks[:j + 1]
                        break
                if d.stopped and id(req) not in finished:
                    self.scheduler.finish(req, Status.FINISHED_STOPPED)
                    finished.add(id(req))
                elif d.stopped:                 # the step's last token also reached max_tokens: the stop
                    req.status = Status.FINISHED_STOPPED     # string it completed is the reason (as vLLM's)
                if id(req) in finished:
                    text += d.flush()
                    if d.stopped:               # a stop string the last token's bytes completed: the reason
                        req.status = Status.FINISHED_STOPPED
            done = id(req) in finished
            outs.append(StepOutput(req, toks, text, done, [lp] if lp is not None else []))
            if done:
                self._release(req.request_id)
        return outs

    def _release(self, request_id: str) -> None:
        self.detoks.pop(request_id, None)
        self.runner.release(request_id)
