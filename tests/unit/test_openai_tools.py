"""router/openai/tools.py and its conversion without a server: tools described to the model, the answer's
grammar, history in the same envelope, and the envelope read back as OpenAI's tool_calls."""
import json

import pytest

from pdcluster.router.openai import convert, tools
from pdcluster.router.openai.schemas import ChatCompletionRequest
from pdcluster.router.validate import InvalidRequest

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tok():
    from pdcluster.engine.loader import load_model_config
    from pdcluster.engine.tokenizer import load_tokenizer
    return load_tokenizer(load_model_config(None))


def req(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(**{"model": "m", "messages": USER} | kw)


def parse(tok, **kw):
    return convert.parse(req(**kw), tok, 49152, 2048)


def test_tool_choice_picks_what_the_grammar_allows():
    fs = tools.functions_of(req(tools=[WEATHER, TIME]).tools)
    assert [f.name for f in fs] == ["get_weather", "get_time"]
    assert fs[1].parameters == {"type": "object", "properties": {}}          # no parameters: no arguments
    auto = tools.plan(req(tools=[WEATHER, TIME]).tools, None, True)
    assert auto.choice == "auto" and {"content"} in [set(x["properties"]) for x in auto.schema()["anyOf"]]
    need = tools.plan(req(tools=[WEATHER, TIME]).tools, "required", False).schema()
    assert need["properties"]["tool_calls"]["maxItems"] == 1 and "anyOf" not in need
    names = [x["properties"]["name"]["const"] for x in need["properties"]["tool_calls"]["items"]["anyOf"]]
    assert names == ["get_weather", "get_time"]
    r = req(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}})
    named = tools.plan(r.tools, r.tool_choice, True)
    assert named.choice == "named" and [f.name for f in named.functions] == ["get_time"]
    assert tools.plan(r.tools, "none", True) is None and tools.plan(None, None, True) is None


def test_the_prompt_describes_the_tools_and_the_answer_is_held_to_the_envelope(tok):
    job = parse(tok, tools=[WEATHER], tool_choice="required")
    prompt = tok.decode(job.prompts[0])
    assert "get_weather" in prompt and "The weather in a city now." in prompt and '"tool_calls"' in prompt
    s = job.params[0][0].structured
    assert s.kind == "json_schema" and json.loads(s.schema) == job.tools.schema() and s.compact
    plain = parse(tok)
    assert plain.tools is None and plain.params[0][0].structured is None and "get_weather" not in \
        tok.decode(plain.prompts[0])
    own = parse(tok, tools=[WEATHER], messages=[{"role": "system", "content": "Be terse."}] + USER)
    assert tok.decode(own.prompts[0]).count("<|im_start|>system") == 1           # merged into the caller's


def test_history_tool_calls_and_results_go_back_in_the_envelope(tok):
    msgs = USER + [{"role": "assistant", "content": None, "tool_calls": [
                       {"id": "call_1", "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                   {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]
    text = tok.decode(parse(tok, tools=[WEATHER], messages=msgs).prompts[0])
    assert '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}' in text
    assert "<|im_start|>tool\n18 C, sunny" in text


@pytest.mark.parametrize("kw, param, words", [
    (dict(tool_choice="required"), "tool_choice", "needs tools"),
    (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice",
     "not in tools"),
    (dict(tools=[WEATHER, WEATHER]), "tools", "twice"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]), "tools",
     "object schema"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "#/nope"}}}}}]), "tools", "cannot be enforced"),
    (dict(tools=[WEATHER], response_format={"type": "json_object"}), "response_format", "tools"),
    (dict(tools=[{"type": "function", "function": {"name": f"f{i}", "parameters": {
        "type": "object", "properties": {f"p{j}": {"type": "string"} for j in range(60)}}}} for i in range(40)]),
     "tools", "grammar"),
    (dict(messages=[{"role": "tool", "content": "x"}]), "messages", "tool_call_id"),
    (dict(messages=[{"role": "user", "content": None}]), "messages", "content is required"),
    (dict(messages=[{"role": "user", "content": "x", "tool_calls": []}]), "messages", "only assistant"),
    (dict(messages=USER + [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]), "messages", "not JSON"),
])
def test_bad_tools_are_refused_naming_the_field(tok, kw, param, words):
    with pytest.raises(InvalidRequest) as e:
        parse(tok, **kw)
    assert e.value.param == param and words in str(e.value)


def test_function_names_follow_openai_s_rule():
    from pydantic import ValidationError
    with pytest.raises(ValidationError):
        req(tools=[{"type": "function", "function": {"name": "bad name!"}}])


def test_answers_read_back_as_openai_message_fields():
    a = tools.read_answer('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}', "stop")
    assert a.content is None and a.finish_reason == "tool_calls" and len(a.tool_calls) == 1
    call = a.tool_calls[0]
    assert call["type"] == "function" and call["id"].startswith("call_") and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert tools.read_answer('{"content": "Hello"}', "stop").content == "Hello"
    cut = tools.read_answer('{"tool_calls": [{"na', "length")        # cut before a name: nothing read, as streamed
    assert cut.content is None and cut.tool_calls is None and cut.finish_reason == "length"


def test_a_compact_grammar_allows_json_dumps_separators_and_no_other_whitespace(tok):
    from pdcluster.engine.structured import Grammars, StructuredOutput
    g = Grammars(tok, 49152)
    spec = StructuredOutput("json_schema", json.dumps({"type": "object", "properties": {"a": {"type": "integer"}},
                                                       "required": ["a"]}), compact=True)

    def accepts(text: str) -> bool:
        m = g.matcher(spec)
        return all(m.accept_token(t) for t in tok.encode(text, add_special_tokens=False))
    assert accepts('{"a": 1}') and not accepts('{ "a": 1}') and not accepts('{"a":\n 1}')
    loose = StructuredOutput("json_schema", spec.schema)
    m = g.matcher(loose)
    assert all(m.accept_token(t) for t in tok.encode('{ "a":\n 1}', add_special_tokens=False))
    with pytest.raises(ValueError, match="no schema"):
        StructuredOutput("json_object", compact=True).validate()


def test_a_history_call_whose_arguments_nest_past_the_parser_is_refused_not_a_500():
    from pdcluster.router.openai.tools import ToolError, history_text
    body = req(messages=[{"role": "assistant", "content": None,
                          "tool_calls": [{"id": "a", "type": "function",
                                          "function": {"name": "f", "arguments": "[" * 100_000}}]},
                         {"role": "user", "content": "x"}])
    with pytest.raises(ToolError, match="not JSON"):
        history_text(body.messages[0])


@pytest.mark.parametrize("escaped,text", [("\\udc00", "\udc00"), ("\\ud800", "\ud800"), ("a\\ud800b", "a\ud800b"),
                                          ("\\ud800\\u0041", "\ud800A"), ("\\ud83d\\ude00!", "\U0001F600!")])
def test_lone_surrogates_in_a_streamed_answer_decode_alone_and_pairs_whole(escaped, text):
    """A high surrogate is held back only until it is known whether its low half follows; a lone one decodes alone
    (it waited forever before, and the reply was lost). The whole response escapes it (app.json_text)."""
    from pdcluster.router.openai.app import json_text
    from pdcluster.router.openai.tool_stream import AnswerReader
    answer = '{"content": "' + escaped + '"}'
    for size in (1, 3, 7, len(answer)):
        r = AnswerReader()
        got = "".join(r.feed(answer[i:i + size]).get("content", "") for i in range(0, len(answer), size))
        assert (got, r.content, r.state) == (text, text, "done"), size
    body = json_text({"content": text})
    assert body.isascii() and json.loads(body) == {"content": text}
