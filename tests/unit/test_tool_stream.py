"""router/openai/tool_stream.py: a tool answer's envelope read while it grows gives, at any split of its text,
what reading it whole gives: the same names, argument text and reply."""
import json
import random

import pytest

from pdcluster.router.openai.tool_stream import AnswerReader
from pdcluster.router.openai.tools import read_answer

CALLS = ('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Pa\\"ris {x}", "n": [1, {"a": "]"}]}}, '
         '{"name": "get_time", "arguments": {}}]}')
REPLY = '{"content": "Hello \\u00e9 \\ud83d\\ude00 \\"quoted\\" \\\\ \\nline"}'


def fed(text: str, rng: random.Random) -> tuple[AnswerReader, list[dict]]:
    r, deltas, i = AnswerReader(), [], 0
    while i < len(text):
        j = i + rng.randint(1, 6)
        deltas.append(r.feed(text[i:j]))
        i = j
    return r, deltas


def merged(deltas: list[dict]) -> tuple[str, dict[int, dict]]:
    """The stream's deltas as a client accumulates them: content, and per call index its name and arguments."""
    content, calls = "", {}
    for d in deltas:
        content += d.get("content", "")
        for c in d.get("tool_calls", []):
            got = calls.setdefault(c["index"], {"name": None, "arguments": "", "id": None})
            if "id" in c:
                assert got["id"] is None                # a call's head comes once
                got["id"], got["name"] = c["id"], c["function"]["name"]
            got["arguments"] += c["function"]["arguments"]
    return content, calls


@pytest.mark.parametrize("seed", range(40))
def test_any_split_of_the_calls_streams_them_as_the_whole_answer_reads(seed):
    r, deltas = fed(CALLS, random.Random(seed))
    content, calls = merged(deltas)
    assert r.state == "done" and content == ""
    doc = json.loads(CALLS)["tool_calls"]
    assert [calls[k]["name"] for k in sorted(calls)] == [c["name"] for c in doc]
    assert [json.loads(calls[k]["arguments"]) for k in sorted(calls)] == [c["arguments"] for c in doc]
    whole = read_answer(CALLS, "stop")
    assert whole.finish_reason == "tool_calls" and [c["function"]["arguments"] for c in whole.tool_calls] == \
        [calls[k]["arguments"] for k in sorted(calls)]


@pytest.mark.parametrize("seed", range(40))
def test_any_split_of_a_reply_streams_its_characters_never_half_an_escape(seed):
    r, deltas = fed(REPLY, random.Random(seed))
    content, calls = merged(deltas)
    assert r.state == "done" and not calls
    assert content == json.loads(REPLY)["content"] == read_answer(REPLY, "stop").content
    # a surrogate pair's halves never come apart: no delta holds a lone surrogate
    assert not any(0xD800 <= ord(ch) <= 0xDFFF for d in deltas for ch in d.get("content", ""))


def test_a_cut_answer_streams_what_was_certain_and_reads_whole_as_it_streamed():
    """Cut by max_tokens, the whole answer came back as raw envelope text (its first, complete call lost) while
    the stream had sent the calls: both give the calls read so far now."""
    cut = CALLS[:CALLS.index('"n"') + 2]
    r = AnswerReader()
    content, calls = merged([r.feed(cut)])
    assert r.state == "args" and calls[0]["name"] == "get_weather"
    assert calls[0]["arguments"] == '{"city": "Pa\\"ris {x}", "n'
    a = read_answer(cut, "length")
    assert a.content is None and a.finish_reason == "length"
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in a.tool_calls] == [("get_weather", calls[0]["arguments"])]
    two = CALLS[:CALLS.index('"get_time"') + len('"get_time", "arguments": ')]     # a second call's head, no arguments
    _, calls = merged([AnswerReader().feed(two)])
    b = read_answer(two, "length")
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in b.tool_calls] == \
        [(calls[k]["name"], calls[k]["arguments"]) for k in sorted(calls)] and len(calls) == 2
    reply = REPLY[:20]
    c = read_answer(reply, "length")
    assert c.tool_calls is None and c.content == merged([AnswerReader().feed(reply)])[0] == "Hello \u00e9"[:len(c.content)]


def test_text_that_is_no_envelope_is_left_raw():
    for text in ("Hello", '{"other": 1}', '{"tool_calls": {'):
        r = AnswerReader()
        assert r.feed(text) == {} and r.state == "raw"
        assert read_answer(text, "stop").content == text


@pytest.mark.parametrize("seed", range(5))
def test_random_text_never_raises_and_reads_whole_as_it_streams(seed):
    """Whatever text comes (a cut, a prefix of the envelope then junk), the reader answers deltas or nothing, and
    the whole answer is what the stream gave: its calls' names and arguments, or its reply, or (no envelope) the
    text as it is; calls that are whole JSON are the text's own."""
    rng = random.Random(seed)
    alphabet = '{}[]",: \\uabcdef0123456789nametoolcalsrgu' + "\u00e9\U0001F600"
    read = 0
    for _ in range(300):
        head = rng.choice(["", CALLS, REPLY, CALLS[:rng.randint(0, len(CALLS))], REPLY[:rng.randint(0, len(REPLY))]])
        text = head + ("" if rng.random() < 0.3 else "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))))
        r = AnswerReader()
        content, calls = merged([r.feed(text[i:i + 3]) for i in range(0, len(text), 3)])
        a = read_answer(text, "stop")
        if r.state == "raw" or (r.state == "done" and r.pos != len(text)):
            # junk where the grammar allows none: the stream shows the text raw from there on
            assert a.content == text and a.tool_calls is None or (a.tool_calls and r.state == "raw")
        elif calls:
            assert a.content is None and [(c["function"]["name"], c["function"]["arguments"]) for c in a.tool_calls] \
                == [(calls[k]["name"], calls[k]["arguments"]) for k in sorted(calls)]
            if r.state == "done":
                doc = json.loads(text)
                assert [c["function"]["name"] for c in a.tool_calls] == [x["name"] for x in doc["tool_calls"]]
                read += 1
        else:
            assert (a.content or "") == content and a.tool_calls is None
            if r.state == "done":
                assert a.content == json.loads(text)["content"]
                read += 1
    assert read > 0                                         # whole envelopes were among them
