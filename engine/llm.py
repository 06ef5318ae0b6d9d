"""Offline API: LLM().generate(prompts, SamplingParams(...)) and LLM().chat(messages, ...), as vLLM's.

Each RequestOutput also holds its completion as `outputs[0]` (a CompletionOutput), as vLLM's does."""
from __future__ import annotations

import numbers
import weakref
from dataclasses import dataclass, field

from pdcluster.engine.llm_engine import LLMEngine, build_config
from pdcluster.engine.sampling_params import SamplingParams, TokenLogprobs


@dataclass
class CompletionOutput:
    """One completion of a prompt, as vLLM's CompletionOutput."""
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprobs] | None = None


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
    prompt: str | None = None     # the prompt's text, when it was given as text

    @property
    def outputs(self) -> list[CompletionOutput]:
        """vLLM's shape: `out.outputs[0].text` is `out.text`."""
        return [CompletionOutput(0, self.text, self.token_ids, self.finish_reason, self.logprobs or None)]

    @property
    def finished(self) -> bool:
        return True


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
        # the tiers' writer drains its queue at close(), or when the LLM is collected or the interpreter exits
        # (its threads are daemons: without this, blocks still queued were lost and the next run came back colder)
        self._close = weakref.finalize(self, self.tiers.close) if self.tiers is not None else None

    def close(self) -> None:
        """Store what the tiers still have queued and release the disk tier's directory (idempotent)."""
        if self._close is not None:
            self._close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _encode(self, prompt) -> list[int]:
        """Token ids of a prompt: text, token ids, or vLLM's {"prompt": text} / {"prompt_token_ids": ids}."""
        if isinstance(prompt, dict):
            keys = set(prompt)
            if keys == {"prompt"}:
                prompt = prompt["prompt"]
            elif keys == {"prompt_token_ids"}:
                prompt = prompt["prompt_token_ids"]
            else:
                raise ValueError(f"a prompt dict takes one of 'prompt' (text) or 'prompt_token_ids', got {sorted(keys)}")
            if isinstance(prompt, dict):
                raise ValueError("a prompt dict holds text or token ids, not another dict")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        if isinstance(prompt, (list, tuple)):
            if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompt):
                raise ValueError(f"prompt token ids must be integers, got {list(prompt)[:8]!r}")
            return [int(t) for t in prompt]
        raise ValueError(f"prompt must be a str, a list of token ids or a prompt dict, got {type(prompt).__name__}")

    @staticmethod
    def _batch(prompts) -> list:
        """prompts as a list of prompts (one prompt alone: a str, a dict, or a list of token ids)."""
        if isinstance(prompts, (str, dict)):
            return [prompts]
        if isinstance(prompts, (list, tuple)):
            if prompts and all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompts):
                return [list(prompts)]
            return list(prompts)
        raise ValueError(f"prompts must be a str, a list of prompts or of token ids, got {type(prompts).__name__}")

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """vLLM's LLM.chat: one conversation (a list of {"role", "content"} messages) or a list of them,
        rendered with the model's chat template and the assistant prompt (engine/tokenizer.py: message
        content stays text, it cannot open a turn), then generated."""
        from pdcluster.engine.tokenizer import apply_chat_template
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        if not convs:
            raise ValueError("chat needs at least one conversation")
        ids = []
        for conv in convs:
            if not conv or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                   and isinstance(m.get("content"), str) for m in conv):
                raise ValueError("a conversation is a non-empty list of {'role': str, 'content': str} messages")
            ids.append(apply_chat_template(self.tokenizer, [{"role": m["role"], "content": m["content"]} for m in conv]))
        return self.generate(ids, sampling_params, use_tqdm)

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        prompts = self._batch(prompts)
        if not prompts:
            raise ValueError("no prompts")
        params = SamplingParams() if sampling_params is None else sampling_params
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params must be one SamplingParams or one per prompt: {len(params)} for "
                             f"{len(prompts)} prompts")
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
                              [None, *r.prompt_logprobs] if r.params.prompt_logprobs is not None else None,
                              _text_of(p))
                for r, p in zip(reqs, prompts)]


def _text_of(prompt) -> str | None:
    if isinstance(prompt, dict):
        prompt = prompt.get("prompt")
    return prompt if isinstance(prompt, str) else None
