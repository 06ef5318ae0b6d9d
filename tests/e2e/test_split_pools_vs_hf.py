"""The design card's split on one CPU host, on the real model against transformers (the top-5 rule):
a prefill pool in bfloat16 with dequantized weights (bench/peers.py's `disagg-split` side) computes
each prompt's KV; a decode pool on the GGUF's packed int4 weights in float32 takes those bfloat16
blocks, cast as they land (the KV receiver casts to the landing cache's dtype), and decodes from them.
Both engines' tokens must stay in transformers' top-5, and the decode engine must have computed only
the prompt's tail, so its tokens really come from the bfloat16 KV."""
import pytest
import torch

from pdcluster.engine.llm_engine import LLMEngine, build_config

from tests.e2e.conftest import PROMPTS, check_top5, hf_greedy
from tests.e2e.test_kv_connector_engine import PROMPT, Capture, Peer, run

N = 16
LONG = (PROMPT, PROMPTS[15], "\n".join(PROMPTS[:8]))    # 2-3 full 16-token blocks each, and a tail


def _run(engine, ids, rid, salt=None):
    return run(engine, ids, rid, salt, max_tokens=N)


@pytest.fixture(scope="module")
def pools():
    prefill = LLMEngine(build_config(dtype="bfloat16", quantization="none", kv_cache_memory=32 * 2**20),
                        connector=Capture())
    # Q4_1 kept packed; no n-gram drafts, so that the tokens it computes are exactly the prompt's tail and the
    # outputs (verified drafts would count too, as many as the output happens to repeat)
    decode = LLMEngine(build_config(quantization=None, kv_cache_memory=32 * 2**20, speculative="off"))
    return prefill, decode


def test_bf16_prefill_pool_and_int4_decode_pool_within_top5(pools, hf_ref):
    prefill, decode = pools
    assert prefill.runner.k_caches[0].dtype == torch.bfloat16 and decode.runner.k_caches[0].dtype == torch.float32
    assert sum(decode.model.weight_bytes().values()) < 150 * 2**20          # packed (the int8 head thrice), no float copy
    bs = decode.cfg.cache.block_size
    for i, text in enumerate(LONG):
        ids = prefill.tokenizer.encode(text, add_special_tokens=False)
        ref = hf_greedy(hf_ref, ids, N)
        ours = _run(prefill, ids, f"p{i}")
        check_top5(hf_ref, ids, ours.output_token_ids, ref)                # bfloat16 throughout
        blocks = (len(ids) - 1) // bs
        assert blocks >= 2
        decode.connector = peer = Peer(prefill.connector, blocks, bs, rid=f"p{i}")
        before = decode.stats.tokens
        out = _run(decode, ids, f"d{i}")
        assert peer.loaded == {f"d{i}": blocks * bs}
        assert decode.stats.tokens - before == len(ids) - blocks * bs + len(out.output_token_ids) - 1
        same = check_top5(hf_ref, ids, out.output_token_ids, ref)
        print(f"prompt {i}: {len(ids)} tokens, {blocks} bfloat16 blocks loaded, {same} of {N} leading tokens "
              f"equal transformers' greedy")


def test_control_garbage_kv_from_the_prefill_pool_fails_the_check(pools, hf_ref):
    """The check above can fail: corrupt the bfloat16 blocks and the decode pool's tokens leave the top-5."""
    prefill, decode = pools
    ids = prefill.tokenizer.encode(PROMPT, add_special_tokens=False)
    bs = decode.cfg.cache.block_size
    _run(prefill, ids, "g")
    g = torch.Generator().manual_seed(0)
    prefill.connector.kv["g-bad"] = tuple([torch.randn(t.shape, generator=g).to(t.dtype) * 4 for t in ts]
                                          for ts in prefill.connector.kv["g"])
    decode.connector = peer = Peer(prefill.connector, (len(ids) - 1) // bs, bs, rid="g-bad")
    out = _run(decode, ids, "d-bad", salt="fresh")     # salted: no local prefix hit from the test above
    assert peer.loaded == {"d-bad": (len(ids) - 1) // bs * bs}
    with pytest.raises(AssertionError, match="outside the rule"):
        check_top5(hf_ref, ids, out.output_token_ids, hf_greedy(hf_ref, ids, N))
