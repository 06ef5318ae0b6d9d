"""Offline API: LLM().generate(prompts, SamplingParams(...))."""
from __future__ import annotations

from dataclasses import dataclass, field

from pdcluster.engine.llm_engine import LLMEngine, build_config
from pdcluster.engine.sampling_params import SamplingParams, TokenLogprobs


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str            # "stop" | "length"
    num_cached_tokens: int = 0    # prompt tokens served from the prefix cache
    logprobs: list[TokenLogprobs] = field(default_factory=list)   # per output token, with SamplingParams.logprobs
    # per prompt token with SamplingParams.prompt_logprobs, None for the first (nothing before it), as vLLM's
    prompt_logprobs: list[TokenLogprobs | None] | None = None


class LLM:
    """LLM() loads the embedded SmolLM2-135M-Instruct; LLM(model="folder_or.gguf") another model.
    Keyword arguments are engine options (dtype, block_size, num_blocks, kv_cache_memory,
    max_num_seqs, max_num_batched_tokens, enable_prefix_caching, max_model_len, host_cache_gb,
    disk_cache_dir, disk_cache_gb, tier_codec, ...)."""

    def __init__(self, model: str | None = None, **engine_kwargs):
        self.engine = LLMEngine(build_config(model, **engine_kwargs))
        self.tokenizer = self.engine.tokenizer
        self.tiers = None               # host / disk cache tiers, when host_cache_gb / disk_cache_* ask
        c = self.engine.cfg.cache
        if c.host_cache_gb > 0 or (c.disk_cache_dir and c.disk_cache_gb > 0):
            from pdcluster.kv_transfer.tiers import attach_tiers     # lazy: torch-only engines skip it
            self.tiers = attach_tiers(self.engine)

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        if isinstance(prompt, (list, tuple)):
            return list(prompt)
        raise ValueError(f"prompt must be a str or a list of token ids, got {type(prompt).__name__}")

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        if isinstance(prompts, (str,)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("sampling_params must be one SamplingParams or one per prompt")
        eng = self.engine
        encoded = [self._encode(p) for p in prompts]
        for ids, sp in zip(encoded, params):   # validate everything before allocating anything
            eng.validate(ids, sp)
        reqs = [eng.add_request(ids, sp) for ids, sp in zip(encoded, params)]
        texts = {r.request_id: [] for r in reqs}
        logprobs = {r.request_id: [] for r in reqs}
        bar = None
        if use_tqdm:
            from tqdm import tqdm
            bar = tqdm(total=len(reqs), desc="generate", unit="req")
        try:
            pending = len(reqs)
            while pending:
                for o in eng.step():
                    texts[o.request.request_id].append(o.new_text)
                    logprobs[o.request.request_id] += o.logprobs
                    if o.finished:
                        pending -= 1
                        if bar:
                            bar.update(1)
        except BaseException:
            for r in reqs:
                eng.abort(r.request_id)
            raise
        finally:
            if bar:
                bar.close()
        return [RequestOutput(r.request_id, r.prompt_token_ids, r.output_token_ids, "".join(texts[r.request_id]),
                              r.status.value, max(r.num_cached_tokens, 0), logprobs[r.request_id],
                              [None, *r.prompt_logprobs] if r.params.prompt_logprobs is not None else None)
                for r in reqs]
