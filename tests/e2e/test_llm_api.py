"""The offline LLM as a vLLM user drives it (engine/llm.py): vLLM's result shape, prompt dicts, chat(),
a bare stop string; and what it refuses, with nothing left allocated. The session's float32 engine."""
import pytest

from pdcluster.engine import SamplingParams
from pdcluster.engine.tokenizer import apply_chat_template

GREEDY = SamplingParams(max_tokens=12, temperature=0)


def test_vllm_shaped_results_and_prompt_dicts(llm):
    [out] = llm.generate("Once upon a time", GREEDY)
    c = out.outputs[0]
    assert (c.index, c.text, c.token_ids, c.finish_reason) == (0, out.text, out.token_ids, out.finish_reason)
    assert out.prompt == "Once upon a time" and out.finished and out.text
    ids = llm.tokenizer.encode("Once upon a time", add_special_tokens=False)
    by_dict = llm.generate([{"prompt": "Once upon a time"}, {"prompt_token_ids": ids}], GREEDY)
    assert [o.token_ids for o in by_dict] == [out.token_ids] * 2 and by_dict[1].prompt is None


def test_a_bare_stop_string_is_one_stop_string(llm):
    free = llm.generate("Once upon a time", SamplingParams(max_tokens=40, temperature=0))[0].text
    word = free.split()[2]                                      # a word of the free text, past its start
    bare = llm.generate("Once upon a time", SamplingParams(max_tokens=40, temperature=0, stop=word))[0]
    listed = llm.generate("Once upon a time", SamplingParams(max_tokens=40, temperature=0, stop=[word]))[0]
    assert bare.text == listed.text == free[:free.index(word)] and bare.finish_reason == "stop"


def test_chat_renders_the_template_and_takes_several_conversations(llm):
    conv = [{"role": "user", "content": "What is the capital of France?"}]
    [one] = llm.chat(conv, GREEDY)
    assert one.token_ids == llm.generate(apply_chat_template(llm.tokenizer, conv), GREEDY)[0].token_ids
    assert "Paris" in one.text
    two = llm.chat([conv, [{"role": "user", "content": "Say hi."}]], GREEDY)
    assert len(two) == 2 and two[0].token_ids == one.token_ids


@pytest.mark.parametrize("args, match", [
    (({"prompt": "x", "foo": 1},), "prompt dict"),
    (("a", {"max_tokens": 3}), "SamplingParams"),
    ((["a", "b"], [GREEDY, None]), "SamplingParams"),
    ((["a"], []), "one per prompt"),
    ((None,), "prompts must be"),
    (([True, False],), "prompt must be"),
    (("a", SamplingParams(logit_bias={49152: 1.0})), "logit_bias"),       # was an IndexError inside step()
    (("a", SamplingParams(stop_token_ids=[10**9])), "stop_token_ids"),
])
def test_bad_input_is_a_value_error_and_allocates_nothing(llm, args, match):
    free = llm.engine.figures()["free_blocks"]
    with pytest.raises(ValueError, match=match):
        llm.generate(*args)
    assert llm.engine.figures()["free_blocks"] == free and not llm.engine.has_work()
    with pytest.raises(ValueError, match="conversation"):
        llm.chat([[{"role": "user"}]])
