"""Greedy output of the engine vs transformers (float32, embedded model), under every scheduler path."""
import pytest

from pdcluster.engine import LLM, SamplingParams

from tests.e2e.conftest import PROMPTS, check_top5, hf_greedy

N = 20
GREEDY = SamplingParams(max_tokens=N, temperature=0.0)


@pytest.fixture(scope="module")
def refs(llm, hf_ref):
    tok = llm.tokenizer
    ids = [tok.encode(p, add_special_tokens=False) for p in PROMPTS]
    return ids, [hf_greedy(hf_ref, p, N) for p in ids]


def assert_all_match(hf_ref, ids, outs, refs):
    for p, o, r in zip(ids, outs, refs):
        check_top5(hf_ref, p, o.token_ids, r)


def test_batch_of_16_matches_reference(llm, hf_ref, refs):
    ids, ref = refs
    outs = llm.generate(ids, GREEDY)
    exact = sum(o.token_ids == r for o, r in zip(outs, ref))
    assert exact >= 14, f"only {exact}/16 token-exact"
    assert_all_match(hf_ref, ids, outs, ref)
    assert all(o.finish_reason in ("stop", "length") for o in outs)
    # strings too: the text is the detokenized tokens
    assert outs[0].text == llm.tokenizer.decode(outs[0].token_ids, skip_special_tokens=True)


def test_prefix_cache_hits_give_same_tokens(llm, hf_ref, refs):
    ids, ref = refs
    long_ids = [p * 8 for p in ids[:4]]                  # >= 2 full blocks each
    first = llm.generate(long_ids, GREEDY)
    for p, o in zip(long_ids, first):
        check_top5(hf_ref, p, o.token_ids, hf_greedy(hf_ref, p, N))
    again = llm.generate(long_ids, GREEDY)
    bs = llm.engine.cfg.cache.block_size
    # every full block but the one holding the last prompt token (computed again, for its logits)
    assert [o.num_cached_tokens for o in again] == [(len(p) - 1) // bs * bs for p in long_ids]
    assert [o.token_ids for o in again] == [o.token_ids for o in first]


def test_chunked_prefill_of_long_prompt(hf_ref):
    from pdcluster.engine.loader import load_model_config  # noqa: F401  (same model as the fixture)
    small = LLM(kv_cache_memory=64 * 2**20, max_num_batched_tokens=48, enable_prefix_caching=False)
    prompt = small.tokenizer.encode(" ".join(PROMPTS), add_special_tokens=False)
    assert len(prompt) > 3 * 48
    out = small.generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0]
    check_top5(hf_ref, prompt, out.token_ids, hf_greedy(hf_ref, prompt, 12))


@pytest.fixture(scope="module")
def tiny():
    """10 KV blocks (160 tokens): 8 prompts of up to ~50 tokens + 20 tokens each, or 4 of 20 + 30,
    cannot all stay resident; one load for the two preemption tests (each leaves the pool empty)."""
    return LLM(num_blocks=10, max_num_batched_tokens=256, enable_prefix_caching=False)


def test_forced_preemption_tiny_pool(hf_ref, refs, tiny):
    ids, ref = refs
    outs = tiny.generate(ids[:8], GREEDY)
    assert tiny.engine.figures()["free_blocks"] == 10 and not tiny.engine.has_work()
    assert_all_match(hf_ref, ids[:8], outs, ref[:8])


def test_preemption_actually_happened(tiny):
    assert tiny.engine.figures()["free_blocks"] == 10 and not tiny.engine.has_work()
    # 4 requests needing 4 blocks each (20 prompt + 30 output tokens) in 10 blocks
    reqs = [tiny.engine.add_request(list(range(100 + 20 * i, 120 + 20 * i)),
                                    SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)) for i in range(4)]
    while tiny.engine.has_work():
        tiny.engine.step()
    assert sum(r.num_preemptions for r in reqs) > 0
    assert all(r.num_output_tokens == 30 for r in reqs)
