"""Benchmark workloads: each dataset is a list of BenchRequest, deterministic from the seed.

Datasets (`--dataset`):
  random         token-id prompts of ~input_len tokens, outputs of ~output_len tokens
  shared-prefix  num_groups groups; every prompt of a group starts with the group's prefix_len-token
                 system prompt, then suffix_len tokens of its own (prefix-cache workload)
  multi-turn     num_conversations conversations of `turns` turns; turn k resends the whole history
                 (every earlier user turn and reply) plus input_len new tokens; turn 0 has
                 first_input_len (a conversation's opening context: a document, a long system prompt;
                 vLLM's multi-turn benchmark's per-conversation prefix) when given
  mixed          num_prompts prompts, round(long_fraction * num_prompts) of them long_input_len long,
                 the rest input_len long (head-of-line blocking workload)
  copy           num_prompts text prompts that hand the model a passage (one of a few embedded
                 paragraphs) and ask for it back word for word: the output copies the prompt, the
                 workload where n-gram speculative decoding (engine/spec/) pays
  sharegpt:PATH  ShareGPT JSON: first human turn as a text prompt, the following gpt turn's length in
                 whitespace words as the output length (or output_len when given)
  mooncake:PATH  a Mooncake-format trace (JSONL: timestamp ms, input/output_length, hash_ids of 512-token
                 blocks) replayed at its own arrival times, scaled (bench/trace_dataset.py): token_scale
                 engine blocks of block_size tokens per trace block, output_scale, time_scale, start,
                 max_requests, conversation_sample
Lengths are in tokens (words for ShareGPT); range_ratio spreads input/output lengths uniformly over
[len * (1 - r), len * (1 + r)] like vLLM's random dataset.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from pdcluster.engine.config import CacheConfig

DEFAULT_OUTPUT_LEN = 128  # tokens, for every dataset but sharegpt (which takes the gpt turn's length)

# One source for the CLI defaults and for build_dataset's keyword defaults.
DEFAULTS: dict[str, Any] = {
    "dataset": "random",
    "num_prompts": 100,
    "seed": 0,
    "ignore_eos": False,
    "input_len": 512,
    "output_len": None,  # None: DEFAULT_OUTPUT_LEN, or the ShareGPT reply length
    "range_ratio": 0.0,
    "num_groups": 4,
    "prompts_per_group": 16,
    "prefix_len": 512,
    "suffix_len": 64,
    "num_conversations": 16,
    "turns": 4,
    "first_input_len": None,        # multi-turn: turn 0's tokens (None: input_len)
    "long_fraction": 0.1,
    "long_input_len": 4096,
    # mooncake:PATH (bench/trace_dataset.TraceScale)
    "block_size": CacheConfig.block_size,   # the engine's tokens per KV block
    "token_scale": 1,               # engine blocks per 512-token trace block
    "output_scale": None,           # None: the same length factor as the prompt
    "time_scale": 1.0,              # replay seconds per trace second
    "start": 0,                     # trace lines skipped
    "max_requests": None,           # None: the rest of the trace
    "conversation_sample": 1,       # keep 1 conversation in this many
}

DATASETS = ("random", "shared-prefix", "multi-turn", "mixed", "copy", "sharegpt:PATH", "mooncake:PATH")
PATH_DATASETS = ("sharegpt:", "mooncake:")     # prefixes of the datasets read from a file

# ShareGPT filters (vLLM's is_valid_sequence, in whitespace words instead of tokens).
SHAREGPT_MIN_LEN = 4
SHAREGPT_MAX_PROMPT_LEN = 1024
SHAREGPT_MAX_TOTAL_LEN = 2048


@dataclass
class BenchRequest:
    """One request to send. Exactly one of prompt_ids / prompt_text is set.

    Multi-turn: requests sharing `conversation` form one conversation, `turn` = 0, 1, ...;
    for turn > 0, prompt_ids holds only the new user tokens, and the client sends
    previous turn's prompt + previous turn's reply token ids + prompt_ids, once that reply arrived.
    """

    prompt_ids: list[int] | None = None
    prompt_text: str | None = None
    output_len: int = DEFAULT_OUTPUT_LEN  # tokens (max_tokens)
    ignore_eos: bool = False
    conversation: int | None = None
    turn: int = 0
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. {"group": 2} or {"long": True}
    arrival_s: float | None = None  # send time, s from the run's start (a trace's); None: the arrival process


def build_dataset(args: argparse.Namespace | dict[str, Any], vocab_size: int,
                  reserved_ids: Iterable[int] = ()) -> list[BenchRequest]:
    """The requests of `args.dataset` (a Namespace from add_arguments, or a dict of DEFAULTS keys).
    reserved_ids: token ids a mooncake replay never draws (the tokenizer's special / added tokens)."""
    opts = dict(DEFAULTS)
    opts.update(vars(args) if isinstance(args, argparse.Namespace) else args)
    check_counts(opts)
    rng = np.random.default_rng(opts["seed"])
    name = opts["dataset"]
    if name.startswith("sharegpt:"):
        reqs = _sharegpt(name.removeprefix("sharegpt:"), opts)
    elif name.startswith("mooncake:"):
        reqs = _mooncake(name.removeprefix("mooncake:"), vocab_size, reserved_ids, opts)
    elif name == "random":
        reqs = _random(rng, vocab_size, opts)
    elif name == "shared-prefix":
        reqs = _shared_prefix(rng, vocab_size, opts)
    elif name == "multi-turn":
        reqs = _multi_turn(rng, vocab_size, opts)
    elif name == "mixed":
        reqs = _mixed(rng, vocab_size, opts)
    elif name == "copy":
        reqs = _copy(rng, opts)
    else:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    for r in reqs:
        r.ignore_eos = bool(opts["ignore_eos"])
    return reqs


# option -> its least value (None is allowed where DEFAULTS has it): a bad one was turned into 1 token, or
# surfaced as numpy's "negative dimensions are not allowed"
_LEAST = {"num_prompts": 1, "seed": 0, "input_len": 1, "output_len": 1, "num_groups": 1, "prompts_per_group": 1,
          "prefix_len": 0, "suffix_len": 1, "num_conversations": 1, "turns": 1, "first_input_len": 1,
          "long_input_len": 1}


def check_counts(opts: dict[str, Any]) -> None:
    """ValueError naming the flag of a count or length below its least value (_LEAST)."""
    for key, least in _LEAST.items():
        v = opts.get(key)
        if v is None and DEFAULTS[key] is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < least:
            raise ValueError(f"--{key.replace('_', '-')} must be an integer >= {least}, got {v!r}")


def _output_len(opts: dict[str, Any]) -> int:
    return opts["output_len"] if opts["output_len"] is not None else DEFAULT_OUTPUT_LEN


def _lengths(rng: np.random.Generator, mean: int, range_ratio: float, n: int) -> list[int]:
    """n lengths uniform in [mean * (1 - r), mean * (1 + r)], each >= 1."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    low = max(1, int(mean * (1 - range_ratio)))
    high = max(low, int(mean * (1 + range_ratio)))
    return [int(x) for x in rng.integers(low, high + 1, size=n)]


def _ids(rng: np.random.Generator, vocab_size: int, n: int) -> list[int]:
    return [int(x) for x in rng.integers(0, vocab_size, size=n)]


def _random(rng: np.random.Generator, vocab_size: int, opts: dict[str, Any]) -> list[BenchRequest]:
    n = opts["num_prompts"]
    in_lens = _lengths(rng, opts["input_len"], opts["range_ratio"], n)
    out_lens = _lengths(rng, _output_len(opts), opts["range_ratio"], n)
    return [BenchRequest(prompt_ids=_ids(rng, vocab_size, i), output_len=o) for i, o in zip(in_lens, out_lens)]


def _shared_prefix(rng: np.random.Generator, vocab_size: int, opts: dict[str, Any]) -> list[BenchRequest]:
    prefixes = [_ids(rng, vocab_size, opts["prefix_len"]) for _ in range(opts["num_groups"])]
    reqs = [
        BenchRequest(
            prompt_ids=prefix + _ids(rng, vocab_size, opts["suffix_len"]),
            output_len=_output_len(opts),
            meta={"group": g},
        )
        for g, prefix in enumerate(prefixes)
        for _ in range(opts["prompts_per_group"])
    ]
    order = rng.permutation(len(reqs))  # interleave the groups in arrival order
    return [reqs[i] for i in order]


def _multi_turn(rng: np.random.Generator, vocab_size: int, opts: dict[str, Any]) -> list[BenchRequest]:
    """Turn-major order (every conversation's turn 0, then every turn 1, ...), so that all
    conversations are live at once and a turn's arrival comes after its predecessor's."""
    n_conv, turns, first = opts["num_conversations"], opts["turns"], opts["first_input_len"]
    in_lens = _lengths(rng, opts["input_len"], opts["range_ratio"], n_conv * turns)
    if first is not None:           # turn 0 of each conversation opens with its own longer context
        in_lens[:n_conv] = _lengths(rng, first, opts["range_ratio"], n_conv)
    out_lens = _lengths(rng, _output_len(opts), opts["range_ratio"], n_conv * turns)
    return [
        BenchRequest(
            prompt_ids=_ids(rng, vocab_size, in_lens[t * n_conv + c]),
            output_len=out_lens[t * n_conv + c],
            conversation=c,
            turn=t,
        )
        for t in range(turns)
        for c in range(n_conv)
    ]


def _mixed(rng: np.random.Generator, vocab_size: int, opts: dict[str, Any]) -> list[BenchRequest]:
    n = opts["num_prompts"]
    if not 0.0 <= opts["long_fraction"] <= 1.0:
        raise ValueError(f"long_fraction must be in [0, 1], got {opts['long_fraction']}")
    is_long = np.zeros(n, dtype=bool)
    is_long[rng.permutation(n)[: round(opts["long_fraction"] * n)]] = True
    short = _lengths(rng, opts["input_len"], opts["range_ratio"], n)
    long = _lengths(rng, opts["long_input_len"], opts["range_ratio"], n)
    out_lens = _lengths(rng, _output_len(opts), opts["range_ratio"], n)
    return [
        BenchRequest(
            prompt_ids=_ids(rng, vocab_size, long[i] if is_long[i] else short[i]),
            output_len=out_lens[i],
            meta={"long": bool(is_long[i])},
        )
        for i in range(n)
    ]


# The copy dataset's material: short descriptive paragraphs (written for this benchmark). A passage
# is one of them, whole: the embedded 135M model copies a coherent paragraph back, while a mix of
# unrelated sentences gets summarized instead.
PARAGRAPHS = (
    "The lighthouse stood on a narrow cliff above the harbour. Every evening the keeper climbed the spiral "
    "stairs, trimmed the wick and wound the clockwork that turned the great lens. Ships passing in the night "
    "counted the flashes to know which coast they were on.",
    "The old market opens at dawn, when the farmers arrive with carts of vegetables. By noon the square is "
    "crowded with people bargaining over cheese, bread and fish. In the evening the stalls are folded away and "
    "the square is swept clean for the next day.",
    "A river runs through the centre of the town and turns the wheel of an old mill. In winter the water "
    "freezes near the banks, and children skate under the stone bridge. In spring the melting snow raises the "
    "river until it almost reaches the arches.",
    "The library keeps its rarest books in a cool room behind a heavy oak door. Visitors must wear cotton "
    "gloves before they are allowed to turn a single page. A librarian sits at a desk by the door and writes "
    "down the name of every reader.",
    "The train to the coast leaves at seven and stops at every village on the way. Most passengers carry "
    "baskets, umbrellas and newspapers folded under their arms. The journey takes three hours, and the last "
    "hour runs along the cliffs above the sea.",
    "A narrow path climbs from the station through pine woods to the top of the hill. From the summit one can "
    "see the bay, the islands and, on clear days, the mainland. Walkers usually rest on a wooden bench beside "
    "the old signal tower before they go back down.",
    "The bakery on the corner sells bread with a dark crust and a soft, warm inside. Its owner learned the "
    "recipe from her grandmother and has never changed it. Every morning a queue forms outside the door long "
    "before the shop opens.",
    "The museum's largest hall holds the skeleton of a whale found on the beach in 1902. School groups sit on "
    "the floor beneath it and draw its ribs in their notebooks. A small sign explains how the bones were "
    "carried to the museum on twelve carts.",
)

COPY_TASKS = (
    "Passage:\n{p}\n\nCopy the passage above exactly.\n\nCopy:\n",
    "Original:\n{p}\n\nExact copy of the original:\n",
    "Here is a paragraph:\n\"{p}\"\n\nThe same paragraph, repeated verbatim:\n\"",
)


def _copy(rng: np.random.Generator, opts: dict[str, Any]) -> list[BenchRequest]:
    """Prompt i: task i mod 3 over a paragraph drawn by the seed."""
    picks = rng.integers(0, len(PARAGRAPHS), size=opts["num_prompts"])
    return [BenchRequest(prompt_text=COPY_TASKS[i % len(COPY_TASKS)].format(p=PARAGRAPHS[j]),
                         output_len=_output_len(opts), meta={"task": i % len(COPY_TASKS), "paragraph": int(j)})
            for i, j in enumerate(picks)]


def _sharegpt(path: str, opts: dict[str, Any]) -> list[BenchRequest]:
    """Like vLLM's ShareGPTDataset: keep entries with >= 2 turns, shuffle by seed, take the first
    human turn and the gpt turn after it, skip too-short/too-long pairs, stop at num_prompts."""
    with open(path, encoding="utf-8") as f:
        data = [e for e in json.load(f) if len(e.get("conversations", [])) >= 2]
    random.Random(opts["seed"]).shuffle(data)
    fixed_out = opts["output_len"]
    reqs: list[BenchRequest] = []
    for entry in data:
        if len(reqs) >= opts["num_prompts"]:
            break
        pair = _first_exchange(entry["conversations"])
        if pair is None:
            continue
        prompt, reply = pair
        prompt_len = len(prompt.split())  # whitespace words
        out_len = fixed_out if fixed_out is not None else len(reply.split())
        too_short = prompt_len < SHAREGPT_MIN_LEN or (fixed_out is None and out_len < SHAREGPT_MIN_LEN)
        too_long = prompt_len > SHAREGPT_MAX_PROMPT_LEN or prompt_len + out_len > SHAREGPT_MAX_TOTAL_LEN
        if not (too_short or too_long):
            reqs.append(BenchRequest(prompt_text=prompt, output_len=out_len))
    return reqs


def _trace_scale(opts: dict[str, Any]):
    """The mooncake dataset's bench/trace_dataset.TraceScale (ValueError for a bad option)."""
    from pdcluster.bench.trace_dataset import TraceScale
    return TraceScale(block_size=opts["block_size"], token_scale=opts["token_scale"],
                      output_scale=opts["output_scale"], time_scale=opts["time_scale"], start=opts["start"],
                      max_requests=opts["max_requests"], conversation_sample=opts["conversation_sample"],
                      seed=opts["seed"])


def check_trace(opts: dict[str, Any]) -> None:
    """For a mooncake:PATH dataset, what needs no server: its options, and that the file has lines to
    replay from --start (ValueError / OSError); other datasets: nothing."""
    if str(opts.get("dataset", "")).startswith("mooncake:"):
        from pdcluster.bench.trace_dataset import read_trace
        scale = _trace_scale(opts)
        read_trace(opts["dataset"].split(":", 1)[1], scale.start, scale.max_requests, scale.conversation_sample)


def _mooncake(path: str, vocab_size: int, reserved_ids: Iterable[int], opts: dict[str, Any]) -> list[BenchRequest]:
    from pdcluster.bench.trace_dataset import load_trace
    return [BenchRequest(prompt_ids=r.prompt_ids, output_len=r.output_len, arrival_s=r.arrival_s)
            for r in load_trace(path, _trace_scale(opts), vocab_size, reserved_ids)]


def _first_exchange(turns: list[dict[str, str]]) -> tuple[str, str] | None:
    """(first human turn, the gpt turn right after it), or None."""
    for i, turn in enumerate(turns[:-1]):
        if turn.get("from") == "human":
            nxt = turns[i + 1]
            return (turn.get("value", ""), nxt.get("value", "")) if nxt.get("from") == "gpt" else None
    return None
