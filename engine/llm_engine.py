"""The engine loop: scheduler + model runner + detokenizer behind add_request / step / abort.

Workers (prefill, decode, colocated) and the offline LLM all drive this one class.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from pdcluster.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from pdcluster.engine.detokenizer import Detokenizer
from pdcluster.engine.kv_cache_manager import KVCacheManager
from pdcluster.engine.llama import LlamaModel
from pdcluster.engine.model_runner import DTYPES, ModelRunner, num_kv_blocks
from pdcluster.engine.request import Request, Status
from pdcluster.engine.sampling_params import SamplingParams
from pdcluster.engine.scheduler import Scheduler

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    request: Request
    new_token_ids: list[int]
    new_text: str
    finished: bool

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

    def record(self, tokens: int, seqs: int, seconds: float) -> None:
        self.steps += 1
        self.tokens += tokens
        self.busy_s += seconds
        self.last_step_s, self.last_step_tokens, self.last_step_seqs = seconds, tokens, seqs
        if tokens == seqs:
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


def build_config(model: str | None = None, *, dtype: str = "float32", device: str = "cpu",
                 block_size: int = 16, num_blocks: int | None = None, kv_cache_memory: int | None = None,
                 enable_prefix_caching: bool = True, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 2048, enable_chunked_prefill: bool = True,
                 max_model_len: int | None = None, attention_backend: str = "auto",
                 num_threads: int | None = None) -> EngineConfig:
    """The edge: keyword arguments (CLI flags, YAML) into the frozen tree."""
    from dataclasses import replace

    from pdcluster.engine.loader import load_model_config

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    m = load_model_config(model)
    if max_model_len is not None:
        if max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {max_model_len}")
        m = replace(m, max_position_embeddings=min(max_model_len, m.max_position_embeddings))
    return EngineConfig(
        model=m,
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks, kv_cache_memory=kv_cache_memory,
                          enable_prefix_caching=enable_prefix_caching),
        sched=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                              enable_chunked_prefill=enable_chunked_prefill),
        device=device, dtype=dtype, attention_backend=attention_backend, num_threads=num_threads)


class LLMEngine:
    def __init__(self, cfg: EngineConfig, on_block_event=None):
        from pdcluster.engine.loader import load_weights
        from pdcluster.engine.tokenizer import load_tokenizer

        self.cfg = cfg
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        t0 = time.perf_counter()
        self.tokenizer = load_tokenizer(cfg.model)
        weights = load_weights(cfg.model, DTYPES[cfg.dtype])
        self.model = LlamaModel(cfg.model, weights, cfg.device, DTYPES[cfg.dtype], cfg.attention_backend)
        del weights
        n_blocks = num_kv_blocks(cfg)
        self.kv = KVCacheManager(n_blocks, cfg.cache.block_size, cfg.cache.enable_prefix_caching, on_block_event,
                                 cfg.cache.protected_fraction)
        self.scheduler = Scheduler(cfg.sched, self.kv, cfg.max_model_len)
        self.runner = ModelRunner(cfg, self.model, n_blocks)
        self.detoks: dict[str, Detokenizer] = {}
        self.stats = StepStats()
        self.load_seconds = time.perf_counter() - t0
        log.info("engine ready: %s, %d KV blocks x %d tokens (%.0f MiB), %.1fs", cfg.model.name, n_blocks,
                 cfg.cache.block_size, self.runner.kv_cache_bytes() / 2**20, self.load_seconds)

    def warmup(self, num_tokens: int = 256) -> float:
        """Before serving: one synthetic prompt of num_tokens (capped by the step budget, the context
        and the pool) prefilled, plus one decode step. It warms the kernels and gives the step
        counters (stats) a prefill and a decode sample of this host, so the router's rate estimates
        (admission, cost model) start measured rather than at their priors. Leaves the KV pool as
        it was: nothing cached, no block events, prefix-hit counters unchanged. Returns seconds."""
        from pdcluster.engine.sampling_params import SamplingParams
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
    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """ValueError naming the field for anything this engine can never serve."""
        if not prompt_ids:
            raise ValueError("prompt is empty")
        V = self.cfg.model.vocab_size
        bad = next((t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < V), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad!r} is outside the vocabulary [0, {V})")
        params.validate()
        self.scheduler.check_fits(len(prompt_ids), params.max_tokens)

    def make_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                     cache_salt: str | None = None) -> Request:
        self.validate(prompt_ids, params)
        return Request(prompt_ids, params, request_id, cache_salt, self.cfg.model.eos_token_ids,
                       self.cfg.cache.block_size)

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    cache_salt: str | None = None, detokenize: bool = True) -> Request:
        req = self.make_request(prompt_ids, params, request_id, cache_salt)
        self.scheduler.add(req)
        if detokenize:
            self.detoks[req.request_id] = Detokenizer(self.tokenizer, prompt_ids, params.stop)
        return req

    def abort(self, request_id: str) -> None:
        self.scheduler.abort(request_id)
        self._release(request_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def figures(self) -> dict:
        """KV pool, queue, prefix-cache and step counters: what every worker reports to the router."""
        kv = self.kv
        return dict(free_blocks=kv.num_free_blocks, num_blocks=kv.num_blocks,
                    waiting_tokens=self.scheduler.num_waiting_tokens, prefix_hits=kv.pool.hits,
                    prefix_queries=kv.pool.queries, **self.stats.as_dict())

    # step
    def step(self, layer_hook=None) -> list[StepOutput]:
        """One scheduler step. layer_hook(layer, batch), if given, runs after each layer's KV is
        stored (the prefill worker streams that layer's blocks from there)."""
        batch = self.scheduler.schedule()
        if not batch.reqs:
            return []
        t0 = time.perf_counter()
        hook = (lambda layer: layer_hook(layer, batch)) if layer_hook else None
        sampled = self.runner.run(batch, hook)
        self.stats.record(batch.total_tokens, len(batch), time.perf_counter() - t0)
        finished = set(id(r) for r in self.scheduler.update(batch, sampled))
        outs = []
        for req, tok in zip(batch.reqs, sampled):
            if tok is None or req.status is Status.FINISHED_ABORTED:
                continue
            text = ""
            d = self.detoks.get(req.request_id)
            if d is not None:
                text = d.push([tok])
                if d.stopped and id(req) not in finished:
                    self.scheduler.finish(req, Status.FINISHED_STOPPED)
                    finished.add(id(req))
                if id(req) in finished:
                    text += d.flush()
            done = id(req) in finished
            outs.append(StepOutput(req, [tok], text, done))
            if done:
                self._release(req.request_id)
        return outs

    def _release(self, request_id: str) -> None:
        self.detoks.pop(request_id, None)
        self.runner.release(request_id)
