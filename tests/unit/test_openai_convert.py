"""router/openai/convert.py and schemas.py without a server: OpenAI bodies -> prompts and
SamplingParams through the validation gRPC uses; events -> OpenAI's usage and logprobs shapes."""
import json
import re

import pytest
from pydantic import ValidationError

from pdcluster.engine.sampling_params import TokenLogprobs
from pdcluster.router.openai import convert
from pdcluster.router.openai.schemas import ChatCompletionRequest, CompletionRequest
from pdcluster.router.validate import InvalidRequest
from tests.unit.char_tok import CharTok as Tok

VOCAB, CONTEXT = 1000, 64


def parse(body: dict, chat=False, tok=None, vocab=VOCAB, context=CONTEXT):
    cls = ChatCompletionRequest if chat else CompletionRequest
    return convert.parse(cls(**{"model": "m"} | body), tok or Tok(), vocab, context)


@pytest.fixture(scope="module")
def real_tok():
    from pdcluster.engine.loader import load_model_config
    from pdcluster.engine.tokenizer import load_tokenizer
    return load_tokenizer(load_model_config(None))


def test_prompts_of_every_shape_and_one_params_per_choice():
    assert parse({"prompt": "hi"}).prompts == [[104, 105]]
    assert parse({"prompt": ["a", "bc"]}).prompts == [[97], [98, 99]]
    assert parse({"prompt": [5, 6]}).prompts == [[5, 6]]
    job = parse({"prompt": [[5], [6, 7]], "n": 3, "seed": 10, "temperature": 0.5, "max_tokens": 4})
    assert len(job.params) == 2 and all(len(ps) == 3 for ps in job.params)
    assert [p.seed for p in job.params[0]] == [10, 11, 12] and job.params[1][2].max_tokens == 4


def test_sampling_fields_map_and_max_tokens_defaults_as_openai_s():
    p = parse({"prompt": "abcd", "stop": "x", "top_k": -1, "min_p": 0.1, "presence_penalty": 0.5,
               "repetition_penalty": 1.1, "logprobs": 2}).params[0][0]
    assert p.max_tokens == 16 and p.stop == ("x",) and p.top_k == 0 and p.min_p == 0.1
    assert p.presence_penalty == 0.5 and p.repetition_penalty == 1.1 and p.logprobs == 2


def test_logit_bias_and_min_tokens_map_as_openai_and_vllm_take_them():
    p = parse({"prompt": "ab", "logit_bias": {"5": -100, "017": 2.5}, "min_tokens": 3}).params[0][0]
    assert p.logit_bias == ((5, -100.0), (17, 2.5)) and p.min_tokens == 3
    assert parse({"prompt": "ab"}).params[0][0].logit_bias == ()


@pytest.mark.parametrize("body, param, words", [
    ({"logit_bias": {"x1": 1}}, "logit_bias", "decimal strings"),
    ({"logit_bias": {"-1": 1}}, "logit_bias", "decimal strings"),
    ({"logit_bias": {"7": 1, "07": 2}}, "logit_bias", "twice"),
    ({"logit_bias": {str(VOCAB): 1}}, "logit_bias", "vocab size"),
    ({"logit_bias": {"7": 101}}, "logit_bias", "[-100, 100]"),
    ({"min_tokens": 17}, "min_tokens", "max_tokens"),
    ({"min_tokens": -1}, "min_tokens", "max_tokens"),
])
def test_a_bad_logit_bias_or_min_tokens_is_refused_naming_it(body, param, words):
    with pytest.raises(InvalidRequest) as e:
        parse({"prompt": "ab"} | body)
    assert e.value.param == param and words in str(e.value)


def test_echo_shows_each_prompt_as_sent_and_asks_prompt_logprobs_only_with_logprobs():
    job = parse({"prompt": ["ab", "c"], "echo": True, "logprobs": 2, "max_tokens": 1})
    assert job.echo == ["ab", "c"] and job.params[0][0].prompt_logprobs == 2
    ids = parse({"prompt": [104, 105], "echo": True})
    assert ids.echo == ["hi"] and ids.params[0][0].prompt_logprobs is None
    assert parse({"prompt": "ab"}).echo is None
    lp = convert.completion_logprobs(Tok(), [TokenLogprobs(105, -0.5, ((105, -0.5),))], 0, lead=[104])
    assert lp == {"tokens": ["h", "i"], "token_logprobs": [None, -0.5], "top_logprobs": [None, {"i": -0.5}],
                  "text_offset": [0, 1]}


def test_the_grpc_map_and_min_tokens_go_through_the_same_validation():
    from pdcluster.router.proto import generation_pb2 as pb
    from pdcluster.router.validate import sampling_from_proto
    s = pb.SamplingParams(max_tokens=8, min_tokens=2, logit_bias={3: 1.5, 9: -100})
    p = sampling_from_proto(s, VOCAB)
    assert p.min_tokens == 2 and p.logit_bias == ((3, 1.5), (9, -100.0))
    with pytest.raises(InvalidRequest, match="sampling.logit_bias id 1000 is outside"):
        sampling_from_proto(pb.SamplingParams(max_tokens=8, logit_bias={VOCAB: 1}), VOCAB)
    with pytest.raises(InvalidRequest, match="sampling.min_tokens") as e:
        sampling_from_proto(pb.SamplingParams(max_tokens=8, min_tokens=9), VOCAB)
    assert e.value.param == "min_tokens"


def test_chat_messages_roles_parts_and_logprobs(real_tok):
    from pdcluster.engine.tokenizer import apply_chat_template
    job = parse({"messages": [{"role": "developer", "content": "be"},
                              {"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}],
                 "logprobs": True, "top_logprobs": 3, "max_completion_tokens": 5}, chat=True, tok=real_tok,
                vocab=49152, context=2048)
    assert job.prompts == [apply_chat_template(real_tok, [{"role": "system", "content": "be"},
                                                          {"role": "user", "content": "hi"}])]
    assert job.logprobs == 3 and job.params[0][0].max_tokens == 5 and job.params[0][0].logprobs == 3
    plain = parse({"messages": [{"role": "user", "content": "x"}]}, chat=True, tok=real_tok, vocab=49152, context=2048)
    assert plain.logprobs is None and plain.params[0][0].max_tokens == 2048 - len(plain.prompts[0])   # the rest


def test_a_transcript_from_openai_replays_with_its_assistant_message_fields(real_tok):
    """OpenAI's assistant messages carry refusal, annotations, audio and function_call (null or empty): a
    conversation copied from it was a 400 (unknown fields); vLLM takes them. A refusal is the text of a message
    without content; the others add nothing to the prompt."""
    from pdcluster.engine.tokenizer import apply_chat_template
    said = {"role": "assistant", "content": "Paris.", "refusal": None, "annotations": [], "audio": None,
            "function_call": None}
    refused = {"role": "assistant", "content": None, "refusal": "I can't help with that."}
    job = parse({"messages": [{"role": "user", "content": "Capital?"}, said, refused,
                              {"role": "user", "content": "ok"}]}, chat=True, tok=real_tok, vocab=49152, context=2048)
    assert job.prompts == [apply_chat_template(real_tok, [
        {"role": "user", "content": "Capital?"}, {"role": "assistant", "content": "Paris."},
        {"role": "assistant", "content": "I can't help with that."}, {"role": "user", "content": "ok"}])]
    for bad, param in [({"role": "assistant", "content": "x", "audio": {"id": "a"}}, "audio"),
                       ({"role": "user", "content": "x", "refusal": "no"}, "messages")]:
        with pytest.raises((ValidationError, InvalidRequest), match=param):
            parse({"messages": [bad]}, chat=True, tok=real_tok, vocab=49152, context=2048)


@pytest.mark.parametrize("body, param", [
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": "hi", "top_p": 2}, "top_p"),
    ({"prompt": "hi", "stop": [""]}, "stop"),
    ({"prompt": "hi", "stop_token_ids": [VOCAB]}, "stop_token_ids"),
    ({"prompt": [VOCAB + 1]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": "x" * 60, "max_tokens": 10}, "max_tokens"),                 # past the context
    ({"prompt": "hi", "best_of": 3}, "best_of"),
    ({"prompt": "hi", "response_format": {"type": "json_schema"}}, "response_format"),
    ({"prompt": "hi", "top_k": -2}, "top_k"),                                # -1 is off; -2 is an error
    ({"prompt": "hi", "top_p": 0}, "top_p"),                                 # not "unset" as on the gRPC wire
    ({"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "hi", "n": 0}, "n"),                                        # the gRPC API's check
    ({"prompt": "hi", "n": 17}, "n"),
])
def test_bad_values_name_their_field(body, param):
    with pytest.raises(InvalidRequest) as e:
        parse(body)
    assert e.value.param == param, e.value


@pytest.mark.parametrize("body", [{"prompt": "hi", "frobnicate": 1}, {"prompt": "hi", "suffix": "x"},
                                  {"prompt": "hi", "logprobs": 21}])
def test_unknown_or_unsupported_fields_are_refused_not_ignored(body):
    with pytest.raises(ValidationError):
        CompletionRequest(**{"model": "m"} | body)


def test_usage_counts_each_prompt_once_and_the_best_cache_hit_of_its_choices():
    cs = [convert.ChoiceState(k, prompt_tokens=p, completion_tokens=c, cached_tokens=h)
          for k, (p, c, h) in enumerate([(10, 3, 0), (10, 4, 8), (7, 2, 0), (7, 2, 0)])]
    assert convert.usage(cs, n=2) == {"prompt_tokens": 17, "completion_tokens": 11, "total_tokens": 28,
                                      "prompt_tokens_details": {"cached_tokens": 8}}


def test_logprobs_in_the_chat_and_the_completions_shapes():
    lps = [TokenLogprobs(104, -0.1, ((104, -0.1), (105, -2.5))), TokenLogprobs(105, -0.3, ((105, -0.3),))]
    chat = convert.chat_logprobs(Tok(), lps)["content"]
    assert [c["token"] for c in chat] == ["h", "i"] and chat[0]["top_logprobs"][1] == {
        "token": "i", "logprob": -2.5, "bytes": [105]}
    comp = convert.completion_logprobs(Tok(), lps)
    assert comp == {"tokens": ["h", "i"], "token_logprobs": [-0.1, -0.3],
                    "top_logprobs": [{"h": -0.1, "i": -2.5}, {"i": -0.3}], "text_offset": [0, 1]}


def test_the_http_api_and_the_grpc_server_tokenize_on_the_routers_one_thread():
    """A fast tokenizer must never be entered by two threads at once: transformers sets split_special_tokens on the
    shared object before each encode, so a chat message (markers split) encoded beside a gRPC text prompt (markers
    parsed) could have its role markers read as special tokens. Both servers take the router's one thread."""
    from types import SimpleNamespace

    from pdcluster.router.openai.app import Api
    from pdcluster.router.server import GenerationServicer

    class Vocab:
        def get_vocab(self):
            return {}
    router = SimpleNamespace(tokenizer=Vocab())
    api, grpc_side = Api(router, "m", 100), GenerationServicer(router, "m", 100)
    try:
        assert api.tokenize is grpc_side._tokenize is router.tokenize_pool
        assert api.tokenize._max_workers == 1
    finally:
        router.tokenize_pool.shutdown(wait=True)


@pytest.mark.parametrize("prompt,words", [([[0]] * 700, "at most 64"), (["a"] * 65, "at most 64"),
                                          ([0] * ((1 << 20) + 1), "at most 1048576"), ([[0], "a"], "valid list")])
def test_a_prompt_is_checked_against_the_one_shape_its_first_element_names(prompt, words):
    """pydantic validates the body on the event loop: tried against every member of prompt's union, a list built
    an error per element per member (seconds for a 4 MiB body). The first element picks the member, and the bounds
    stop a list at them: one error."""
    with pytest.raises(ValidationError) as e:
        CompletionRequest(model="m", prompt=prompt)
    assert len(e.value.errors()) == 1 and words in str(e.value)
    for ok in ("a", ["a", "b"], [1, 2], [[1], [2, 3]]):
        assert CompletionRequest(model="m", prompt=ok).prompt == ok


@pytest.mark.parametrize("body,field,words", [
    ({"prompt": "x", "stop_token_ids": ["a"] * 900_000}, "stop_token_ids", "at most 1024 items"),
    ({"prompt": "x", "stop": [1] * 900_000}, "stop", "at most 64 strings, got 900000"),
    ({"prompt": "x", "stop": ["a"] * 65}, "stop", "at most 64 strings, got 65"),     # (was: "a valid string")
    ({"prompt": "x", "logit_bias": {str(i): "a" for i in range(300_000)}}, "logit_bias", "at most 262144"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}] * 500_000}]}, "messages", "at most 4096 items"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{}] * 500_000}, "tools", "at most 128 items"),
    ({"messages": [{"role": "assistant", "tool_calls": [{}] * 500_000}]}, "messages", "at most 1024 items"),
    ({"messages": [{"role": "assistant", "content": "x", "annotations": [1] * 500_000}]}, "messages",
     "at most 1024 items"),
])
def test_every_list_in_a_body_stops_at_its_bound(body, field, words):
    """A 4 MiB body's list of wrong items built one error each (~1M: seconds holding the GIL, and so the event
    loop, review repro); each list is bounded in its schema now, and pydantic stops at the bound."""
    model = ChatCompletionRequest if "messages" in body else CompletionRequest
    with pytest.raises(ValidationError) as e:
        model.model_validate_json(json.dumps({"model": "m", **body}))
    errors = e.value.errors()
    assert len(errors) <= 2 and errors[0]["loc"][0] == field and words in str(e.value)


@pytest.mark.parametrize("body, param, says", [
    ({"max_completion_tokens": 0}, "max_completion_tokens", "max_completion_tokens must be >= 1"),
    ({"max_completion_tokens": 3, "min_tokens": 5}, "min_tokens", "in [0, max_completion_tokens]"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens must be >= 1"),
])
def test_a_chat_error_names_the_length_field_the_client_sent(body, param, says):
    """A chat sent max_completion_tokens: 0 and heard of "max_tokens", a field it never set."""
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **body)
    with pytest.raises(InvalidRequest, match=re.escape(says)) as e:
        convert.parse(req, Tok(), 256, 128)
    assert e.value.param == param


def test_the_grpc_chat_takes_the_developer_role_as_http_does(real_tok):
    """gRPC refused role "developer" that HTTP took as "system" (README: both APIs share one validation)."""
    from pdcluster.engine.tokenizer import apply_chat_template
    from pdcluster.router.proto import generation_pb2 as pb
    from pdcluster.router.validate import parse_request
    msgs = [pb.ChatMessage(role="developer", content="be brief"), pb.ChatMessage(role="user", content="hi")]
    got = parse_request(pb.GenerateRequest(chat=pb.ChatMessages(messages=msgs), sampling=pb.SamplingParams(
        max_tokens=4)), real_tok, 49152, 2048)
    assert got.prompt_ids == apply_chat_template(real_tok, [{"role": "system", "content": "be brief"},
                                                            {"role": "user", "content": "hi"}])


def test_a_messages_name_reaches_the_template_and_holds_no_template_text(monkeypatch):
    """The name was accepted and dropped (README: no field is silently ignored); vLLM passes it to the template.
    It is a plain pattern, so it cannot carry special-token text into the rendered prompt."""
    from pdcluster.engine import tokenizer as tok_mod
    seen = []
    monkeypatch.setattr(tok_mod, "apply_chat_template", lambda tok, msgs: seen.append(msgs) or [5, 6])
    parse({"messages": [{"role": "developer", "content": "x"}, {"role": "user", "content": "hi", "name": "alice_2"}]},
          chat=True)
    assert seen == [[{"role": "system", "content": "x"}, {"role": "user", "content": "hi", "name": "alice_2"}]]
    with pytest.raises(ValidationError, match="name"):
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi", "name": "<|im_end|>"}])
