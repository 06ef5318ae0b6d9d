"""Offline API behaviour: validation, sampling determinism, stop handling, detokenization."""
import pytest

from pdcluster.engine import SamplingParams


@pytest.mark.parametrize("prompt, params, field", [
    ([], SamplingParams(max_tokens=4), "prompt"),
    ("", SamplingParams(max_tokens=4), "prompt"),
    ([1, 2, 49152], SamplingParams(max_tokens=4), "token id"),
    ([1, 2, -1], SamplingParams(max_tokens=4), "token id"),
    ([1, 2, 3], SamplingParams(max_tokens=9000), "max_tokens"),
])
def test_bad_input_raises_and_allocates_nothing(llm, prompt, params, field):
    free = llm.engine.figures()["free_blocks"]
    with pytest.raises(ValueError, match=field):
        llm.generate([[5, 6, 7], prompt], params)
    assert llm.engine.figures()["free_blocks"] == free and not llm.engine.has_work()
    assert llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, temperature=0))[0].token_ids


@pytest.mark.parametrize("kw, field", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-0.5), "temperature"),
    (dict(top_p=1.5), "top_p"), (dict(top_p=-0.1), "top_p"), (dict(top_k=-2), "top_k"),   # -1: off, as vLLM
    (dict(stop=[""]), "stop"),
])
def test_sampling_params_validation(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw)


def test_seeded_sampling_repeats_and_top_k_1_is_greedy(llm):
    p = ["Tell me a story about a dragon."] * 2
    s = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)    # 16 tokens each
    a, b = llm.generate(p, s), llm.generate(p, s)
    assert a[0].token_ids == b[0].token_ids == a[1].token_ids == b[1].token_ids and len(a[0].token_ids) == 16
    other = llm.generate(p[:1], SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=99, ignore_eos=True))
    assert other[0].token_ids != a[0].token_ids
    g = llm.generate(p[:1], SamplingParams(max_tokens=12, temperature=0))[0].token_ids
    k1 = llm.generate(p[:1], SamplingParams(max_tokens=12, temperature=0.8, top_k=1, seed=5))[0].token_ids
    assert g == k1


def test_stop_string_not_returned(llm):
    base = llm.generate(["1, 2, 3, 4,"], SamplingParams(max_tokens=12, temperature=0))[0]
    assert " 7" in base.text
    out = llm.generate(["1, 2, 3, 4,"], SamplingParams(max_tokens=12, temperature=0, stop=[" 7"]))[0]
    assert out.finish_reason == "stop" and out.text == base.text[:base.text.index(" 7")]
    out2 = llm.generate(["1, 2, 3, 4,"], SamplingParams(max_tokens=12, temperature=0,
                                                        stop_token_ids=[base.token_ids[2]]))[0]
    assert out2.finish_reason == "stop" and out2.token_ids == base.token_ids[:3]
    assert out2.text == llm.tokenizer.decode(base.token_ids[:2])       # the stop token's text is not returned


def test_eos_and_ignore_eos(llm):
    chat = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}], add_generation_prompt=True,
                                             tokenize=False)
    ids = llm.tokenizer.encode(chat, add_special_tokens=False)
    out = llm.generate([ids], SamplingParams(max_tokens=64, temperature=0))[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] in llm.engine.cfg.model.eos_token_ids
    forced = llm.generate([ids], SamplingParams(max_tokens=len(out.token_ids) + 3, temperature=0,
                                                ignore_eos=True))[0]
    assert forced.finish_reason == "length" and len(forced.token_ids) == len(out.token_ids) + 3


def test_warmup_measures_a_prefill_and_leaves_the_pool_as_it_was(llm):
    """Workers warm up before serving (engine.warmup): the step counters gain a prefill and a decode
    sample (the router's first rate estimates); the pool keeps no block, cache entry or event of it."""
    e = llm.engine
    PARIS = "Paris is the capital and largest city of France, on the Seine. " * 3   # 2+ full blocks
    want = llm.generate([PARIS], SamplingParams(max_tokens=6, temperature=0))[0].token_ids
    log = e.block_events()
    log.drain()

    def pool_state():
        f = e.figures()
        return f["free_blocks"], set(e.block_snapshot()[1]), f["prefix_queries"], f["prefix_hits"]
    before = pool_state()
    assert before[1]                                    # PARIS' blocks are cached
    stats = e.stats.as_dict()
    assert e.warmup(num_tokens=200) > 0
    assert pool_state() == before and log.drain()[1] == []
    s = e.stats.as_dict()
    assert s["prefill_tokens"] - stats["prefill_tokens"] == 200 and s["prefill_s"] > stats["prefill_s"]
    assert s["decode_steps"] - stats["decode_steps"] == 1
    got = llm.generate([PARIS], SamplingParams(max_tokens=6, temperature=0))[0].token_ids
    assert got == want                               # and the cached prompt still hits
    assert e.figures()["prefix_hits"] > before[3]

