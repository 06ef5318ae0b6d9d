"""Per-request sampling parameters (the offline twin of the gRPC SamplingParams, router/proto/generation.proto)."""
from __future__ import annotations

import numbers
from dataclasses import dataclass

from pdcluster.engine.structured import StructuredOutput

MAX_LOGPROBS = 20                     # as OpenAI's top_logprobs
MAX_LOGIT_BIAS = 100.0                # |bias| at most this (OpenAI's range)


def _integral(v) -> bool:
    """An integer, bools aside (True is not a token count)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


@dataclass(frozen=True)
class TokenLogprobs:
    """A sampled token's logprob and the most likely alternatives (engine/sampler.py says which row)."""
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()     # (id, logprob) best first, SamplingParams.logprobs of them

    def __post_init__(self) -> None:            # msgpack brings lists back
        object.__setattr__(self, "top", tuple((int(t), float(lp)) for t, lp in self.top))


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0          # 0 = greedy (argmax)
    top_p: float = 1.0                # in (0, 1]; 1 = disabled
    top_k: int = 0                    # 0 = disabled
    min_p: float = 0.0                # in [0, 1]; 0 = disabled (engine/logits_processors.py)
    seed: int | None = None           # same seed + prompt + params => same tokens
    stop: tuple[str, ...] = ()        # stop strings; the match is not returned
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0     # in [-2, 2]; 0 = off
    frequency_penalty: float = 0.0    # in [-2, 2]; 0 = off
    repetition_penalty: float = 1.0   # in (0, 2]; 1 = off
    logprobs: int | None = None       # the sampled token's logprob plus this many top ones (0..20); None = off
    structured: StructuredOutput | None = None   # JSON output enforced by a grammar (engine/structured.py)
    min_tokens: int = 0               # EOS and stop_token_ids masked, stop strings unchecked until this many (vLLM's)
    logit_bias: tuple[tuple[int, float], ...] = ()   # (id, bias in [-100, 100]) added to the raw logits (OpenAI's)
    # each prompt token's logprob after the first, plus this many top ones (0..20); None = off. Such a prompt
    # is computed whole: no prefix-cache hit or KV load serves it (vLLM's rule)
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and frozen into tuples (msgpack brings lists back); one stop
        # string may be given bare, as vLLM takes it (stop="###", not a tuple of its characters).
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)):
            raise ValueError(f"stop must be a string or a list of strings, got {type(self.stop).__name__}")
        object.__setattr__(self, "stop", tuple(stop))
        for name in ("logit_bias", "stop_token_ids"):
            if not isinstance(getattr(self, name), (list, tuple, dict)):
                raise ValueError(f"{name} must be a list, got {type(getattr(self, name)).__name__}")
        bias = [tuple(x) for x in (self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias)]
        if any(len(x) != 2 or not _integral(x[0]) for x in bias):
            raise ValueError("logit_bias takes (token id, bias) pairs with integer ids")
        # numpy's numbers as Python's (the values' range check below takes int and float only)
        bias = [(int(t), float(b) if isinstance(b, numbers.Real) and not isinstance(b, (bool, int)) else b)
                for t, b in bias]
        object.__setattr__(self, "logit_bias", tuple(sorted(bias, key=lambda x: x[0])))
        if not all(_integral(t) for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be integer token ids, got {list(self.stop_token_ids)[:8]!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        for name in ("max_tokens", "top_k", "min_tokens", "seed", "logprobs", "prompt_logprobs"):   # numpy's ints too
            if _integral(getattr(self, name)):
                object.__setattr__(self, name, int(getattr(self, name)))
        if self.top_k == -1:                            # vLLM's "off" (0 here)
            object.__setattr__(self, "top_k", 0)
        if isinstance(self.structured, dict):          # from msgpack (the router -> worker wire form)
            object.__setattr__(self, "structured", StructuredOutput(**self.structured))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if type(self.ignore_eos) is not bool:          # ("false" is truthy: it generated to max_tokens)
            raise ValueError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise ValueError(f"{name} must be a number, got {v!r}")
        for name in ("max_tokens", "top_k", "min_tokens"):
            v = getattr(self, name)
            if type(v) is not int:
                raise ValueError(f"{name} must be an integer, got {v!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not 0 <= self.temperature < float("inf"):  # also rejects NaN
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:       # vLLM's range: 0 is not "off" (the gRPC wire's 0 is mapped to 1 at the edge)
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and (type(self.seed) is not int or not 0 <= self.seed < 2**64):   # (not a bool)
            raise ValueError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
            if len(s) > 1024:
                raise ValueError("stop strings must be at most 1024 characters")
        if len(self.stop) > 64:
            raise ValueError("at most 64 stop strings")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be >= 0")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not 0 < self.repetition_penalty <= 2:
            raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty!r}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (type(v) is not int or not 0 <= v <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {v!r}")
        if self.structured is not None:
            self.structured.validate()
            if self.ignore_eos:             # the grammar's one way to end is EOS: past it nothing is allowed
                raise ValueError("response_format cannot be combined with ignore_eos: the grammar ends the "
                                 "output at its end-of-sequence token")
        if type(self.min_tokens) is not int or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens], got {self.min_tokens!r}")
        for i, (t, b) in enumerate(self.logit_bias):
            if t < 0:
                raise ValueError(f"logit_bias keys must be token ids >= 0, got {t!r}")
            if i and t == self.logit_bias[i - 1][0]:
                raise ValueError(f"logit_bias names token {t} twice")
            if type(b) not in (int, float) or not -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS:  # NaN fails too
                raise ValueError(f"logit_bias values must be in [-100, 100], got {b!r} for token {t}")

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def plain(self) -> bool:
        """Nothing but temperature / top-k / top-p: the sampler's fast path."""
        return not (self.has_penalties or self.min_p or self.logprobs is not None or self.shapes_logits)

    @property
    def shapes_logits(self) -> bool:
        """A logit bias or a min_tokens mask changes the raw logits (engine/logits_processors.py)."""
        return bool(self.logit_bias or self.min_tokens)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1
