"""The request: the one object that flows through tokenizer, scheduler, runner and back.

Progress is counters, not phases: the request needs `num_tokens - num_computed_tokens` more
tokens of forward pass; when that reaches 0 after a step, the step sampled a new token.
A "prefill" is just a step with many new tokens; a "decode" one with a single token.

A request may start with outputs already (a migrated request resumes with the tokens its earlier
attempt sent): they are prefilled with the prompt, yet count as outputs everywhere sampling looks
(penalty history, the grammar's state, max_tokens).
"""
from __future__ import annotations

import enum
import itertools
import time

from pdcluster.engine.config import CacheConfig
from pdcluster.engine.hashing import ROOT_HASH, block_hashes
from pdcluster.engine.sampling_params import SamplingParams, TokenLogprobs


class Status(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_REMOTE_KV = "waiting_for_remote_kv"   # blocks held, its prompt's KV arriving from outside
    RUNNING = "running"
    FINISHED_STOPPED = "stop"      # EOS, stop token, stop string
    FINISHED_LENGTH = "length"     # max_tokens or context length
    FINISHED_ABORTED = "abort"     # cancelled / failed

    @property
    def finished(self) -> bool:
        return self in (Status.FINISHED_STOPPED, Status.FINISHED_LENGTH, Status.FINISHED_ABORTED)


_ids = itertools.count()


class Request:
    def __init__(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                 cache_salt: str | None = None, eos_token_ids: tuple[int, ...] = (),
                 block_size: int = CacheConfig.block_size, output_token_ids: list[int] = ()):
        self.request_id = request_id if request_id is not None else f"req-{next(_ids)}"
        self.params = params
        self.cache_salt = cache_salt
        self.eos_token_ids = tuple(eos_token_ids)      # the model's; whether they end it is params.ignore_eos's call
        self.block_size = block_size
        self.arrival_time = time.monotonic()
        self.token_ids: list[int] = list(prompt_token_ids) + list(output_token_ids)   # prompt, then outputs
        self.num_prompt_tokens = len(prompt_token_ids)
        # tokens present at admission (prompt + resumed outputs): all computed before the next sample
        self.num_prefill_tokens = len(self.token_ids)
        self.num_computed_tokens = 0    # tokens whose KV is in this worker's cache
        self.num_cached_tokens = -1     # prefix-cache hit at first admission (-1 = not yet admitted)
        self.block_ids: list[int] = []  # this worker's KV blocks, in position order
        self.status = Status.WAITING
        self.num_preemptions = 0
        self.num_external_tokens = 0       # tokens the KV connector is loading (WAITING_FOR_REMOTE_KV)
        self.num_prefix_waits = 0          # times the scheduler passed it over: a running request was computing its next block
        self.grammar_ended = False         # its response_format grammar accepted its last token: it stops there
        self.spec_token_ids: list[int] = []   # draft tokens this step verifies after token_ids (engine/spec/)
        self._hashes: list[int] = []    # chain hashes of the full blocks of token_ids
        # SamplingParams.prompt_logprobs: entry q - 1 is prompt token q's (q >= 1), filled as chunks compute
        self.prompt_logprobs: list[TokenLogprobs] = []

    # counters
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt logprobs asked and not all computed: no prefix hit or KV load may stand in for the prompt."""
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens - 1

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def block_hashes(self) -> list[int]:
        """Chain hashes of every full block of token_ids (computed incrementally)."""
        n_full = self.num_tokens // self.block_size
        if len(self._hashes) < n_full:
            parent = self._hashes[-1] if self._hashes else ROOT_HASH
            self._hashes += block_hashes(self.token_ids, self.block_size, self.cache_salt,
                                         start=len(self._hashes), parent=parent)
        return self._hashes[:n_full]

    def __repr__(self) -> str:
        return (f"Request({self.request_id}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_ids)})")
