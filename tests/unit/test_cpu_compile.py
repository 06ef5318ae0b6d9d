"""engine/cpu_compile.py on the real embedded model: the compiled decode layer gives the eager step's tokens,
only pure-decode steps take it, and anything it does not support (or a failed compile) stays eager.
The first run per machine / torch / thread count compiles the layer (~30-60 s); later runs load it."""
import logging

import pytest
import torch

from pdcluster.engine import LLM, SamplingParams
from pdcluster.engine.attention import AttnMeta, PrefillSeq
from pdcluster.engine.cpu_compile import MAX_ROWS, CompiledDecode

PROMPTS = ["The capital of France is", "def fibonacci(n):\n", "Once upon a time, in a small village,",
           "Photosynthesis is the process by which plants " * 4]
GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    """The embedded GGUF's Q4_1 linears served packed (pdcluster's q4x8 kernel where it builds, else torch's
    int4pack one), decode steps compiled. No prefix cache: a repeated prompt would then compute its last token as
    a decode row over the cached prefix, not in the prefill, and one prompt here has a near-tie there (logits
    15.9366 / 15.9358), so the two runs' first tokens could differ for that reason alone."""
    from pdcluster.engine.quant import q4x8
    from pdcluster.engine.quant.cpu_linear import Int4Linear
    llm = LLM(quantization="int4", cpu_compile=True, speculative="off", kv_cache_memory=32 * 2**20,
              max_num_seqs=8, enable_prefix_caching=False)
    assert isinstance(llm.engine.model.compiled, CompiledDecode)
    kind = q4x8.Q4x8Linear if q4x8.available() else Int4Linear
    assert all(isinstance(lin, kind) for L in llm.engine.model.layers for lin in (L.qkv, L.o, L.gate_up, L.down))
    return llm


def _generate(llm, compiled, batched: bool):
    m = llm.engine.model
    comp, m.compiled = m.compiled, (m.compiled if compiled else None)
    try:
        if batched:
            return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
        return [llm.generate([p], GREEDY)[0].token_ids for p in PROMPTS]
    finally:
        m.compiled = comp


@pytest.mark.parametrize("batched", [False, True], ids=["one-at-a-time", "batched"])
def test_compiled_decode_gives_the_eager_tokens(llm, batched):
    comp = llm.engine.model.compiled
    before = comp.steps
    got = _generate(llm, True, batched)
    steps = comp.steps - before
    want = _generate(llm, False, batched)
    assert comp.steps - before == steps                      # the eager run took no compiled step
    assert steps >= GREEDY.max_tokens - 1                    # every decode step after the prefill was compiled
    assert got == want


def test_only_pure_decode_steps_take_it(llm):
    comp = llm.engine.model.compiled
    before = comp.steps
    llm.generate(PROMPTS, SamplingParams(max_tokens=1, temperature=0.0))   # prefill steps only
    assert comp.steps == before
    one = torch.zeros(1, dtype=torch.int64)
    tables, mask = torch.zeros(1, 2, dtype=torch.int64), torch.ones(1, 1, 1, 32, dtype=torch.bool)
    decode = AttnMeta(one, [], 0, tables, one + 1, mask)
    mixed = AttnMeta(torch.zeros(3, dtype=torch.int64), [PrefillSeq(0, 2, 2, tables[0])], 2, tables, one + 1, mask)
    assert comp.covers(1, decode) and comp.covers(MAX_ROWS - 1, decode)
    assert not comp.covers(MAX_ROWS, decode)                 # the packed linears' dense path: eager
    assert not comp.covers(3, mixed)                         # a prefill chunk in the step: eager


def test_speculative_steps_and_layer_hooks():
    """A verify step (the last token + k drafts) is k + 1 decode rows, each attending up to its own position, so it
    takes the compiled layer like any decode step (the same tokens as all-eager); the connector's layer hooks still
    run after every layer of every step."""
    llm = LLM(quantization="int4", cpu_compile=True, speculative="ngram", kv_cache_memory=16 * 2**20)
    m = llm.engine.model
    prompt, sp = ["1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3, 4, 5,"], SamplingParams(max_tokens=24, temperature=0.0)
    seen, metas, real = [], [], m.forward

    def forward(ids, pos, meta, kc, vc, layer_hook=None, layer_wait=None):
        metas.append((pos.tolist(), meta))
        return real(ids, pos, meta, kc, vc, seen.append, layer_wait)
    m.forward = forward
    try:
        got = llm.generate(prompt, sp)[0].token_ids
    finally:
        del m.forward
    assert len(seen) == 30 * len(metas) and seen[:60] == list(range(30)) * 2
    verify = [(p, mt) for p, mt in metas[1:] if len(p) > 1]
    assert verify and llm.engine.spec.stats.accepted > 0                   # drafts were verified, and some kept
    for p, mt in verify:                    # rows at consecutive positions, each seeing the KV up to its own
        assert not mt.prefills and p == list(range(p[0], p[0] + len(p)))
        assert mt.decode_seq_lens.tolist() == [x + 1 for x in p] and mt.decode_block_tables.shape[0] == len(p)
    assert m.compiled.steps == len(metas) - 1                             # every step but the prompt's, compiled
    comp, m.compiled = m.compiled, None
    assert llm.generate(prompt, sp)[0].token_ids == got


def test_which_layer_takes_which_rows_with_int8_copies():
    """With int8 copies from `split` rows (cpu_int8_rows): the narrow layer below split, the wide one from split
    to WIDE_MAX_ROWS - 1; without a wide layer those rows stay eager (they must not run the packed kernel
    compiled while eager runs the copies). Bookkeeping only: no package is run."""
    from pdcluster.engine.cpu_compile import WIDE_MAX_ROWS, _Package
    one = torch.zeros(1, dtype=torch.int64)
    tables, mask = torch.zeros(1, 2, dtype=torch.int64), torch.ones(1, 1, 1, 32, dtype=torch.bool)
    decode = AttnMeta(one, [], 0, tables, one + 1, mask)
    mixed = AttnMeta(torch.zeros(3, dtype=torch.int64), [PrefillSeq(0, 2, 2, tables[0])], 2, tables, one + 1, mask)
    narrow, wide = _Package(1, MAX_ROWS, None, [], True), _Package(10, WIDE_MAX_ROWS, None, [], True)
    both = CompiledDecode(narrow, wide, 16, split=10)
    assert [n for n in (1, 9, 10, 63, 64, 511, 512) if both.covers(n, decode)] == [1, 9, 10, 63, 64, 511]
    assert not both.covers(12, mixed) and both.wide.hi == WIDE_MAX_ROWS
    no_wide = CompiledDecode(narrow, None, 16, split=10)                  # the wide layer failed to build
    assert [n for n in (1, 9, 10, 63) if no_wide.covers(n, decode)] == [1, 9]
    plain = CompiledDecode(narrow, None, 16)                              # no int8 copies
    assert [n for n in (1, 63, 64) if plain.covers(n, decode)] == [1, 63] and plain.narrow is narrow and plain.wide is None


def test_unsupported_setups_stay_eager():
    q = LLM(quantization="int4", cpu_compile=True, kv_cache_dtype="int8", kv_cache_memory=8 * 2**20)
    assert q.engine.model.compiled is None                   # a quantized KV cache: eager attention
    off = LLM(quantization="int4", kv_cache_memory=8 * 2**20)
    assert off.engine.model.compiled is None                 # off unless asked


def test_a_failed_compile_leaves_the_engine_eager(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("PDCLUSTER_AOTI_CACHE", str(blocker / "aoti"))      # under a file: cannot be created
    with caplog.at_level(logging.WARNING, logger="pdcluster.engine.cpu_compile"):
        llm = LLM(quantization="int4", cpu_compile=True, kv_cache_memory=8 * 2**20, speculative="off")
    assert llm.engine.model.compiled is None
    assert any("stay eager" in r.getMessage() for r in caplog.records)
    assert len(llm.generate(["Hello"], SamplingParams(max_tokens=3, temperature=0.0))[0].token_ids) == 3


def test_the_float32_model_compiled_on_its_packed_linears_gives_the_eager_tokens():
    """The default float32 model on the embedded Q4_1 GGUF: its linears hold pdcluster::q4f32_mm's codes (where the
    op builds; kernels/q4f32_mm.py), which the compiled layer calls too."""
    from pdcluster.engine.cpu_compile import linear_spec
    from pdcluster.kernels.f32_mm import available
    from pdcluster.kernels.q4f32_mm import Q4F32Weight
    llm = LLM(quantization="none", cpu_compile=True, speculative="off", kv_cache_memory=16 * 2**20, max_num_seqs=4,
              enable_prefix_caching=False)
    assert isinstance(llm.engine.model.compiled, CompiledDecode)
    lins = [lin for L in llm.engine.model.layers for lin in (L.qkv, L.o, L.gate_up, L.down)]
    assert all(isinstance(lin.packed, Q4F32Weight) == available() for lin in lins)
    if available():
        assert {linear_spec(lin)[0].kind for lin in lins} == {"q4f32"}
    comp = llm.engine.model.compiled
    before = comp.steps
    got = _generate(llm, True, True)
    assert comp.steps - before >= GREEDY.max_tokens - 1
    assert got == _generate(llm, False, True)
