"""Speculative decoding on the real model: greedy output with n-gram drafts is token for token the
output without them (and within the top-5 rule of transformers), on a copy-heavy prompt where the
drafts are actually accepted."""
from pdcluster.engine import SamplingParams

from tests.e2e.conftest import check_top5, hf_greedy

PASSAGE = ("The Amazon rainforest covers much of the Amazon basin of South America. This basin encompasses "
           "seven million square kilometres, of which five and a half million are covered by the rainforest.")


def test_greedy_with_drafts_equals_without_and_the_reference(llm, hf_ref):
    tok, eng = llm.tokenizer, llm.engine
    copy = tok.encode(tok.apply_chat_template([{"role": "user", "content": f"Repeat this passage exactly:\n\n{PASSAGE}"}],
                                              add_generation_prompt=True, tokenize=False), add_special_tokens=False)
    other = tok.encode("The capital of France is", add_special_tokens=False)
    params = SamplingParams(max_tokens=16, temperature=0)
    assert eng.spec is not None, "speculation is on by default"
    before = (eng.spec.stats.proposed, eng.spec.stats.accepted)
    on = llm.generate([copy, other], params)                   # one drafting request beside a plain one
    proposed, accepted = eng.spec.stats.proposed - before[0], eng.spec.stats.accepted - before[1]
    assert accepted >= 8 and accepted / proposed > 0.5, (proposed, accepted)   # not vacuous
    spec, eng.scheduler.spec = eng.scheduler.spec, None       # the same engine without drafts
    try:
        off = llm.generate([copy, other], params)
    finally:
        eng.scheduler.spec = spec
    assert [o.token_ids for o in on] == [o.token_ids for o in off]
    assert [o.text for o in on] == [o.text for o in off] and on[0].finish_reason == off[0].finish_reason
    check_top5(hf_ref, copy, on[0].token_ids, hf_greedy(hf_ref, copy, 16))
    assert eng.kv.num_free_blocks == eng.kv.num_blocks and not eng.has_work()   # nothing leaked
