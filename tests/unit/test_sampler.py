"""Sampler statistics and the incremental detokenizer (torch, no model)."""
import pytest
import torch

from pdcluster.engine.sampler import NonFiniteLogits, filter_logits, make_generator, sample
from pdcluster.engine.sampling_params import SamplingParams


def test_temperature_sampling_follows_softmax_chi_square():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    logits = probs.log().unsqueeze(0)
    p = SamplingParams(max_tokens=1, temperature=1.0, seed=7)
    g = make_generator(p)
    n = 4000
    counts = torch.zeros(4)
    for _ in range(n):
        counts[sample(logits, [p], [g])[0]] += 1
    expected = probs * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.27, (counts, chi2)          # df=3, p=0.001


def test_temperature_sharpens():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    p = SamplingParams(max_tokens=1, temperature=0.25, seed=3)
    g = make_generator(p)
    draws = [sample(logits, [p], [g])[0] for _ in range(400)]
    assert draws.count(0) / 400 > 0.95


def test_top_k_and_top_p_masks():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [False, False, True, True]
    probs = logits.softmax(-1)          # ~[0.64, 0.24, 0.09, 0.03]
    kept = ~torch.isinf(filter_logits(logits, 0, 0.8))
    assert kept.tolist() == [True, True, False, False] and probs[:2].sum() >= 0.8
    assert (~torch.isinf(filter_logits(logits, 0, 0.1))).tolist() == [True, False, False, False]
    # a top_p that float32 rounds to 0 (HTTP takes float64) still keeps the top token: it dropped all of
    # them, the softmax was NaN and every draw was id 0
    for tiny in (1e-320, 1e-46):
        assert (~torch.isinf(filter_logits(logits[[1, 0, 2, 3]], 0, tiny))).tolist() == [False, True, False, False]


def test_seed_is_per_request_and_batch_independent():
    logits = torch.randn(3, 50)
    p = SamplingParams(max_tokens=1, temperature=1.0, seed=42)
    q = SamplingParams(max_tokens=1, temperature=1.0, seed=43)
    alone = [sample(logits[:1], [p], [make_generator(p)])[0] for _ in range(1)]
    gens = [make_generator(q), make_generator(p), make_generator(q)]
    batched = sample(logits[[1, 0, 2]], [q, p, q], gens)
    assert batched[1] == alone[0]


def test_tiny_temperatures_sample_the_argmax_not_token_0():
    """1e-38 .. 5e-324 used to overflow logits / T to inf, NaN after softmax, then token 0."""
    torch.manual_seed(0)
    logits = torch.randn(3, 1000) * 5
    want = logits.argmax(-1).tolist()
    assert 0 not in want
    for t in (1e-30, 1e-38, 1e-45, 1e-300, 5e-324):
        params = [SamplingParams(temperature=t, seed=i) for i in range(3)]
        assert sample(logits, params, [make_generator(p) for p in params]) == want, t


def test_huge_logits_and_a_positive_inf_still_sample():
    logits = torch.full((2, 50), -3e38)
    logits[0, 7], logits[1, 9] = 3e38, float("inf")
    params = [SamplingParams(temperature=0.5, seed=1)] * 2
    assert sample(logits, params, [make_generator(p) for p in params]) == [7, 9]


def test_nan_logits_never_win_and_an_all_nan_row_raises():
    logits = torch.randn(2, 10)
    logits[0, 0] = float("nan")
    logits[1, 3] = float("nan")
    greedy = [SamplingParams(temperature=0)] * 2
    got = sample(logits.clone(), greedy, [None, None])
    clean = logits.nan_to_num(nan=float("-inf"))
    assert got == clean.argmax(-1).tolist() and got[0] != 0 and got[1] != 3
    rnd = [SamplingParams(temperature=1.0, seed=s) for s in range(2)]
    for _ in range(20):
        got = sample(logits.clone(), rnd, [make_generator(p) for p in rnd])
        assert got[0] != 0 and got[1] != 3
    bad = torch.full((1, 10), float("nan"))
    with pytest.raises(NonFiniteLogits):
        sample(bad, greedy[:1], [None])
    with pytest.raises(NonFiniteLogits):
        sample(torch.full((1, 10), float("-inf")), rnd[:1], [make_generator(rnd[0])])


def test_infinite_or_nan_temperature_is_rejected():
    for t in (float("inf"), float("nan"), -1e-9):
        with pytest.raises(ValueError, match="temperature"):
            SamplingParams(temperature=t)


# penalties, min-p, logprobs (engine/logits_processors.py; OpenAI / vLLM semantics)

from pdcluster.engine.sampler import History, sample_rows  # noqa: E402


def test_penalties_follow_the_openai_and_ctrl_formulas():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0]])
    p = SamplingParams(temperature=0, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25,
                       logprobs=0)
    h = History(prompt_ids=[0], output_ids=[1, 1, 2])
    _, lps = sample_rows(logits, [p], [None], [h])
    # repetition on ids 0,1,2 (prompt or output): 2/2=1, -1*2=-2, 0.5/2=0.25; then counts [0,2,1,0,0]:
    # id1: -2 - 0.5*2 - 0.25 = -3.25; id2: 0.25 - 0.5 - 0.25 = -0.5
    want = torch.tensor([1.0, -3.25, -0.5, 3.0, 0.0]).log_softmax(-1)
    assert lps[0].token_id == 3 and abs(lps[0].logprob - float(want[3])) < 1e-6


def test_a_repetition_penalty_changes_the_greedy_choice():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    plain = SamplingParams(temperature=0)
    pen = SamplingParams(temperature=0, repetition_penalty=1.5)
    assert sample_rows(logits, [plain], [None])[0] == [0]
    assert sample_rows(logits, [pen], [None], [History([0], [])])[0] == [1]   # 3/1.5 = 2 < 2.9


def test_min_p_never_draws_below_its_share_of_the_top_probability():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.12, 0.08]]))
    p = SamplingParams(temperature=1.0, min_p=0.2, seed=3)     # keeps ids with prob >= 0.1
    g = make_generator(p)
    draws = {sample_rows(logits, [p], [g])[0][0] for _ in range(400)}
    assert draws == {0, 1, 2}


def test_logprobs_are_of_the_tempered_untruncated_distribution_best_first():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    p = SamplingParams(temperature=0.5, top_k=2, logprobs=3, seed=1)
    toks, lps = sample_rows(logits, [p], [make_generator(p)])
    want = (logits[0] / 0.5).log_softmax(-1)
    assert [t for t, _ in lps[0].top] == [1, 2, 0]
    assert all(abs(lp - float(want[t])) < 1e-5 for t, lp in lps[0].top)
    assert lps[0].token_id == toks[0] and abs(lps[0].logprob - float(want[toks[0]])) < 1e-5
    assert sample_rows(logits, [SamplingParams(temperature=0)], [None])[1] == [None]   # not asked: none


@pytest.mark.parametrize("kw, field", [
    (dict(min_p=1.5), "min_p"), (dict(min_p=float("nan")), "min_p"),
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(logprobs=21), "logprobs"),
    (dict(logprobs=-1), "logprobs"), (dict(logprobs=True), "logprobs"),
    (dict(prompt_logprobs=21), "prompt_logprobs"), (dict(prompt_logprobs=-1), "prompt_logprobs"),
])
def test_new_sampling_fields_are_validated(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw)


# logit bias and min_tokens (on the raw logits, before penalties)

def test_a_logit_bias_moves_the_greedy_choice_and_minus_100_bans_a_token():
    logits = torch.tensor([[3.0, 2.9, 0.0, -1.0]])
    none = None                                             # no history: the model runner builds none for these
    assert sample_rows(logits, [SamplingParams(temperature=0, logit_bias={2: 3.5})], [None], [none])[0] == [2]
    assert sample_rows(logits, [SamplingParams(temperature=0, logit_bias={0: -100})], [None], [none])[0] == [1]
    p = SamplingParams(temperature=1.0, seed=4, logit_bias={0: -100, 1: -100})
    g = make_generator(p)
    assert {sample_rows(logits, [p], [g], [none])[0][0] for _ in range(300)} == {2, 3}


def test_bias_comes_before_the_penalties_and_into_the_logprobs():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    p = SamplingParams(temperature=0, logit_bias={1: 2.0}, repetition_penalty=2.0, logprobs=0)
    toks, lps = sample_rows(logits, [p], [None], [History([1], [])])
    # id 1: (1 + 2) / 2 = 1.5 < 2: the penalty saw the biased logit
    want = torch.tensor([2.0, 1.5, 0.0]).log_softmax(-1)
    assert toks == [0] and abs(lps[0].logprob - float(want[0])) < 1e-6


def test_min_tokens_holds_eos_and_stop_ids_back_until_enough_tokens_are_out():
    from pdcluster.engine.logits_processors import stop_ids
    logits = torch.tensor([[1.0, 5.0, 4.0, 3.0]])           # id 1: EOS, id 2: a stop id
    p = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=(2,))
    held = stop_ids(p, (1,))
    assert held == (1, 2)
    assert sample_rows(logits, [p], [None], [History([], [7], held)])[0] == [3]          # 1 out: both held
    assert sample_rows(logits, [p], [None], [History([], [7, 8], held)])[0] == [1]       # 2 out: free
    # ignore_eos: EOS does not end the request, yet min_tokens still holds it back (vLLM's; before, it was free)
    ign = SamplingParams(temperature=0, min_tokens=2, ignore_eos=True)
    assert stop_ids(ign, (1,)) == (1,) and sample_rows(logits, [ign], [None], [History([], [], (1,))])[0] == [2]


def test_min_tokens_leaves_a_row_whose_only_candidate_is_a_stop_id():
    """A grammar that allows only its end (EOS) wins over min_tokens: the row is not emptied."""
    logits = torch.tensor([[float("-inf"), 5.0, float("-inf")]])
    p = SamplingParams(temperature=0, min_tokens=3)
    assert sample_rows(logits, [p], [None], [History([], [], (1,))])[0] == [1]


def test_rows_that_shape_their_logits_leave_the_fast_paths():
    assert not SamplingParams(temperature=0, logit_bias={3: 1.0}).plain
    assert not SamplingParams(temperature=0, min_tokens=1).plain
    assert SamplingParams(temperature=0, logit_bias={}).plain


@pytest.mark.parametrize("kw, field", [
    (dict(max_tokens=4, min_tokens=5), "min_tokens"), (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=1.0), "min_tokens"), (dict(logit_bias={3: 100.5}), "logit_bias"),
    (dict(logit_bias={3: float("nan")}), "logit_bias"), (dict(logit_bias={-1: 1.0}), "logit_bias"),
    (dict(logit_bias={"3": 1.0}), "logit_bias"), (dict(logit_bias={3: True}), "logit_bias"),
    (dict(logit_bias=[(3, 1.0), (3, 2.0)]), "twice"), (dict(logit_bias=[(3, 1.0, 2.0)]), "logit_bias"),
])
def test_logit_bias_and_min_tokens_are_validated(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw)


def test_clean_logits_one_reduction_check_matches_the_elementwise_one():
    """clean_logits skips the elementwise check when the sum is finite: every row kind gives what the
    elementwise check (isfinite over all entries) gives, including finite rows whose sum overflows."""
    from pdcluster.engine.sampler import clean_logits

    def reference(x):
        if bool(torch.isfinite(x).all()):
            return x
        return x.nan_to_num(nan=float("-inf"), posinf=torch.finfo(x.dtype).max, neginf=float("-inf"))
    rows = {"plain": torch.randn(2, 8), "overflowing sum": torch.full((2, 8), 3e38),
            "-inf entry": torch.randn(2, 8).index_fill_(1, torch.tensor([3]), float("-inf")),
            "+inf entry": torch.randn(2, 8).index_fill_(1, torch.tensor([5]), float("inf")),
            "nan entry": torch.randn(2, 8).index_fill_(1, torch.tensor([0]), float("nan")),
            "+inf and -inf": torch.tensor([[float("inf"), float("-inf"), 1.0], [0.0, 1.0, 2.0]])}
    for name, x in rows.items():
        got, want = clean_logits(x.clone()), reference(x.clone())
        assert torch.equal(got, want), name
        assert not got.isnan().any(), name


def test_greedy_rows_take_the_first_of_tied_maxima():
    """sample_rows' greedy pick (max(-1).indices) follows argmax's rule: the first maximal entry wins."""
    logits = torch.zeros(3, 49152)
    logits[0, [7, 40000]] = 5.0
    logits[1, [30000, 49151]] = 2.0
    logits[2, :] = 1.0
    toks, _ = sample_rows(logits, [SamplingParams(temperature=0)] * 3, [None] * 3)
    assert toks == [7, 30000, 0] == logits.argmax(-1).tolist()


@pytest.mark.parametrize("penalty", [1e-300, 1e-40, 1e-38])
def test_a_tiny_repetition_penalty_keeps_the_row_finite(penalty):
    """Positive logits of seen ids divided by a tiny penalty went to +inf: inf - inf after temperature
    made the row NaN, the draw returned token 0 and the logprobs were NaN. They stay finite (the
    largest float32), so the seen ids win, and a masked (-inf) id stays masked."""
    import math

    from pdcluster.engine.sampler import History, sample_rows
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
    logits[0, 3], logits[0, 7], logits[0, 9] = 4.0, 2.0, float("-inf")
    p = SamplingParams(temperature=1.0, repetition_penalty=penalty, logprobs=2, max_tokens=4)
    toks, lps = sample_rows(logits, [p], [torch.Generator().manual_seed(1)], [History([3, 7, 9], [])])
    assert toks[0] in (3, 7) and not math.isnan(lps[0].logprob)
    assert all(math.isfinite(v) or v == float("-inf") for _, v in lps[0].top)
    greedy = SamplingParams(temperature=0.0, repetition_penalty=penalty, max_tokens=4)
    assert sample_rows(logits, [greedy], [None], [History([3, 7, 9], [])])[0][0] in (3, 7)
