"""GenerateRequest -> (prompt token ids, SamplingParams), or an InvalidRequest naming the field.

Pure Python given a tokenizer; the gRPC layer maps InvalidRequest.code to a status code.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pdcluster.engine.sampling_params import SamplingParams
from pdcluster.engine.structured import StructuredOutput
from pdcluster.logs import clip

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
ROLE_ALIASES = {"developer": "system"}     # OpenAI's newer name for the system role: templates know "system"
MAX_REQUEST_ID = 256         # characters
MAX_STOP_TOKEN_IDS = 1024
MAX_STOPS, MAX_STOP_CHARS = 64, 1024    # stop strings, and characters of one
MAX_CHAT_MESSAGES = 4096
MAX_CHOICES = 16             # n: sequences per prompt


class InvalidRequest(Exception):
    def __init__(self, message: str, code: str = "INVALID_ARGUMENT", param: str | None = None):
        super().__init__(message)
        self.code = code
        self.param = param          # the offending field (OpenAI's error body names it)


@dataclass
class Parsed:
    prompt_ids: list[int]
    params: SamplingParams
    n: int = 1                  # choices (sequences) to generate from the prompt


def check_choices(n: int, field: str = "n") -> int:
    if type(n) is not int or not 1 <= n <= MAX_CHOICES:
        raise InvalidRequest(f"{field} must be in [1, {MAX_CHOICES}], got {n!r}", param=field.rsplit(".", 1)[-1])
    return n


def make_sampling(prefix: str, vocab_size: int, *, max_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                  top_k: int = 0, min_p: float = 0.0, seed: int | None = None, stop: list[str] = (),
                  stop_token_ids: list[int] = (), ignore_eos: bool = False, presence_penalty: float = 0.0,
                  frequency_penalty: float = 0.0, repetition_penalty: float = 1.0, logprobs: int | None = None,
                  structured: StructuredOutput | None = None, min_tokens: int = 0,
                  logit_bias: dict[int, float] | None = None, prompt_logprobs: int | None = None) -> SamplingParams:
    """The one validation of sampling fields, for the gRPC and the HTTP API: sizes before per-item work,
    then SamplingParams' own rules; every error names the field (with `prefix`, e.g. "sampling.")."""
    def bad(field: str, msg: str) -> InvalidRequest:
        return InvalidRequest(f"{prefix}{field} {msg}", param=field)
    if max_tokens < 1:
        raise bad("max_tokens", f"must be >= 1, got {max_tokens}" + (" (0: not set; it is required)" if prefix else ""))
    if len(stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise bad("stop_token_ids", f"holds {len(stop_token_ids)} ids; at most {MAX_STOP_TOKEN_IDS}")
    if len(stop) > MAX_STOPS or any(len(x) > MAX_STOP_CHARS for x in stop):
        raise bad("stop", f"takes at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters")
    if any(not x for x in stop):
        raise bad("stop", "strings must be non-empty")
    if not all(is_text(x) for x in stop):
        raise bad("stop", LONE_SURROGATE)
    if not 0 <= top_k <= vocab_size:
        raise bad("top_k", f"must be in [0, {vocab_size}] (the vocab size), got {top_k}")
    worst = next((t for t in stop_token_ids if not 0 <= t < vocab_size), None)
    if worst is not None:
        raise bad("stop_token_ids", f"id {worst} is outside [0, {vocab_size}) (the vocab size)")
    logit_bias = logit_bias or {}
    worst = next((t for t in logit_bias if not 0 <= t < vocab_size), None)     # also bounds the map's size
    if worst is not None:
        raise bad("logit_bias", f"id {worst} is outside [0, {vocab_size}) (the vocab size)")
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=1.0 if top_p == 0 else top_p,
                              top_k=top_k, min_p=min_p, seed=seed, stop=tuple(stop),
                              stop_token_ids=tuple(stop_token_ids), ignore_eos=ignore_eos,
                              presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                              repetition_penalty=repetition_penalty or 1.0, logprobs=logprobs, structured=structured,
                              min_tokens=min_tokens, logit_bias=logit_bias, prompt_logprobs=prompt_logprobs)
    except ValueError as e:
        field = str(e).split()[0]
        raise InvalidRequest(f"{prefix}{e}", param=field if field.isidentifier() else None) from None


def sampling_from_proto(s, vocab_size: int) -> SamplingParams:
    structured = None
    if s.HasField("response_format") and s.response_format.type not in ("", "text"):
        structured = StructuredOutput(s.response_format.type, s.response_format.json_schema or None)
    return make_sampling("sampling.", vocab_size, max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
                         top_k=s.top_k, min_p=s.min_p, seed=s.seed if s.HasField("seed") else None,
                         stop=list(s.stop), stop_token_ids=list(s.stop_token_ids), ignore_eos=s.ignore_eos,
                         presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
                         repetition_penalty=s.repetition_penalty,
                         logprobs=s.logprobs if s.HasField("logprobs") else None, structured=structured,
                         min_tokens=s.min_tokens, logit_bias=dict(s.logit_bias),
                         prompt_logprobs=s.prompt_logprobs if s.HasField("prompt_logprobs") else None)


def check_structured(params: SamplingParams, tokenizer, vocab_size: int, field: str = "response_format") -> None:
    """A JSON schema the workers' grammar engine cannot take is refused here, before any placement
    (compiled once per schema; engine/structured.py)."""
    if params.structured is None:
        return
    from pdcluster.engine.structured import Grammars
    grammars = getattr(tokenizer, "_pdcluster_grammars", None)
    if grammars is None:
        grammars = tokenizer._pdcluster_grammars = Grammars(tokenizer, vocab_size)
    try:
        grammars.compile(params.structured)
    except ValueError as e:
        raise InvalidRequest(str(e), param=field) from None


def max_token_bytes(tokenizer) -> int:
    """The longest token of the vocabulary, in UTF-8 bytes: a text of more than
    max_context * this many bytes cannot fit the context, whatever it tokenizes to."""
    cached = getattr(tokenizer, "_pdcluster_max_token_bytes", None)
    if cached is None:
        vocab = tokenizer.get_vocab()
        cached = max(len(tokenizer.convert_tokens_to_string([t]).encode()) for t in vocab) if vocab else 1
        tokenizer._pdcluster_max_token_bytes = cached = max(cached, 1)
    return cached


def tokenize_executor(router) -> ThreadPoolExecutor:
    """The router's one tokenizing thread, shared by the gRPC server and the HTTP API. Tokenizing is CPU work, kept
    off the event loop; and a fast tokenizer must never be entered by two threads at once: transformers sets its
    split_special_tokens switch on the shared object before each encode, so a chat message encoded beside a raw-text
    prompt could have its role markers parsed as special tokens. Made on first use (router.tokenize_pool), the
    vocabulary's size bound (max_token_bytes) computed on it first."""
    pool = getattr(router, "tokenize_pool", None)
    if pool is None:
        pool = router.tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="router-tokenize")
        pool.submit(max_token_bytes, router.tokenizer)
    return pool


def is_text(s: str) -> bool:
    """Has s a UTF-8 form? Not when it holds a lone surrogate (HTTP's JSON can escape one, "\\ud800";
    protobuf strings cannot): it could not be tokenized or matched."""
    if s.isascii():
        return True
    try:
        s.encode()
    except UnicodeEncodeError:
        return False
    return True


LONE_SURROGATE = "holds a lone surrogate (a \\uD800-\\uDFFF escape with no pair): not Unicode text"


def tokenize_text(text: str, tokenizer, max_context: int, field: str = "prompt") -> list[int]:
    """A raw-text prompt (special tokens parsed, no template); its UTF-8 size is bounded first."""
    if not text:
        raise InvalidRequest(f"{field} text is empty", param=field)
    if not is_text(text):
        raise InvalidRequest(f"{field} {LONE_SURROGATE}", param=field)
    max_bytes = max_context * max_token_bytes(tokenizer)
    if len(text) > max_bytes or len(text.encode()) > max_bytes:
        raise InvalidRequest(f"{field} text is {len(text.encode())} bytes: more than the context length "
                             f"({max_context} tokens) can hold", param=field)
    return tokenizer.encode(text, add_special_tokens=False)


def check_token_ids(ids: list[int], vocab_size: int, max_context: int, field: str = "token_ids") -> list[int]:
    if len(ids) > max_context:
        raise InvalidRequest(f"{field}: {len(ids)} ids; the context length is {max_context}", param=field)
    worst = next((t for t in ids if not isinstance(t, int) or not 0 <= t < vocab_size), None)
    if worst is not None:
        raise InvalidRequest(f"{field}: id {worst} is outside [0, {vocab_size}) (the vocab size)", param=field)
    return list(ids)


def tokenize_chat(msgs: list[dict], tokenizer, max_context: int, field: str = "chat.messages") -> list[int]:
    """Role/content dicts through the model's chat template (content never parsed for special tokens)."""
    if len(msgs) > MAX_CHAT_MESSAGES:
        raise InvalidRequest(f"{field} holds {len(msgs)} messages; at most {MAX_CHAT_MESSAGES}", param=field)
    if not msgs:
        raise InvalidRequest(f"{field} is empty", param=field)
    if not all(is_text(m["content"]) for m in msgs):
        raise InvalidRequest(f"{field} {LONE_SURROGATE}", param=field)
    n_bytes = sum(len(m["content"].encode()) for m in msgs)
    if n_bytes > max_context * max_token_bytes(tokenizer):
        raise InvalidRequest(f"{field} hold {n_bytes} bytes: more than the context length "
                             f"({max_context} tokens) can hold", param=field)
    for m in msgs:
        if m["role"] not in CHAT_ROLES:
            raise InvalidRequest(f"{field}: unknown role {clip(m['role'])} (one of {', '.join(CHAT_ROLES)})",
                                 param=field)
    from pdcluster.engine.tokenizer import apply_chat_template
    msgs = [{**m, "role": ROLE_ALIASES[m["role"]]} if m["role"] in ROLE_ALIASES else m for m in msgs]
    try:
        return apply_chat_template(tokenizer, msgs)
    except Exception as e:  # the template itself rejects the conversation
        raise InvalidRequest(f"{field}: {e}", param=field) from None


def check_fits(ids: list[int], params: SamplingParams, max_context: int, max_tokens_field: str) -> None:
    if not ids:
        raise InvalidRequest("prompt is empty after tokenization", param="prompt")
    if len(ids) + params.max_tokens > max_context:
        raise InvalidRequest(f"prompt ({len(ids)} tokens) + {max_tokens_field} ({params.max_tokens}) exceeds "
                             f"the context length {max_context}", param=max_tokens_field.rsplit(".", 1)[-1])


def parse_request(req, tokenizer, vocab_size: int, max_context: int) -> Parsed:
    """Validate everything the public contract's error table names; tokenize text or chat prompts.

    Sizes are checked before anything costs time in proportion to them: list lengths first, a
    text's UTF-8 size against what the context could hold, and only then the tokenizer. CPU-bound:
    the router runs it off its event loop.
    """
    if not req.HasField("sampling"):
        raise InvalidRequest("sampling is required (sampling.max_tokens >= 1)")
    params = sampling_from_proto(req.sampling, vocab_size)
    n = check_choices(req.sampling.n, "sampling.n") if req.sampling.HasField("n") else 1
    if len(req.request_id) > MAX_REQUEST_ID:
        raise InvalidRequest(f"request_id is {len(req.request_id)} characters; at most {MAX_REQUEST_ID}")
    if not req.request_id.isprintable():      # control, format and separator characters (\n, U+202E, ...)
        bad = next(c for c in req.request_id if not c.isprintable())
        raise InvalidRequest(f"request_id holds the control character U+{ord(bad):04X}; use printable characters")
    kind = req.WhichOneof("prompt")
    if kind is None:
        raise InvalidRequest("prompt is required: set text, token_ids or chat")
    if kind == "text":
        ids = tokenize_text(req.text, tokenizer, max_context)
    elif kind == "token_ids":
        ids = check_token_ids(req.token_ids.ids, vocab_size, max_context)
    else:
        if len(req.chat.messages) > MAX_CHAT_MESSAGES:        # before building a dict per message
            raise InvalidRequest(f"chat.messages holds {len(req.chat.messages)} messages; at most {MAX_CHAT_MESSAGES}")
        ids = tokenize_chat([{"role": m.role, "content": m.content} for m in req.chat.messages], tokenizer,
                            max_context)
    check_fits(ids, params, max_context, "sampling.max_tokens")
    check_structured(params, tokenizer, vocab_size, "sampling.response_format")
    return Parsed(ids, params, n)
