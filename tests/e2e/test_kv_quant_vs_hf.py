"""An int8 KV cache (engine/kv_quant.py) against transformers' float model: greedy within the top-5
rule (tests/e2e/conftest.check_top5), through chunked prefill and prefix-cache hits that read
quantized blocks back; a control shows the same check fails when the quantization is garbage."""
import pytest

from pdcluster.engine import LLM, SamplingParams

from tests.e2e.conftest import PROMPTS, check_top5, hf_greedy

N = 12
GREEDY = SamplingParams(max_tokens=N, temperature=0.0)
IDX = (0, 1, 9, 15)             # prose, code, Q&A, a ~50-token prompt (2 chunks of 32, 3 full blocks)


@pytest.fixture(scope="module")
def int8_llm():
    return LLM(dtype="float32", quantization="none", kv_cache_dtype="int8", kv_cache_memory=8 * 2**20,
               max_num_batched_tokens=32)


@pytest.fixture(scope="module")
def refs(int8_llm, hf_ref):
    tok = int8_llm.tokenizer
    ids = [tok.encode(PROMPTS[i], add_special_tokens=False) for i in IDX]
    return ids, [hf_greedy(hf_ref, p, N) for p in ids]


def test_int8_kv_cache_matches_reference(int8_llm, hf_ref, refs):
    ids, ref = refs
    e = int8_llm.engine
    assert e.runner.k_caches[0].data.dtype.itemsize == 1
    # ~4x the float32 cache's blocks in the same budget (scales: 12 bytes per 3 KiB block and layer)
    per_block_f32 = e.cfg.model.kv_bytes_per_block("auto", 4, e.cfg.cache.block_size)
    assert e.kv.num_blocks > 3.9 * (8 * 2**20 // per_block_f32)
    outs = int8_llm.generate(ids, GREEDY)
    same = [check_top5(hf_ref, p, o.token_ids, r) for p, o, r in zip(ids, outs, ref)]
    print(f"int8 KV: leading tokens equal to transformers' greedy: {same} of {N}")
    assert sum(s == N for s in same) >= len(ids) - 1
    again = int8_llm.generate(ids[-1:], GREEDY)[0]       # prefix hits: prefill over cached int8 blocks
    assert again.num_cached_tokens >= 48
    if again.token_ids != outs[-1].token_ids:
        check_top5(hf_ref, ids[-1], again.token_ids, ref[-1])


def test_control_garbage_quantization_fails_the_check(int8_llm, hf_ref, refs, monkeypatch):
    """The same engine with a 3-level quantizer (QMAX 1: codes -1/0/1) must fail the rule on the
    short prompts (no cached blocks to hit): the check above can tell a broken KV cache apart."""
    from pdcluster.kernels.store_kv import QMAX
    ids, ref = refs
    monkeypatch.setitem(QMAX, "int8", 1.0)
    outs = int8_llm.generate(ids[:2], GREEDY)
    failures = 0
    for p, o, r in zip(ids, outs, ref):
        try:
            check_top5(hf_ref, p, o.token_ids, r)
        except AssertionError:
            failures += 1
    assert failures == 2, f"garbage KV passed the rule for {2 - failures} prompts"


def test_int8_kv_cache_through_the_host_and_disk_tiers_comes_back_as_it_was(int8_llm, tmp_path):
    """The int8 cache's own codes and scales go below (a quarter of float32's bytes) and load back bit for
    bit: a prompt reloaded from the host tier, then from disk after a restart of the tiers (both layer by
    layer in its step), decodes exactly as it does from its device-pool hit, and the engine computes only the tail."""
    from pdcluster.kv_transfer.tiers import TierConfig
    from tests.e2e.test_kv_tiers_engine import evict_all, run, use
    e = int8_llm.engine
    e.kv.pool.reset_prefix_cache()
    ids = e.tokenizer.encode(PROMPTS[15] + " " + PROMPTS[0], add_special_tokens=False)
    n_blocks = (len(ids) - 1) // e.cfg.cache.block_size
    bb = e.kv_block_bytes()
    tiers = use(e, TierConfig(host_bytes=64 * bb, disk_dir=str(tmp_path), disk_bytes=64 * (bb + 256)))
    try:
        assert tiers.geom.native and tiers.figures()[0]["block_bytes"] <= bb   # codes + scales, not floats
        run(e, ids, "q-tiers-first")
        dev = run(e, ids, "q-tiers-device")                 # the device pool's hit: the int8 blocks as they are
        assert dev.num_cached_tokens == n_blocks * e.cfg.cache.block_size
        for rid, tier in (("q-tiers-host", "host"), ("q-tiers-disk", "disk")):
            evict_all(e, tiers)
            if tier == "disk":
                tiers.close()
                tiers = use(e, TierConfig(disk_dir=str(tmp_path), disk_bytes=64 * (bb + 256)))   # restart: disk only
            before = e.stats.prefill_tokens
            out = run(e, ids, rid)
            assert {f["tier"]: f for f in tiers.figures()}[tier]["hits"] == n_blocks
            assert e.stats.prefill_tokens - before == len(ids) - n_blocks * e.cfg.cache.block_size   # the tail only
            assert out.output_token_ids == dev.output_token_ids
            assert out.first_step == 1                      # loaded in the step that computed the tail
    finally:
        tiers.close()
        from pdcluster.engine.kv_connector import KVConnector
        e.connector = KVConnector()


def test_a_peer_pull_reads_an_int8_pools_blocks_dequantized(int8_llm):
    """The holder's half of a peer pull (engine/peer_read.py) on an int8 pool: float blocks equal to the
    cache's codes times their scales (it raised on a quantized pool before)."""
    import torch

    from pdcluster.engine.hashing import block_hashes
    from pdcluster.engine.peer_read import read_blocks
    e = int8_llm.engine
    ids = e.tokenizer.encode(PROMPTS[15], add_special_tokens=False)
    int8_llm.generate([ids], SamplingParams(max_tokens=1, temperature=0.0))
    hashes = block_hashes(ids, e.cfg.cache.block_size, None)[:2]
    got = read_blocks(e, hashes)
    assert got is not None and got.num_blocks == 2 and got.k[0].dtype == torch.float32
    kc = e.kv_caches()[0][3]
    bid = torch.tensor([e.kv.pool.lookup(h).block_id for h in hashes])
    assert torch.equal(got.k[3], kc.data[bid].float() * kc.scale[bid][:, None, :, None])
    assert got.k[3].abs().max() > 0


def test_int8_tokens_do_not_depend_on_the_prefix_cache_or_on_drafting():
    """Review repros: over an int8 cache a prompt's first chunk attended to its own unquantized rows, later reads to
    the dequantized ones, so the same greedy request gave other tokens from step 24 on once its prefix was cached;
    and a rejected draft's row raised its block's scale (a scale only grows), so drafting changed greedy output.
    The chunk reads the cache back now, and a quantized cache never drafts."""
    p = "Once upon a time, there was a little girl named Lily. Lily loved to play. Once upon a time,"
    q = "Photosynthesis is the process by which green plants use sunlight to make food. " * 3
    sp = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    llm = LLM(dtype="float32", quantization="none", kv_cache_dtype="int8", kv_cache_memory=8 * 2**20,
              speculative="ngram")
    assert llm.engine.spec is None                           # asked for, and off over a quantized cache
    cold = llm.generate([p], sp)[0]
    warm = llm.generate([p], sp)[0]
    batched = llm.generate([q, p], sp)[1]
    assert warm.num_cached_tokens >= 16 and warm.token_ids == cold.token_ids
    assert batched.token_ids == cold.token_ids
    assert LLM(kv_cache_memory=8 * 2**20, speculative="ngram").engine.spec is not None   # float: drafts as before
