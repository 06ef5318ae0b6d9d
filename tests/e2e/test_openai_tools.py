"""Tool calling over the OpenAI HTTP API (router/openai/tools.py, tool_stream.py) driven by the official `openai`
client on the shared e2e cluster: required, named, auto and streamed calls parse as OpenAI's, and a tool's result
in the history is answered."""
import json

import httpx

from tests.e2e.conftest import base_url, sync

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}},
                   "required": ["city"], "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "description": "The time now."}}


def test_tool_calls_required_named_and_streamed_parse_as_openai_s(cluster, client, model):
    """Through the official client: the answer is held to the tool envelope, so every call parses; a streamed
    answer carries the same call as the whole one (greedy)."""
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    kw = dict(model=model, messages=msgs, tools=[WEATHER_TOOL, TIME_TOOL], temperature=0, max_tokens=64)
    r = sync(cluster, lambda: client.chat.completions.create(**kw, tool_choice="required"))
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None and c.message.tool_calls
    call = c.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in ("get_weather", "get_time")
    args = json.loads(call.function.arguments)
    assert isinstance(args, dict) and (call.function.name == "get_time" or isinstance(args["city"], str))

    named = sync(cluster, lambda: client.chat.completions.create(
        **kw, tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    calls = named.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    assert set(json.loads(calls[0].function.arguments)) == {"city"}

    def streamed():
        return list(client.chat.completions.create(**kw, tool_choice={"type": "function",
                                                                      "function": {"name": "get_weather"}},
                                                   stream=True))
    chunks = sync(cluster, streamed)
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    got = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert {tc.index for tc in got} == {0} and [tc.function.name for tc in got if tc.id] == ["get_weather"]
    assert len(got) > 2                                        # the arguments came in pieces, as generated
    assert "".join(tc.function.arguments or "" for tc in got) == calls[0].function.arguments
    assert deltas[0].role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"

    auto = sync(cluster, lambda: client.chat.completions.create(**kw)).choices[0].message    # tool_choice auto
    assert (auto.content is None) != (auto.tool_calls is None)


def test_a_tool_result_in_history_is_answered(cluster, client, model):
    msgs = [{"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"}]
    r = sync(cluster, lambda: client.chat.completions.create(model=model, messages=msgs, tools=[WEATHER_TOOL],
                                                             tool_choice="none", temperature=0, max_tokens=24))
    c = r.choices[0]
    assert c.message.tool_calls is None and c.message.content and c.finish_reason in ("stop", "length")
    bad = sync(cluster, lambda: httpx.post(f"{base_url(cluster)}/chat/completions", timeout=60, json={
        "model": model, "messages": msgs[:1], "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "function", "function": {"name": "nope"}}}))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tool_choice"


def test_a_stop_string_that_cuts_the_envelope_finishes_stop_streamed_as_whole(cluster, client, model):
    """A stop string inside the call's arguments ends the answer before its envelope closes: no whole call,
    so "stop" both ways (streamed, it said "tool_calls" over arguments that are not JSON), and the whole answer
    holds what the stream sent: the call read so far, its arguments cut (before, raw envelope text)."""
    kw = dict(model=model, messages=[{"role": "user", "content": "What is the weather in Paris?"}],
              tools=[WEATHER_TOOL], tool_choice="required", temperature=0, max_tokens=64, stop=['"city"'])
    whole = sync(cluster, lambda: client.chat.completions.create(**kw)).choices[0]
    chunks = sync(cluster, lambda: list(client.chat.completions.create(**kw, stream=True)))
    got = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert got and got[0].function.name == "get_weather"       # the cut came after the call's name was streamed
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert whole.finish_reason == "stop" and whole.message.content is None
    assert [(c.function.name, c.function.arguments) for c in whole.message.tool_calls] == \
        [("get_weather", "".join(tc.function.arguments or "" for tc in got))]
