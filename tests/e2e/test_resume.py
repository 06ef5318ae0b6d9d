"""A request resumed with outputs (what a migrated request's new attempt is) samples on exactly as
the uninterrupted one: its grammar replays them, its penalties count them as outputs and they count
in max_tokens. Offline, on the real model; the old way (sent tokens as prompt) is shown to diverge."""
import json
from dataclasses import replace

import pytest

from pdcluster.engine import SamplingParams, StructuredOutput

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                           "population": {"type": "integer"}},
          "required": ["city", "population"], "additionalProperties": False}


def run(engine, prompt: list[int], params: SamplingParams, outputs: list[int] = ()) -> tuple[list[int], str]:
    """(every output token, the resumed ones included; finish reason) of one request run to its end."""
    req = engine.add_request(prompt, params, detokenize=False, output_ids=list(outputs))
    while not req.is_finished:
        engine.step()
    return req.output_token_ids, req.status.value


def test_a_json_schema_request_resumes_inside_its_json(llm):
    chat = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Give a city and its population as JSON."}],
                                             add_generation_prompt=True, tokenize=False)
    prompt = llm.tokenizer.encode(chat, add_special_tokens=False)
    p = SamplingParams(max_tokens=40, temperature=0, structured=StructuredOutput("json_schema", json.dumps(SCHEMA)))
    full, reason = run(llm.engine, prompt, p)
    assert reason == "stop" and json.loads(llm.tokenizer.decode(full, skip_special_tokens=True))
    k = len(full) // 2                                        # inside the object
    assert run(llm.engine, prompt, p, full[:k]) == (full, "stop")
    # the sent tokens as prompt: the grammar starts a new object mid-JSON
    old, _ = run(llm.engine, prompt + full[:k], replace(p, max_tokens=p.max_tokens - k))
    assert old != full[k:]


def test_a_frequency_penalty_request_resumes_counting_its_outputs(llm):
    prompt = llm.tokenizer.encode("1, 2, 3, 4,", add_special_tokens=False)
    p = SamplingParams(max_tokens=16, temperature=0, frequency_penalty=1.0)
    full, reason = run(llm.engine, prompt, p)
    assert reason == "length" and len(full) == 16
    resumed = run(llm.engine, prompt, p, full[:6])
    assert resumed == (full, "length")                          # 10 more: max_tokens counts the 6
    old, _ = run(llm.engine, prompt + full[:6], replace(p, max_tokens=10))
    assert old != full[6:]                                      # the 6 as prompt escape the penalty


@pytest.mark.parametrize("outputs, params, match", [
    ([11, 12], SamplingParams(max_tokens=2), "max_tokens"),
    ([49152], SamplingParams(max_tokens=4), "vocabulary"),
    ("x", SamplingParams(max_tokens=4, structured=StructuredOutput("json_object")), "grammar"),   # opens no object
])
def test_outputs_that_cannot_resume_are_a_value_error_and_allocate_nothing(llm, outputs, params, match):
    if isinstance(outputs, str):
        outputs = llm.tokenizer.encode(outputs, add_special_tokens=False)
    free = llm.engine.figures()["free_blocks"]
    with pytest.raises(ValueError, match=match):
        llm.engine.add_request([1, 2, 3], params, output_ids=outputs)
    assert llm.engine.figures()["free_blocks"] == free and not llm.engine.has_work()
