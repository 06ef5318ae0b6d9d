"""Packed weights against transformers (the top-5 rule, tests/e2e/conftest.check_top5): the embedded
GGUF's own Q4_1 weights served packed, against transformers running the same weights dequantized; and
int8 / int4 quantized at load from a Hugging Face safetensors copy, against transformers' float model."""
import json

import pytest

from pdcluster.engine import LLM, SamplingParams

from tests.e2e.conftest import PROMPTS, check_top5, hf_greedy

N = 16
GREEDY = SamplingParams(max_tokens=N, temperature=0.0)
IDX = (0, 1, 9, 15)     # prose, code, Q&A, a ~50-token prompt; prefilled together (> 64 rows: the dense path),
                        # then decoded 4 at a time (the kernels)


@pytest.fixture(scope="module")
def refs(hf_ref):
    from pdcluster.engine.loader import load_model_config
    from pdcluster.engine.tokenizer import load_tokenizer
    tok = load_tokenizer(load_model_config(None))
    ids = [tok.encode(PROMPTS[i], add_special_tokens=False) for i in IDX]
    return ids, [hf_greedy(hf_ref, p, N) for p in ids]


@pytest.fixture(scope="module")
def hf_folder(hf_ref, tmp_path_factory):
    """A Hugging Face safetensors copy of exactly the reference's float weights (tied head left out)."""
    from safetensors.torch import save_file

    from pdcluster.engine.loader import load_model_config
    from pdcluster.engine.tokenizer import load_tokenizer
    d = tmp_path_factory.mktemp("smollm2-hf")
    sd = {k: v.contiguous() for k, v in hf_ref.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, str(d / "model.safetensors"))
    c = hf_ref.config
    (d / "config.json").write_text(json.dumps(dict(
        model_type="llama", hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, vocab_size=c.vocab_size, rms_norm_eps=c.rms_norm_eps,
        rope_theta=load_model_config(None).rope_theta, max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)))
    load_tokenizer(load_model_config(None)).save_pretrained(str(d))
    return str(d)


def _check(llm, hf_ref, refs, max_weight_mib):
    ids, ref = refs
    m = llm.engine.model.weight_bytes()
    assert sum(m.values()) / 2**20 < max_weight_mib, m          # packed, no float copy of the linears
    outs = llm.generate(ids, GREEDY)
    same = [check_top5(hf_ref, p, o.token_ids, r) for p, o, r in zip(ids, outs, ref)]
    print(f"leading tokens equal to transformers' greedy: {same} of {N}")
    return same


def test_gguf_int4_served_packed(hf_ref, refs):
    """Eager; the compiled layer gives these tokens exactly (tests/unit/test_cpu_compile.py), and its wide
    layer is checked against transformers below."""
    llm = LLM(kv_cache_memory=32 * 2**20, quantization=None)   # None: Q4_1 stays packed
    assert llm.engine.cfg.quantization is None
    # float32: 513 MiB. The int8 head is held three times where fbgemm runs it
    # (the embedding's codes for row lookups, fbgemm's packed copy for 1 row, AMX tiles or oneDNN's copy for more;
    # 27 MiB each)
    _check(llm, hf_ref, refs, max_weight_mib=150)


@pytest.mark.parametrize("mode,mib", [("int8", 300), ("int4", 150)])   # float32: 513 MiB; int8: fbgemm copy + codes
def test_hf_model_quantized_at_load(hf_ref, refs, hf_folder, mode, mib):
    _check(LLM(hf_folder, quantization=mode, kv_cache_memory=32 * 2**20), hf_ref, refs, max_weight_mib=mib)


def test_gguf_int4_with_int8_copies_for_wide_steps(hf_ref, refs, monkeypatch):
    """cpu_int8_rows=2 (engine/quant/int8_rows.py): the prefill (> 64 rows, on oneDNN's prepacked form where
    exact) and the 4-row decode batches run the int8 copies, the decode batches through the compiled layer's
    wide package; single rows keep the packed kernel. Greedy stays inside transformers' top-5. (On an AVX2 host
    the engine would keep q4x8 instead, faster there: the copies are forced, to check their arithmetic.)"""
    from pdcluster.engine.cpu_compile import MAX_ROWS, WIDE_MAX_ROWS
    from pdcluster.engine.quant import int8_rows
    from pdcluster.engine.quant.int8_rows import Int8Rows
    monkeypatch.setattr(int8_rows, "copy_pays", lambda lin: True)
    llm = LLM(kv_cache_memory=32 * 2**20, quantization=None, cpu_compile=True, cpu_int8_rows=2, speculative="off")
    m = llm.engine.model
    assert all(isinstance(lin, Int8Rows) for L in m.layers for lin in (L.qkv, L.o, L.gate_up, L.down))
    comp = m.compiled
    assert [(p.lo, p.hi) for p in (comp.narrow, comp.wide)] == [(1, MAX_ROWS), (2, WIDE_MAX_ROWS)] and comp.split == 2
    wide = comp.wide
    calls = []
    run = wide.run
    object.__setattr__(wide, "run", lambda args: calls.append(args[0].shape[0]) or run(args))
    _check(llm, hf_ref, refs, max_weight_mib=360)         # + the int8 copies (~101 MiB; plain or as AMX tiles), twice where oneDNN's is held
    assert len(calls) >= 30 * (N - 1) and set(calls) == {len(IDX)}   # every decode step, all 30 layers, wide
