"""OpenAI request bodies -> prompts and SamplingParams (through the validation the gRPC API uses,
router/validate.py), and router Events -> OpenAI response objects. Pure Python: no HTTP here.

Choices: prompt i's choice j has index i * n + j (router/lifecycle/choices.py runs them; seeded
choice j draws with seed + j).
"""
from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field

from pdcluster.engine.sampling_params import SamplingParams, TokenLogprobs
from pdcluster.engine.structured import MAX_SCHEMA, StructuredOutput
from pdcluster.router.lifecycle.choices import Choice, choice_params
from pdcluster.router.openai import tools
from pdcluster.router.openai.schemas import MAX_PROMPTS, ChatCompletionRequest, CompletionRequest, Sampling
from pdcluster.router.validate import (InvalidRequest, check_choices, check_fits, check_structured, check_token_ids,
                                       make_sampling, tokenize_chat, tokenize_text)


@dataclass
class Job:
    """What one HTTP request asks for: its prompts (token ids) and one SamplingParams per choice."""
    prompts: list[list[int]]
    params: list[list[SamplingParams]]  # [prompt][choice]
    n: int
    logprobs: int | None                # top alternatives per token, None: no logprobs
    tools: tools.ToolPlan | None = None  # chat answers held to the tool envelope (router/openai/tools.py)
    echo: list[str] | None = None       # completions' echo: each prompt's text, shown before its choices'

    def choices(self, base_id: str) -> list[Choice]:
        """Every choice in index order: prompt i's choice j is request f"{base_id}-{i * n + j}"."""
        return [Choice(f"{base_id}-{i * self.n + j}", ids, p)
                for i, (ids, ps) in enumerate(zip(self.prompts, self.params)) for j, p in enumerate(ps)]


def structured_of(req: Sampling) -> StructuredOutput | None:
    f = req.response_format
    if f is not None and f.type != "json_schema" and f.json_schema is not None:
        raise InvalidRequest(f"response_format type {f.type!r} takes no json_schema", param="response_format")
    if f is None or f.type == "text":
        return None
    if f.type == "json_schema":
        if f.json_schema is None:
            raise InvalidRequest("response_format json_schema needs a json_schema object", param="response_format")
        return StructuredOutput("json_schema", json.dumps(f.json_schema.schema_))
    return StructuredOutput("json_object")


def logit_bias_of(bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's logit_bias keys are token ids as decimal strings ("50256"); anything else is refused."""
    out = {}
    for k, v in (bias or {}).items():
        if not (k.isascii() and k.isdigit()) or len(k) > 12:
            raise InvalidRequest(f"logit_bias keys must be token ids (decimal strings), got {k[:40]!r}",
                                 param="logit_bias")
        if int(k) in out:
            raise InvalidRequest(f"logit_bias names token {int(k)} twice", param="logit_bias")
        out[int(k)] = v
    return out


def chat_messages(req: ChatCompletionRequest, plan: tools.ToolPlan | None) -> list[dict]:
    """Role/content dicts for the chat template: tool calls in history as their envelope, and where the model
    may call tools, how to (a system message's addition)."""
    msgs = []
    for i, m in enumerate(req.messages):
        if m.tool_calls is not None and m.role != "assistant":
            raise InvalidRequest(f"messages[{i}]: only assistant messages carry tool_calls", param="messages")
        if m.role != "assistant" and (m.refusal is not None or m.annotations is not None):
            raise InvalidRequest(f"messages[{i}]: only assistant messages carry refusal or annotations",
                                 param="messages")
        if m.content is None and not m.tool_calls and m.refusal is None:
            raise InvalidRequest(f"messages[{i}]: content is required (null only beside tool_calls)",
                                 param="messages")
        if (m.role == "tool") != (m.tool_call_id is not None):
            raise InvalidRequest(f"messages[{i}]: tool messages, and only they, carry tool_call_id", param="messages")
        try:
            content = tools.history_text(m) if m.tool_calls else m.text()
        except tools.ToolError as e:
            raise InvalidRequest(f"{e}", param=e.param) from None
        # a name (a pattern of plain characters: no template text) goes to the template, as vLLM passes it
        msgs.append({"role": m.role, "content": content} | ({"name": m.name} if m.name is not None else {}))
    if plan is not None:
        text = plan.system_text()
        if msgs[0]["role"] in ("system", "developer"):
            msgs[0] = {**msgs[0], "content": f"{msgs[0]['content']}\n\n{text}"}
        else:
            msgs.insert(0, {"role": "system", "content": text})
    return msgs


def tool_plan(req: ChatCompletionRequest) -> tools.ToolPlan | None:
    try:
        plan = tools.plan(req.tools, req.tool_choice, req.parallel_tool_calls)
    except tools.ToolError as e:
        raise InvalidRequest(str(e), param=e.param) from None
    if plan is not None and req.response_format is not None and req.response_format.type != "text":
        raise InvalidRequest("response_format cannot be combined with tools (unless tool_choice is none)",
                             param="response_format")
    if plan is not None and (size := len(json.dumps(plan.schema()))) > MAX_SCHEMA:
        raise InvalidRequest(f"tools: the callable functions' schemas make a {size}-character grammar; at most "
                             f"{MAX_SCHEMA}", param="tools")
    return plan


def echo_texts(prompt, prompts: list[list[int]], tokenizer) -> list[str]:
    """What echo shows of each prompt: its text as sent, or its token ids decoded."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], str):
        return list(prompt)
    return [tokenizer.decode(ids) for ids in prompts]


def tokenize(req, tokenizer, vocab_size: int, max_context: int) -> list[int]:
    """A /tokenize body's ids: its prompt as completions tokenize it, or its messages as chat does (with the
    tools' system text). CPU-bound: the server runs it off its event loop."""
    if (req.prompt is None) == (req.messages is None):
        raise InvalidRequest("give a prompt or messages (one of them)", param="prompt")
    if req.prompt is not None:
        if req.tools is not None or req.tool_choice is not None:
            raise InvalidRequest("tools go with messages", param="tools")
        return tokenize_text(req.prompt, tokenizer, max_context)
    chat = ChatCompletionRequest(model=req.model, messages=req.messages, tools=req.tools, tool_choice=req.tool_choice,
                                 parallel_tool_calls=req.parallel_tool_calls)
    return prompts_of(chat, tokenizer, vocab_size, max_context, tool_plan(chat))[0]


def prompts_of(req: CompletionRequest | ChatCompletionRequest, tokenizer, vocab_size: int,
               max_context: int, plan: tools.ToolPlan | None = None) -> list[list[int]]:
    if isinstance(req, ChatCompletionRequest):
        return [tokenize_chat(chat_messages(req, plan), tokenizer, max_context, field="messages")]
    p = req.prompt
    if isinstance(p, str):
        return [tokenize_text(p, tokenizer, max_context)]
    if not p:
        raise InvalidRequest("prompt is empty", param="prompt")
    if isinstance(p[0], int):
        return [check_token_ids(p, vocab_size, max_context, field="prompt")]
    if len(p) > MAX_PROMPTS:
        raise InvalidRequest(f"prompt holds {len(p)} prompts; at most {MAX_PROMPTS}", param="prompt")
    if isinstance(p[0], str):
        return [tokenize_text(x, tokenizer, max_context) for x in p]
    return [check_token_ids(x, vocab_size, max_context, field="prompt") for x in p]


def parse(req: CompletionRequest | ChatCompletionRequest, tokenizer, vocab_size: int, max_context: int) -> Job:
    """CPU-bound (tokenizing): the server runs it off its event loop."""
    chat = isinstance(req, ChatCompletionRequest)
    n = check_choices(req.n)
    if req.stream_options is not None and not req.stream:      # vLLM's rule: never silently ignored
        raise InvalidRequest("stream_options can only be set when stream is true", param="stream_options")
    if not chat and req.best_of not in (None, req.n):
        raise InvalidRequest("best_of other than n is not supported", param="best_of")
    if chat and req.top_logprobs is not None and not req.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    logprobs = (req.top_logprobs or 0) if chat and req.logprobs else (None if chat else req.logprobs)
    max_tokens = req.max_completion_tokens if chat and req.max_completion_tokens is not None else req.max_tokens
    max_tokens_name = "max_completion_tokens" if chat and req.max_completion_tokens is not None else "max_tokens"
    for name in ("top_p", "repetition_penalty"):   # 0 means "unset" on the gRPC wire only: here it is refused
        if getattr(req, name) <= 0:
            raise InvalidRequest(f"{name} must be > 0, got {getattr(req, name)!r}", param=name)
    plan = tool_plan(req) if chat else None
    prompts = prompts_of(req, tokenizer, vocab_size, max_context, plan)
    echo = None if chat or not req.echo else echo_texts(req.prompt, prompts, tokenizer)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    structured = (structured_of(req) if plan is None
                  else StructuredOutput("json_schema", json.dumps(plan.schema()), compact=True))
    bias = logit_bias_of(req.logit_bias)
    seed = None if req.seed is None else req.seed % 2**64       # any int64 (OpenAI's, vLLM's) -> the engine's
    params = []
    for ids in prompts:
        if max_tokens is None and len(ids) >= max_context:
            raise InvalidRequest(f"the prompt ({len(ids)} tokens) fills the {max_context}-token context: no room for "
                                 "output", param="messages" if chat else "prompt")
        try:
            p = make_sampling("", vocab_size, max_tokens=max_tokens if max_tokens is not None else max_context - len(ids),
                              temperature=req.temperature, top_p=req.top_p, top_k=0 if req.top_k == -1 else req.top_k,
                              min_p=req.min_p, seed=seed, stop=stop, stop_token_ids=req.stop_token_ids or [],
                              ignore_eos=req.ignore_eos, presence_penalty=req.presence_penalty,
                              frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty,
                              logprobs=logprobs, structured=structured, min_tokens=req.min_tokens,
                              logit_bias=bias, prompt_logprobs=logprobs if echo is not None else None)
        except InvalidRequest as e:     # the field as the client named it
            if max_tokens_name == "max_tokens":
                raise
            raise InvalidRequest(str(e).replace("max_tokens", max_tokens_name), e.code,
                                 e.param and e.param.replace("max_tokens", max_tokens_name)) from None
        check_fits(ids, p, max_context, max_tokens_name)
        try:
            check_structured(p, tokenizer, vocab_size)
        except InvalidRequest as e:
            if plan is None:
                raise
            raise InvalidRequest(f"tools: a function's parameters schema cannot be enforced ({e})",
                                 param="tools") from None
        params.append(choice_params(p, n))
    return Job(prompts, params, n, logprobs, plan, echo)


# responses

@dataclass
class ChoiceState:
    """One choice's text, tokens and logprobs so far."""
    index: int
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    text_offset: int = 0            # characters of its tokens' texts streamed so far (completion logprobs)
    prompt_logprobs: tuple[TokenLogprobs, ...] = ()     # echo with logprobs: prompt tokens 1..


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


MIN_LOGPROB = -9999.0       # what -inf (a token a grammar or bias masked) and NaN are shown as: JSON has no -inf


def shown_logprob(v: float) -> float:
    """v for a response: at least MIN_LOGPROB (OpenAI's and vLLM's floor), never a non-finite float."""
    return v if v >= MIN_LOGPROB else MIN_LOGPROB


def _texts(tokenizer):
    """token id -> its text, each id decoded once per response (a long logprobs answer repeats ids a lot)."""
    return functools.cache(functools.partial(token_text, tokenizer))


def chat_logprobs(tokenizer, lps: list[TokenLogprobs]) -> dict:
    text = _texts(tokenizer)

    def one(t: int, lp: float) -> dict:
        s = text(t)
        return {"token": s, "logprob": shown_logprob(lp), "bytes": list(s.encode())}
    return {"content": [one(x.token_id, x.logprob) | {"top_logprobs": [one(t, v) for t, v in x.top]} for x in lps]}


def completion_logprobs(tokenizer, lps: list[TokenLogprobs], offset: int = 0, lead: list[int] = ()) -> dict:
    """lead: tokens shown before lps with no logprob (an echoed prompt's first token: nothing precedes it).
    Each top_logprobs entry holds the sampled token too (the legacy API's: up to logprobs + 1 entries)."""
    text = _texts(tokenizer)
    tokens = [text(t) for t in lead] + [text(x.token_id) for x in lps]
    offsets, pos = [], offset
    for s in tokens:
        offsets.append(pos)
        pos += len(s)
    return {"tokens": tokens, "token_logprobs": [None] * len(lead) + [shown_logprob(x.logprob) for x in lps],
            "top_logprobs": [None] * len(lead) + [
                {text(x.token_id): shown_logprob(x.logprob)} | {text(t): shown_logprob(v) for t, v in x.top}
                for x in lps],
            "text_offset": offsets}


def usage(choices: list[ChoiceState], n: int) -> dict:
    """Prompt tokens count once per prompt (its n choices share it); cached: the most any choice hit."""
    groups = [choices[i:i + n] for i in range(0, len(choices), n)]
    prompt = sum(g[0].prompt_tokens for g in groups)
    completion = sum(c.completion_tokens for c in choices)
    cached = sum(max(c.cached_tokens for c in g) for g in groups)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def envelope(kind: str, rid: str, model: str, created: int | None = None) -> dict:
    return {"id": rid, "object": kind, "created": created or int(time.time()), "model": model}
