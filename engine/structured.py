"""Structured output (response_format json_object / json_schema) as a token mask, by xgrammar.

One Grammars per engine: it compiles each distinct spec once (a small LRU) against the engine's
tokenizer and hands each request its own GrammarMatcher. Per step, a constrained row's logits get
-inf wherever the grammar forbids the token (`mask`), and the sampled token advances its matcher
(`accept`). When the JSON is complete the grammar allows only the end-of-sequence tokens.
"""
from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pdcluster.engine.schema_limits import check_schema_patterns
from pdcluster.logs import clip

if TYPE_CHECKING:       # SamplingParams imports this module; the router stays torch-free
    import torch

KINDS = ("json_object", "json_schema")
ANY_OBJECT = '{"type": "object"}'      # json_object: OpenAI promises an object (xgrammar's builtin: any value)
MAX_SCHEMA = 64 * 1024          # characters of a schema's JSON text
# objects and arrays nested in a schema's JSON: xgrammar's compile time grows steeply with depth (measured:
# 64 schema levels, 129 JSON levels, 0.05 s; 400 levels 5.6 s; 900 levels 75 s), and it runs on the router's
# one tokenizing thread and a worker's engine thread: a deep 15 KB schema stalled every client for seconds
MAX_SCHEMA_DEPTH = 128


@dataclass(frozen=True)
class StructuredOutput:
    kind: str                       # "json_object" (any JSON object) | "json_schema"
    schema: str | None = None       # json_schema: the schema as JSON text
    compact: bool = False           # json_schema: no whitespace but json.dumps' ", " and ": " (tool answers)

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"response_format type must be one of {list(KINDS)}, got {clip(self.kind)}")
        if self.kind == "json_schema":
            if not isinstance(self.schema, str) or len(self.schema) > MAX_SCHEMA:
                raise ValueError("response_format json_schema needs a schema of at most 64 KiB")
            try:
                parsed = json.loads(self.schema)
            except (ValueError, RecursionError):    # RecursionError: nested past the parser's stack
                raise ValueError("response_format json_schema's schema is not valid JSON (or nested deeper than "
                                 f"{MAX_SCHEMA_DEPTH} levels)") from None
            if not isinstance(parsed, dict):
                raise ValueError("response_format json_schema's schema must be a JSON object")
            if json_depth(parsed) > MAX_SCHEMA_DEPTH:
                raise ValueError(f"response_format json_schema's schema nests objects and arrays deeper than "
                                 f"{MAX_SCHEMA_DEPTH} levels")
            check_schema_patterns(parsed)       # regexes whose grammar would take seconds to compile
        elif self.schema is not None or self.compact:
            raise ValueError("response_format json_object takes no schema")
        if type(self.compact) is not bool:
            raise ValueError("response_format compact must be a bool")


def json_depth(value) -> int:
    """How deeply objects and arrays nest in a parsed JSON value (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


class Grammars:
    def __init__(self, hf_tokenizer, vocab_size: int, cache_size: int = 64):
        import xgrammar as xgr

        self.xgr = xgr
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self._compiled: OrderedDict[StructuredOutput, object] = OrderedDict()

    def compile(self, spec: StructuredOutput):
        """The compiled grammar of spec; ValueError for a schema xgrammar cannot take."""
        g = self._compiled.get(spec)
        if g is None:
            try:
                g = (self.compiler.compile_json_schema(ANY_OBJECT) if spec.kind == "json_object"
                     else self.compiler.compile_json_schema(spec.schema, any_whitespace=not spec.compact,
                                                            separators=(", ", ": ") if spec.compact else None))
            except Exception as e:          # xgrammar raises RuntimeError / its own types for bad schemas
                why = (str(e).strip().splitlines() or [type(e).__name__])[0]
                why = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", why)[:200]     # xgrammar's "[time] file.cc:N: "
                raise ValueError(f"response_format: unsupported JSON schema ({why})") from None
            self._compiled[spec] = g
            if len(self._compiled) > 64:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(spec)
        return g

    def matcher(self, spec: StructuredOutput):
        return self.xgr.GrammarMatcher(self.compile(spec))

    def check_prefix(self, spec: StructuredOutput, token_ids: list[int]) -> None:
        """ValueError unless spec's grammar accepts token_ids from its start (the outputs a resumed
        request carries: its matcher replays them)."""
        m = self.matcher(spec)
        for k, t in enumerate(token_ids):
            if not m.is_terminated() and not m.accept_token(t):
                raise ValueError(f"output token {k} (id {t}) breaks the response_format grammar")

    def mask(self, logits: torch.Tensor, rows: list[int], matchers: list) -> None:
        """In place: logits [N, V] rows `rows` limited to what their matchers allow next."""
        bitmask = self.xgr.allocate_token_bitmask(len(rows), self.info.vocab_size)
        for k, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, k)
        sub = logits[rows]
        self.xgr.apply_token_bitmask_inplace(sub, bitmask.to(sub.device), vocab_size=self.vocab_size)
        logits[rows] = sub

    @staticmethod
    def accept(matcher, token_id: int) -> None:
        if not matcher.is_terminated() and not matcher.accept_token(token_id):
            raise RuntimeError(f"token {token_id} was sampled against the grammar's mask")
