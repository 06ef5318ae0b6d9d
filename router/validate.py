"""GenerateRequest -> (prompt token ids, SamplingParams), or an InvalidRequest naming the field.

Pure Python given a tokenizer; the gRPC layer maps InvalidRequest.code to a status code.
"""
from __future__ import annotations

from dataclasses import dataclass

from pdcluster.engine.sampling_params import SamplingParams

CHAT_ROLES = ("system", "user", "assistant", "tool")
MAX_REQUEST_ID = 256         # characters
MAX_STOP_TOKEN_IDS = 1024
MAX_CHAT_MESSAGES = 4096


class InvalidRequest(Exception):
    def __init__(self, message: str, code: str = "INVALID_ARGUMENT"):
        super().__init__(message)
        self.code = code


@dataclass
class Parsed:
    prompt_ids: list[int]
    params: SamplingParams


def sampling_from_proto(s) -> SamplingParams:
    if s.max_tokens < 1:
        raise InvalidRequest("sampling.max_tokens is required and must be >= 1")
    if not 0 <= s.temperature < float("inf"):
        raise InvalidRequest(f"sampling.temperature must be finite and >= 0, got {s.temperature}")
    if not 0 <= s.top_p <= 1:
        raise InvalidRequest(f"sampling.top_p must be in [0, 1], got {s.top_p}")
    if len(s.stop_token_ids) > MAX_STOP_TOKEN_IDS:     # before any per-item work
        raise InvalidRequest(f"sampling.stop_token_ids holds {len(s.stop_token_ids)} ids; at most {MAX_STOP_TOKEN_IDS}")
    if len(s.stop) > 64:
        raise InvalidRequest("sampling.stop: at most 64 strings of at most 1024 characters")
    stop = list(s.stop)
    if any(not x for x in stop):
        raise InvalidRequest("sampling.stop strings must be non-empty")
    if any(len(x) > 1024 for x in stop):                 # the count was checked above
        raise InvalidRequest("sampling.stop: at most 64 strings of at most 1024 characters")
    try:
        return SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature,
                              top_p=s.top_p if s.top_p > 0 else 1.0, top_k=s.top_k,
                              seed=s.seed if s.HasField("seed") else None, stop=tuple(stop),
                              stop_token_ids=tuple(s.stop_token_ids), ignore_eos=s.ignore_eos)
    except ValueError as e:
        raise InvalidRequest(f"sampling: {e}") from None


def max_token_bytes(tokenizer) -> int:
    """The longest token of the vocabulary, in UTF-8 bytes: a text of more than
    max_context * this many bytes cannot fit the context, whatever it tokenizes to."""
    cached = getattr(tokenizer, "_pdcluster_max_token_bytes", None)
    if cached is None:
        vocab = tokenizer.get_vocab()
        cached = max(len(tokenizer.convert_tokens_to_string([t]).encode()) for t in vocab) if vocab else 1
        tokenizer._pdcluster_max_token_bytes = cached = max(cached, 1)
    return cached


def parse_request(req, tokenizer, vocab_size: int, max_context: int) -> Parsed:
    """Validate everything the public contract's error table names; tokenize text or chat prompts.

    Sizes are checked before anything costs time in proportion to them: list lengths first, a
    text's UTF-8 size against what the context could hold, and only then the tokenizer. CPU-bound:
    the router runs it off its event loop.
    """
    if not req.HasField("sampling"):
        raise InvalidRequest("sampling is required (sampling.max_tokens >= 1)")
    params = sampling_from_proto(req.sampling)
    if not 0 <= params.top_k <= vocab_size:
        raise InvalidRequest(f"sampling.top_k must be in [0, {vocab_size}] (the vocab size), got {params.top_k}")
    if len(req.request_id) > MAX_REQUEST_ID:
        raise InvalidRequest(f"request_id is {len(req.request_id)} characters; at most {MAX_REQUEST_ID}")
    if not req.request_id.isprintable():      # control, format and separator characters (\n, U+202E, ...)
        bad = next(c for c in req.request_id if not c.isprintable())
        raise InvalidRequest(f"request_id holds the control character U+{ord(bad):04X}; use printable characters")
    max_bytes = max_context * max_token_bytes(tokenizer)
    kind = req.WhichOneof("prompt")
    if kind is None:
        raise InvalidRequest("prompt is required: set text, token_ids or chat")
    if kind == "text":
        if not req.text:
            raise InvalidRequest("prompt text is empty")
        if len(req.text) > max_bytes or len(req.text.encode()) > max_bytes:
            raise InvalidRequest(f"prompt text is {len(req.text.encode())} bytes: more than the context length "
                                 f"({max_context} tokens) can hold")
        ids = tokenizer.encode(req.text, add_special_tokens=False)
    elif kind == "token_ids":
        if len(req.token_ids.ids) > max_context:
            raise InvalidRequest(f"token_ids: {len(req.token_ids.ids)} ids; the context length is {max_context}")
        ids = list(req.token_ids.ids)
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"token_ids: id {bad} is outside [0, {vocab_size}) (the vocab size)")
    else:
        if len(req.chat.messages) > MAX_CHAT_MESSAGES:
            raise InvalidRequest(f"chat.messages holds {len(req.chat.messages)} messages; at most {MAX_CHAT_MESSAGES}")
        msgs = [{"role": m.role, "content": m.content} for m in req.chat.messages]
        if not msgs:
            raise InvalidRequest("chat.messages is empty")
        n_bytes = sum(len(m["content"].encode()) for m in msgs)
        if n_bytes > max_bytes:
            raise InvalidRequest(f"chat.messages hold {n_bytes} bytes: more than the context length "
                                 f"({max_context} tokens) can hold")
        for m in msgs:
            if m["role"] not in CHAT_ROLES:
                raise InvalidRequest(f"chat.messages: unknown role {m['role']!r} (one of {', '.join(CHAT_ROLES)})")
        from pdcluster.engine.tokenizer import apply_chat_template
        try:
            ids = apply_chat_template(tokenizer, msgs)
        except Exception as e:  # the template itself rejects the conversation
            raise InvalidRequest(f"chat.messages: {e}") from None
    if not ids:
        raise InvalidRequest("prompt is empty after tokenization")
    bad = next((t for t in params.stop_token_ids if t >= vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"sampling.stop_token_ids: id {bad} is outside [0, {vocab_size}) (the vocab size)")
    if len(ids) + params.max_tokens > max_context:
        raise InvalidRequest(f"prompt ({len(ids)} tokens) + sampling.max_tokens ({params.max_tokens}) exceeds "
                             f"the context length {max_context}")
    return Parsed(ids, params)
