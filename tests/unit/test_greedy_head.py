"""kernels/greedy_head: the int8 screen keeps the float32 argmax, and the kernel answers it (greedy_head.py)."""
import pytest
import torch

from pdcluster.engine import cpu_ext
from pdcluster.kernels.greedy_head import (CHUNK_ROWS, GreedyHead, candidates_ref, gamma, greedy_head_cpu,
                                           greedy_head_ref, quantize_head)

needs_ext = pytest.mark.skipif(not cpu_ext.has("greedy_head"), reason="pdcluster's CPU ops are not built on this host")


def head(v=3000, e=64, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(v, e, generator=g) * std


def hidden(n, e, seed=1, std=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, e, generator=g) * std


def tolerance(h, w):
    """How far apart two float32 scores may be and still come out in either order: twice each score's bound."""
    return 2 * gamma(w.shape[1] + 2) * h.abs().sum(1) * w.abs().amax()


def check_is_argmax(tok, h, w):
    """tok's exact (float64) score is the row's best to within float32 rounding."""
    exact = h.double() @ w.double().T
    best = exact.max(1).values
    got = exact.gather(1, tok[:, None].long()).squeeze(1)
    assert bool((got >= best - tolerance(h, w).double()).all()), (got - best)


@pytest.mark.parametrize("v", [3000, CHUNK_ROWS + 5])
def test_quantize_head_bounds_every_weight_by_its_row_slack(v):
    w = head(v=v)
    q, scale, slack = quantize_head(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    err = (w.double() - q.double() * scale.double()[:, None]).abs().amax(1)
    assert bool((err <= slack.double()).all())
    assert bool((slack > 0).all())


@pytest.mark.parametrize("bad,msg", [(torch.zeros(4, 16, dtype=torch.float64), "float32"),
                                     (torch.zeros(16), "float32"),
                                     (torch.tensor([[1.0, float("nan")] * 8]), "non-finite")])
def test_quantize_head_refuses_what_it_cannot_bound(bad, msg):
    with pytest.raises(ValueError, match=msg):
        quantize_head(bad)


def test_a_non_finite_weight_past_the_first_chunk_is_refused():
    w = head(v=CHUNK_ROWS + 5, e=16)
    w[CHUNK_ROWS + 2, 3] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        quantize_head(w)


def test_a_zero_row_gets_scale_one_and_zero_codes_not_a_division_by_zero():
    w = head(v=64, e=32)
    w[5] = 0
    q, scale, slack = quantize_head(w)
    assert float(scale[5]) == 1.0 and int(q[5].abs().max()) == 0


@pytest.mark.parametrize("seed", range(5))
def test_the_candidates_hold_the_float32_argmax_even_at_near_ties(seed):
    w = head(seed=seed)
    h = hidden(16, w.shape[1], seed=seed + 10)
    # near ties: rows 1..7 copies of row 0 nudged by a few float32 ulps, and h rows that favour row 0
    w[1:8] = w[0] * (1 + torch.arange(1, 8)[:, None] * 2.0 ** -22)
    h[:4] = w[0] * 40
    q, scale, slack = quantize_head(w)
    keep = candidates_ref(h, q, scale, slack)
    f32 = (h @ w.T).max(1).indices
    assert bool(keep.gather(1, f32[:, None]).all())
    assert int(keep.sum(1).max()) < w.shape[0] // 10        # a screen, not a full pass


def test_the_reference_answers_the_argmax():
    w = head()
    h = hidden(8, w.shape[1])
    check_is_argmax(greedy_head_ref(h, *quantize_head(w), w), h, w)


@needs_ext
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("v", [1, 3, 4, 257, 4096 + 5])
def test_the_kernel_answers_the_float32_argmax(n, v):
    w = head(v=v, e=64, seed=v)
    h = hidden(n, 64, seed=n)
    screen = GreedyHead(w)
    tok = screen.tokens(h)
    assert tok.dtype == torch.int64 and tok.shape == (n,)
    check_is_argmax(tok, h, w)
    # apart from float32 near-ties the reference answers the same: here the scores are far apart
    exact = torch.sort(h.double() @ w.double().T, dim=1, descending=True).values
    clear = (exact[:, 0] - exact[:, 1] > tolerance(h, w).double()) if v > 1 else torch.ones(n, dtype=torch.bool)
    ref = greedy_head_ref(h, screen.q, screen.scale, screen.slack, w)
    assert torch.equal(tok[clear], ref[clear])


@needs_ext
def test_the_kernel_picks_the_first_of_equal_scores():
    w = head(v=100, e=32)
    w[40] = w[70] = w[90] = 0.3
    h = torch.ones(1, 32)
    assert int(GreedyHead(w).tokens(h)[0]) == 40


@needs_ext
def test_a_row_does_not_depend_on_its_batch_mates_or_the_threads():
    w = head(v=5000, e=96, seed=3)
    h = hidden(7, 96, seed=4)
    screen = GreedyHead(w)
    alone = torch.cat([screen.tokens(h[i:i + 1]) for i in range(7)])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = screen.tokens(h)
        torch.set_num_threads(2)
        two = screen.tokens(h)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone, one) and torch.equal(one, two)


@needs_ext
def test_a_non_finite_row_is_left_to_the_full_logits():
    w = head(v=300, e=32)
    h = hidden(3, 32)
    h[1, 4] = float("nan")
    h[2, 0] = float("inf")
    tok = GreedyHead(w).tokens(h)
    assert int(tok[1]) == -1 and int(tok[2]) == -1
    check_is_argmax(tok[:1], h[:1], w)
    assert GreedyHead(w).tokens(torch.zeros(0, 32)).shape == (0,)


@needs_ext
@pytest.mark.parametrize("args,msg", [
    (lambda s, h: (h.double(), s.q, s.scale, s.slack, s.w), "float32"),
    (lambda s, h: (h, s.q.float(), s.scale, s.slack, s.w), "int8"),
    (lambda s, h: (h[:, :16], s.q, s.scale, s.slack, s.w), "shapes"),
    (lambda s, h: (h, s.q, s.scale[:-1], s.slack, s.w), "shapes"),
    (lambda s, h: (h.t().contiguous().t(), s.q, s.scale, s.slack, s.w), "contiguous"),
])
def test_the_kernel_refuses_bad_arguments(args, msg):
    s = GreedyHead(head(v=50, e=32))
    h = hidden(2, 32)
    with pytest.raises(RuntimeError, match=msg):
        greedy_head_cpu(*args(s, h))


@needs_ext
def test_on_the_embedded_model_the_screen_answers_the_full_heads_argmax():
    from pdcluster.engine.llm_engine import LLMEngine, build_config
    from pdcluster.engine.sampling_params import SamplingParams

    eng = LLMEngine(build_config())
    model = eng.model
    assert model.greedy is not None
    rows = []
    orig = model.logits

    def keep(h):
        rows.append(h.clone())
        return orig(h)
    model.logits = keep
    model.greedy, screen = None, model.greedy       # the full head: every hidden row reaches logits()
    sp = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    for p in ("The capital of France is", "def fib(n):", "Once upon a time"):
        eng.add_request(eng.tokenizer.encode(p), sp)
    while eng.has_work():
        eng.step()
    h = torch.cat(rows)
    assert h.shape[0] >= 3 * 24           # every sampled row (and drafts verified) went through logits()
    tok = screen.tokens(h)
    full = (h @ screen.w.T).max(1).indices
    check_is_argmax(tok, h, screen.w)
    assert int((tok == full).sum()) >= h.shape[0] - 1      # at most a float32 tie decided the other way


@needs_ext
def test_the_engine_gives_the_same_tokens_with_the_screen_and_without():
    """A batch mixing screened rows (greedy, greedy drafts verified) with rows that need the logits (logprobs,
    a penalty, sampling): every request's tokens match the full head's engine, and the screen did run."""
    import dataclasses

    from pdcluster.engine.llm_engine import LLMEngine, build_config
    from pdcluster.engine.sampling_params import SamplingParams

    prompts = ["The capital of France is", "1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3,", "def add(a, b):",
               "Name a colour.", "Count: one, two, three,"]
    params = [SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),            # ngram drafts verified
              SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=2),
              SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, repetition_penalty=1.3),
              SamplingParams(max_tokens=20, temperature=0.8, seed=7, ignore_eos=True)]
    outs, screened = {}, {}
    for on in (False, True):
        eng = LLMEngine(dataclasses.replace(build_config(), greedy_head=on))
        assert (eng.model.greedy is not None) == on
        screened[on] = 0
        if on:
            orig = eng.model.greedy_tokens

            def count(h, orig=orig):
                screened[True] += h.shape[0]
                return orig(h)
            eng.model.greedy_tokens = count
        reqs = [eng.add_request(eng.tokenizer.encode(p), sp) for p, sp in zip(prompts, params)]
        lps = {r.request_id: [] for r in reqs}
        while eng.has_work():
            for o in eng.step():
                lps[o.request.request_id] += o.logprobs
        outs[on] = [(list(r.output_token_ids), [(lp.token_id, lp.top) for lp in lps[r.request_id]]) for r in reqs]
    assert screened[True] >= 2 * 20 and screened[False] == 0
    assert [toks for toks, _ in outs[True]] == [toks for toks, _ in outs[False]]
    # the logprobs request's rows went through the full head in both (MKL's bits may depend on the rows beside)
    on, off = outs[True][2][1], outs[False][2][1]
    assert len(on) == 20 and [(t, [i for i, _ in top]) for t, top in on] == [(t, [i for i, _ in top]) for t, top in off]
    assert [v for _, top in on for _, v in top] == pytest.approx([v for _, top in off for _, v in top], abs=1e-4)


@needs_ext
def test_a_step_of_more_greedy_rows_than_max_rows_takes_the_full_head():
    from pdcluster.engine.llm_engine import LLMEngine, build_config
    from pdcluster.engine.sampling_params import SamplingParams
    from pdcluster.kernels.greedy_head import MAX_ROWS

    eng = LLMEngine(build_config(speculative="off"))
    sizes = []
    orig = eng.model.greedy_tokens
    eng.model.greedy_tokens = lambda h: (sizes.append(h.shape[0]), orig(h))[1]
    sp = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    reqs = [eng.add_request([100 + i, 200 + i, 300 + i], sp) for i in range(MAX_ROWS + 4)]
    while eng.has_work():
        eng.step()
    assert all(len(r.output_token_ids) == 3 for r in reqs)
    assert sizes == []                      # every step sampled MAX_ROWS + 4 rows: all through the logits
    eng.add_request([5, 6, 7], sp)
    while eng.has_work():
        eng.step()
    assert sizes == [1, 1, 1]


@needs_ext
def test_a_head_with_a_non_finite_weight_gets_no_screen():
    from pdcluster.engine.llama import Linear, greedy_screen
    w = head(v=100, e=32)
    assert isinstance(greedy_screen(Linear(w, None, False), "cpu"), GreedyHead)
    assert greedy_screen(Linear(w, torch.zeros(100), False), "cpu") is None         # a bias: not the plain argmax
    w[3, 4] = float("nan")
    assert greedy_screen(Linear(w, None, False), "cpu") is None
