"""Sampling features on the real model against transformers: logprobs of the model's distribution (raw, the
default) or of the row the token is drawn from (processed), the repetition penalty as transformers applies it,
and JSON output enforced by a grammar (engine/structured.py)."""
import json

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from pdcluster.engine import SamplingParams, StructuredOutput
from tests.e2e.conftest import PROMPTS, check_top5


def ids_of(llm, text):
    return llm.tokenizer.encode(text, add_special_tokens=False)


@torch.inference_mode()
def test_logprobs_of_greedy_tokens_match_the_reference_distribution(llm, hf_ref):
    prompt = ids_of(llm, PROMPTS[0])
    out = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, logprobs=5))[0]
    assert len(out.logprobs) == len(out.token_ids) == 8
    ref = hf_ref(torch.tensor([prompt + out.token_ids[:-1]])).logits[0, len(prompt) - 1:].log_softmax(-1)
    for step, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        assert lp.token_id == tok and lp.top[0][0] == tok               # greedy: the best one
        assert abs(lp.logprob - float(ref[step, tok])) < 2e-3, step
        ref_top = torch.topk(ref[step], 5)
        assert [t for t, _ in lp.top[:2]] == ref_top.indices[:2].tolist() or ref_top.values[1] - ref_top.values[2] < 1e-3
        assert all(abs(v - float(ref[step, t])) < 2e-3 for t, v in lp.top)


@torch.inference_mode()
def test_sampled_logprobs_are_raw_by_default_or_processed_as_asked(llm, hf_ref):
    """logprobs_mode, vLLM's: raw (the default, as vLLM's) are of the model's distribution; processed are of
    the row the token is drawn from (after the repetition penalty and the temperature). The same seed draws
    the same tokens either way."""
    from pdcluster.engine import LLM
    prompt = ids_of(llm, PROMPTS[3])
    sp = SamplingParams(max_tokens=6, temperature=0.7, repetition_penalty=1.3, seed=11, logprobs=3)
    raw = llm.generate([prompt], sp)[0]
    with LLM(dtype="float32", quantization="none", kv_cache_memory=64 * 2**20,
             logprobs_mode="processed_logprobs") as other:
        processed = other.generate([prompt], sp)[0]
    assert raw.token_ids == processed.token_ids
    seq = prompt + raw.token_ids
    logits = hf_ref(torch.tensor([seq[:-1]])).logits[0, len(prompt) - 1:]
    penalty = RepetitionPenaltyLogitsProcessor(1.3)
    for step, tok in enumerate(raw.token_ids):
        want_raw = logits[step].log_softmax(-1)
        row = penalty(torch.tensor([seq[:len(prompt) + step]]), logits[step:step + 1].clone())[0]
        want_processed = (row / 0.7).log_softmax(-1)
        for got, want in ((raw.logprobs[step], want_raw), (processed.logprobs[step], want_processed)):
            assert got.token_id == tok and abs(got.logprob - float(want[tok])) < 2e-3, step
            assert all(abs(v - float(want[t])) < 2e-3 for t, v in got.top), step
    assert any(abs(a.logprob - b.logprob) > 0.05 for a, b in zip(raw.logprobs, processed.logprobs))


@torch.inference_mode()
def test_repetition_penalty_greedy_matches_transformers(llm, hf_ref):
    prompt = ids_of(llm, PROMPTS[3])                                    # "1, 2, 3, 4," invites repeats
    ours = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0, repetition_penalty=1.3))[0].token_ids
    ref = hf_ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=16, do_sample=False, repetition_penalty=1.3,
                          pad_token_id=0)[0, len(prompt):].tolist()
    plain = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0))[0].token_ids
    assert ours != plain                                                # the penalty changed the output
    # token for token, every step judged by the penalized reference fed our tokens (near ties aside)
    check_top5(hf_ref, prompt, ours, ref, processor=RepetitionPenaltyLogitsProcessor(1.3))


SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                           "population": {"type": "integer"}},
          "required": ["city", "population"], "additionalProperties": False}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_parses_and_validates(llm, temperature):
    chat = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Give a city and its population as JSON."}],
                                             add_generation_prompt=True, tokenize=False)
    p = SamplingParams(max_tokens=60, temperature=temperature, seed=5,
                       structured=StructuredOutput("json_schema", json.dumps(SCHEMA)))
    out = llm.generate([ids_of(llm, chat)], p)[0]
    assert out.finish_reason == "stop", out.text                        # the grammar ended it with EOS
    doc = json.loads(out.text)
    assert set(doc) == {"city", "population"} and isinstance(doc["city"], str) and len(doc["city"]) <= 20
    assert isinstance(doc["population"], int)


def test_json_object_output_is_one_json_object(llm):
    out = llm.generate(["List three colours."], SamplingParams(max_tokens=60, temperature=0,
                                                             structured=StructuredOutput("json_object")))[0]
    plain = llm.generate(["List three colours."], SamplingParams(max_tokens=60, temperature=0))[0]
    assert isinstance(json.loads(out.text), dict)
    with pytest.raises(ValueError):
        json.loads(plain.text)                                          # unconstrained, it is prose
    arr = llm.generate(["Three numbers as a JSON array: [1, 2, 3]. Again:"], SamplingParams(
        max_tokens=40, temperature=0, structured=StructuredOutput("json_object")))[0]
    assert isinstance(json.loads(arr.text), dict)       # OpenAI's promise; any JSON value gave "[1, 2, 3, 4, ...]"


@pytest.mark.parametrize("spec, field", [
    (StructuredOutput("xml"), "response_format"),
    (StructuredOutput("json_schema", "{not json"), "not valid JSON"),
    (StructuredOutput("json_schema", "[1]"), "JSON object"),
    (StructuredOutput("json_schema", json.dumps({"type": "object", "properties": {"a": {"$ref": "#/nope"}}})),
     "unsupported JSON schema"),
])
def test_a_bad_response_format_is_a_value_error_and_allocates_nothing(llm, spec, field):
    free = llm.engine.figures()["free_blocks"]
    with pytest.raises(ValueError, match=field):
        llm.generate(["hi"], SamplingParams(max_tokens=4, structured=spec))
    assert llm.engine.figures()["free_blocks"] == free and not llm.engine.has_work()


def chat_ids(llm, text):
    return ids_of(llm, llm.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                         add_generation_prompt=True, tokenize=False))


@torch.inference_mode()
def test_min_tokens_holds_eos_back_as_transformers_min_new_tokens(llm, hf_ref):
    prompt = chat_ids(llm, "Say hi.")
    eos = set(llm.engine.cfg.model.eos_token_ids)
    free = llm.generate([prompt], SamplingParams(max_tokens=48, temperature=0))[0]
    assert free.finish_reason == "stop" and len(free.token_ids) < 32, free.text     # it would stop early
    m = len(free.token_ids) + 8
    out = llm.generate([prompt], SamplingParams(max_tokens=48, temperature=0, min_tokens=m))[0]
    assert len(out.token_ids) >= m and not eos & set(out.token_ids[:m]), out.token_ids
    ref = hf_ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=48, min_new_tokens=m, do_sample=False, pad_token_id=0)[0, len(prompt):]
    ref = ref.tolist()
    same = next((j for j, (a, b) in enumerate(zip(out.token_ids, ref)) if a != b), len(out.token_ids))
    assert same >= m, (out.token_ids, ref)                              # token for token past the held EOS


@torch.inference_mode()
def test_logit_bias_greedy_matches_transformers_sequence_bias(llm, hf_ref):
    prompt = ids_of(llm, PROMPTS[0])
    plain = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0].token_ids
    bias = {plain[0]: -100.0, plain[1]: -4.0}                          # ban the first pick, discourage another
    ours = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, logit_bias=bias))[0].token_ids
    assert ours[0] != plain[0] and plain[0] not in ours
    ref = hf_ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=12, do_sample=False, pad_token_id=0,
                          sequence_bias={(t,): b for t, b in bias.items()})[0, len(prompt):].tolist()
    same = next((j for j, (a, b) in enumerate(zip(ours, ref)) if a != b), len(ours))
    assert same >= 10, (ours, ref)
    forced = llm.generate([prompt], SamplingParams(max_tokens=5, temperature=0.8, seed=1, logit_bias={42: 100}))[0]
    assert forced.token_ids == [42] * 5


def test_one_token_prompt_chunks_are_not_replayed_as_decode_steps_while_prompt_logprobs_are_due(llm):
    """A 1-token prompt chunk after the first (long_prefill_token_threshold=1) is a pure-decode row to CUDA graphs,
    whose replay computes no prompt logprobs: a GPU runner returned 2 of a 12-token prompt's, misaligned. Here
    a CPU runner is given graphs that replay the eager forward; the prompt's steps must not go to them."""
    from types import SimpleNamespace

    from pdcluster.engine import LLM
    one = LLM(dtype="float32", quantization="none", kv_cache_memory=32 * 2**20, long_prefill_token_threshold=1,
              speculative="off")
    run, replayed = one.engine.runner, []

    def replay(batch, hook, wait):                  # the graph's forward: the same hidden states, nothing else
        replayed.append([r.request_id for r in batch.reqs])
        ids, pos, meta, _ = run.prepare(batch)
        return run.model.forward(ids, pos, meta, run.k_caches, run.v_caches, hook, wait)
    run.graphs, run._replay = SimpleNamespace(bucket=lambda n: n, width=10**6), replay
    prompt = ids_of(llm, PROMPTS[0])[:12]
    want = llm.generate([prompt], SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=0))[0]
    out = one.generate([prompt], SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=0))[0]
    assert [e and e.token_id for e in out.prompt_logprobs] == [None] + prompt[1:]
    assert all(abs(a.logprob - b.logprob) < 2e-3 for a, b in zip(out.prompt_logprobs[1:], want.prompt_logprobs[1:]))
    assert out.token_ids == want.token_ids and replayed              # decode steps still replay


@torch.inference_mode()
def test_prompt_logprobs_match_transformers_chunked_and_past_a_warm_prefix_cache(llm, hf_ref):
    """Each prompt token's logprob and top-3 from the reference's own forward over the prompt, with the prompt cut
    into 16-token chunks, and with its blocks already in the prefix cache (a hit must not stand in for them)."""
    from pdcluster.engine import LLM
    prompt = ids_of(llm, PROMPTS[-1])                                   # ~50 tokens: 4 chunks
    ref = hf_ref(torch.tensor([prompt])).logits[0].log_softmax(-1)
    small = LLM(dtype="float32", quantization="none", kv_cache_memory=32 * 2**20, max_num_batched_tokens=16)
    for eng in (small, llm):
        eng.generate([prompt], SamplingParams(max_tokens=1, temperature=0))            # the prompt's blocks cached
        out = eng.generate([prompt], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3))[0]
        assert out.num_cached_tokens == 0 and len(out.prompt_logprobs) == len(prompt)
        assert out.prompt_logprobs[0] is None
        for q, lp in enumerate(out.prompt_logprobs[1:], start=1):
            assert lp.token_id == prompt[q] and abs(lp.logprob - float(ref[q - 1, prompt[q]])) < 2e-3, q
            assert len(lp.top) == 3 and all(abs(v - float(ref[q - 1, t])) < 2e-3 for t, v in lp.top)
            assert lp.top[0][0] == int(ref[q - 1].argmax()) or float(ref[q - 1].topk(2).values.diff().abs()) < 1e-3
    assert llm.generate([prompt], SamplingParams(max_tokens=1))[0].num_cached_tokens > 0   # the cache still serves
