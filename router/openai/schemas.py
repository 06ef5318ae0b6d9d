"""OpenAI request bodies as pydantic models, the fields vLLM accepts. An unknown field is an error
(400 naming it), never ignored. An explicit null is the field's default, as OpenAI's and vLLM's
servers read it ("temperature": null is temperature 1)."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from pdcluster.router.openai.tools import MAX_TOOLS
from pdcluster.router.validate import MAX_CHAT_MESSAGES, MAX_STOP_TOKEN_IDS, MAX_STOPS


MAX_PROMPTS = 64                # prompts in one completions request
MAX_PROMPT_IDS = 1 << 20        # token ids in one prompt: past any context served here
# Every list a body holds is bounded in its schema: pydantic stops a list at its bound, where a 4 MiB list of
# wrong items built an error each (~1M, seconds holding the GIL, so the event loop too). Past the semantic
# checks' own bounds (router/validate.py) only where those are per-model: logit_bias's ids < the vocab size.
MAX_LOGIT_BIAS = 1 << 18        # entries: past any vocab served here
MAX_CONTENT_PARTS = 4096        # parts of one message's content
MAX_ANNOTATIONS = 1024
MAX_TOOL_CALLS = 1024           # calls in one assistant message


def _prompt_shape(v) -> str:
    """Which member of Prompt a value is, from its first element: pydantic then validates that member alone. Tried
    against every member (each failing one building an error per element), a 4 MiB list took seconds, holding the
    GIL and so the event loop. The tags are not identifiers, so an error's param stays "prompt"."""
    if isinstance(v, list) and v:
        return "list[str]" if isinstance(v[0], str) else "list[list[int]]" if isinstance(v[0], list) else "list[int]"
    return "list[int]" if isinstance(v, list) else "str"


Prompt = Annotated[
    Annotated[str, Tag("str")]
    | Annotated[list[str], Field(max_length=MAX_PROMPTS), Tag("list[str]")]
    | Annotated[list[int], Field(max_length=MAX_PROMPT_IDS), Tag("list[int]")]
    | Annotated[list[Annotated[list[int], Field(max_length=MAX_PROMPT_IDS)]], Field(max_length=MAX_PROMPTS),
                Tag("list[list[int]]")],
    Discriminator(_prompt_shape)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data):
        """Drop a null given for a field that has a non-null default (a required field keeps it: its error names it)."""
        if not isinstance(data, dict):
            return data
        fields = {f.alias or name: f for name, f in cls.model_fields.items()} | cls.model_fields
        return {k: v for k, v in data.items()
                if v is not None or (f := fields.get(k)) is None or f.is_required() or f.default is None}


class StreamOptions(Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False    # vLLM's: with include_usage, every chunk carries its choice's usage so far


class JsonSchema(Strict):
    name: str = "response"
    description: str | None = None
    schema_: dict = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class Sampling(Strict):
    """The fields completions and chat share."""
    model: str | None = None                # None or "": the served model (vLLM's)
    max_tokens: int | None = None           # None: completions 16 (OpenAI's default), chat up to the context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                          # vLLM's extension; -1 also means off, other negatives are refused
    min_p: float = 0.0
    seed: int | None = Field(default=None, ge=-2**63, lt=2**64)   # any int64 (OpenAI's), or a uint64; mod 2**64
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    stop_token_ids: Annotated[list[int], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    n: int = 1                              # in [1, 16]: router/validate.py's check_choices, as gRPC's
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    min_tokens: int = 0                     # vLLM's extension: no EOS, stop id or stop string before this many
    logit_bias: dict[str, float] | None = None   # OpenAI's: token id (a decimal string) -> bias in [-100, 100]
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None                 # the caller's end-user label: recorded nowhere, harmless

    @field_validator("stop", "logit_bias", mode="before")
    @classmethod
    def _size(cls, v, info):
        """A list's or map's bound, before its items are validated: pydantic bounds a map only after (an error per
        entry), and past stop's bound its union said "Input should be a valid string"."""
        bound = MAX_STOPS if info.field_name == "stop" else MAX_LOGIT_BIAS
        if isinstance(v, (list, dict)) and len(v) > bound:
            raise ValueError(f"takes at most {bound} {'strings' if info.field_name == 'stop' else 'entries'}, "
                             f"got {len(v)}")
        return v


class CompletionRequest(Sampling):
    prompt: Prompt
    max_tokens: int | None = 16
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False                      # the prompt's text before each choice's (with logprobs: its tokens')
    best_of: int | None = None              # only best_of == n (the default) is supported


class TextPart(Strict):
    type: Literal["text"]
    text: str


FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"   # OpenAI's rule for function names


class FunctionCall(Strict):
    name: str = Field(pattern=FUNCTION_NAME)
    arguments: str                          # JSON text, as OpenAI sends it


class ToolCall(Strict):
    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # None only for an assistant message with tool_calls
    content: str | Annotated[list[TextPart], Field(max_length=MAX_CONTENT_PARTS)] | None = None
    name: str | None = Field(default=None, pattern=FUNCTION_NAME)   # a participant's name: rendered by the template
    # assistant messages: the calls it made (router/openai/tools.py)
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOL_CALLS)] | None = None

    tool_call_id: str | None = Field(default=None, max_length=256)   # tool messages: the call answered
    # what OpenAI's own assistant messages carry, so a transcript from it replays here (as vLLM takes it): a
    # refusal is the message's text when it has no content; annotations (citations) and a null audio or
    # function_call add nothing to the prompt
    refusal: str | None = None
    annotations: Annotated[list[dict], Field(max_length=MAX_ANNOTATIONS)] | None = None
    audio: None = None
    function_call: None = None

    def text(self) -> str:
        if self.content is None:
            return self.refusal or ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionDef(Strict):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict | None = None          # a JSON schema of the arguments object; None: no arguments
    strict: bool | None = None              # every call is held to the schema anyway


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_CHAT_MESSAGES)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None   # None: auto with tools
    parallel_tool_calls: bool = True


class TokenizeRequest(Strict):
    """vLLM's /tokenize: a completion's prompt or a chat's messages (with tools), as this server tokenizes them."""
    model: str | None = None                # None or "": the served model (vLLM's)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=MAX_CHAT_MESSAGES)
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[int] = Field(max_length=MAX_PROMPT_IDS)
