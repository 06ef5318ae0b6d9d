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


def test_a_seeded_sampled_request_resumes_on_the_same_stream(llm):
    """Each seeded token is drawn at its own seed (engine/sampler.token_seed). Before, a generator made
    afresh where the request resumed (a decode worker after the prefill worker's first token, a
    migration) restarted at the seed: its next token reused the first token's draws, and the stream
    differed from the one engine's."""
    prompt = llm.tokenizer.encode("Once upon a time, in a small village,", add_special_tokens=False)
    p = SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    full, _ = run(llm.engine, prompt, p)
    for k in (1, 5):                                          # the prefill worker's token, a migration's
        assert run(llm.engine, prompt, p, full[:k])[0] == full
    other, _ = run(llm.engine, prompt, replace(p, seed=8))
    assert other != full                                      # the seed matters


def test_a_stop_string_completed_by_the_last_allowed_token_is_the_finish_reason(llm):
    """The detokenizer's stop string wins over the length the same step reached (as vLLM reports it)."""
    prompt = llm.tokenizer.encode("1, 2, 3, 4,", add_special_tokens=False)
    free = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0]
    text = free.text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip()
    cut = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, stop=[stop]))[0]
    n = len(cut.token_ids)
    at_max = llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0, stop=[stop]))[0]
    assert at_max.token_ids == cut.token_ids and at_max.finish_reason == cut.finish_reason == "stop"


def test_response_format_with_ignore_eos_is_refused_and_a_finished_grammar_stops(llm):
    """Before, the pair ran until the grammar ended, and the next step's mask from the finished grammar
    failed the step: every request on the engine was aborted."""
    s = StructuredOutput("json_schema", json.dumps(SCHEMA))
    with pytest.raises(ValueError, match="response_format cannot be combined with ignore_eos"):
        SamplingParams(max_tokens=30, structured=s, ignore_eos=True).validate()
    prompt = llm.tokenizer.encode("Give a city and its population as JSON.", add_special_tokens=False)
    out, reason = run(llm.engine, prompt, SamplingParams(max_tokens=60, temperature=0, structured=s))
    assert reason == "stop" and json.loads(llm.tokenizer.decode(out, skip_special_tokens=True))


@pytest.fixture
def landed(llm):
    """llm's engine behind a connector whose transport landed every reservation (restored after)."""
    from pdcluster.engine.kv_connector import KVConnector

    class Landed(KVConnector):
        def after_alloc(self, req, ids, n):
            pass

        def take_loaded(self, rid):
            return None
    eng, saved = llm.engine, llm.engine.connector
    eng.connector = Landed()
    yield eng
    eng.connector = saved


def test_a_remote_first_token_that_finishes_the_request_releases_its_grammar(llm, landed):
    """start_remote's first token ends the request (a stop token): its grammar matcher goes with it.
    Before, it stayed, and a later request with that id inherited the advanced grammar."""
    eng = landed
    brace = llm.tokenizer.encode("{", add_special_tokens=False)[-1]
    prompt = llm.tokenizer.encode("Give me a JSON object:", add_special_tokens=False)
    s = StructuredOutput(kind="json_object")
    eng.reserve_remote(prompt, SamplingParams(max_tokens=8, temperature=0, structured=s, stop_token_ids=(brace,)),
                       "r1")
    with pytest.raises(ValueError):
        eng.start_remote("r1", brace)
    assert "r1" not in eng.scheduler.requests and "r1" not in eng.runner.matchers
    eng.reserve_remote(prompt, SamplingParams(max_tokens=8, temperature=0, structured=s), "r1")
    eng.start_remote("r1", brace)       # a fresh grammar takes "{" again
    eng.abort("r1")


def test_a_remote_first_token_our_grammar_refuses_frees_the_reservation(llm, landed):
    """The prefill worker's grammar took a first token this worker's refuses (another grammar build, say):
    start_remote raised and the reservation stayed in WAITING_FOR_REMOTE_KV, its blocks held until the
    router's abort came (the decode worker had already forgotten it). Now it is aborted there and then."""
    eng = landed
    free = eng.scheduler.kv.num_free_blocks
    word = llm.tokenizer.encode(" hello", add_special_tokens=False)[-1]     # no JSON object starts so
    prompt = llm.tokenizer.encode("Give me a JSON object:", add_special_tokens=False)
    eng.reserve_remote(prompt, SamplingParams(max_tokens=8, temperature=0,
                                              structured=StructuredOutput(kind="json_object")), "r2")
    with pytest.raises(RuntimeError, match="against the grammar's mask"):
        eng.start_remote("r2", word)
    assert "r2" not in eng.scheduler.requests and "r2" not in eng.runner.matchers
    assert eng.scheduler.kv.num_free_blocks == free
