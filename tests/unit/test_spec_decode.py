"""Speculative decoding's pure parts: n-gram drafts, acceptance rules (greedy and rejection
sampling, checked statistically against a wrong rule), the adaptive policy, and the scheduler's
block accounting when drafts are rejected (no model)."""
import pytest
import torch

from pdcluster.engine.config import SchedulerConfig
from pdcluster.engine.kv_cache_manager import KVCacheManager
from pdcluster.engine.request import Request, Status
from pdcluster.engine.sampler import draw
from pdcluster.engine.sampling_params import SamplingParams
from pdcluster.engine.scheduler import Scheduler
from pdcluster.engine.spec.decoder import SpecDecoder
from pdcluster.engine.spec.ngram import propose
from pdcluster.engine.spec.verify import accept_greedy, accept_sampled, verify

BS = 4


# n-gram proposer
def test_ngram_drafts_what_followed_the_latest_match_longest_n_first():
    seq = [1, 2, 3, 4, 5, 9, 2, 3, 4, 6, 7, 1, 2, 3, 4]
    assert propose(seq, k=3, n_max=4, n_min=2) == [5, 9, 2]     # 4-gram [1,2,3,4] at 0 beats the later 3-gram
    assert propose(seq, k=3, n_max=3, n_min=2) == [6, 7, 1]     # 3-gram [2,3,4]: the latest earlier one (at 6)
    assert propose([5, 6, 7, 5, 6], k=8) == [7, 5, 6]           # runs up to the end, never past it
    assert propose([1, 2, 3, 4], k=3) == []                     # no earlier occurrence
    assert propose([1, 2, 1, 2], k=0) == []
    assert propose([7, 7, 7, 7], k=2, n_max=2) == [7]           # the match right before the tail
    assert propose([1, 2, 3, 9] + [0] * 10 + [1, 2, 3], k=1, window=8) == []   # outside the window


# acceptance rules
def test_greedy_accepts_the_longest_matching_prefix_plus_the_next_argmax():
    assert accept_greedy([5, 6, 7], [5, 6, 9, 1]) == [5, 6, 9]
    assert accept_greedy([5, 6, 7], [5, 6, 7, 1]) == [5, 6, 7, 1]   # all stand: the bonus token
    assert accept_greedy([5, 6, 7], [4, 6, 7, 1]) == [4]
    assert accept_greedy([], [3]) == [3]


def test_verify_greedy_rows_match_their_argmax():
    logits = torch.full((5, 10), -1.0)
    for row, t in enumerate([3, 4, 8, 2, 1]):          # request A: 2 drafts (rows 0-2); B: 1 draft (rows 3-4)
        logits[row, t] = 5.0
    out = verify(logits, [SamplingParams(temperature=0)] * 2, [[3, 5], [2]], [None, None])
    assert out == [[3, 4], [2, 1]]


P = torch.tensor([[0.5, 0.3, 0.15, 0.05],     # row 0: the first token's distribution
                  [0.1, 0.2, 0.3, 0.4],       # row 1: the next one's, after draft 1
                  [0.25, 0.25, 0.25, 0.25]])
DRAFTS = [1, 3]
CHI2_3DF_999 = 16.27                           # chi-square, 3 degrees of freedom, p = 0.001


def chi2(counts: torch.Tensor, p: torch.Tensor) -> float:
    n = counts.sum()
    return float(((counts - n * p) ** 2 / (n * p)).sum())


def wrong_rule(probs, drafts, g):
    """A plausible mistake: on rejection, draw from p again (not from the residual)."""
    for j, d in enumerate(drafts):
        if float(torch.rand((), generator=g, dtype=torch.float64)) < float(probs[j, d]):
            continue
        return drafts[:j] + [draw(probs[j], g)]
    return drafts + [draw(probs[len(drafts)], g)]


def first_two(rule, n=5000, seed=0):
    """Counts of the first token, and of the second one where the first is draft 1 (row 1 applies)."""
    g = torch.Generator().manual_seed(seed)
    c1, c2 = torch.zeros(4), torch.zeros(4)
    for _ in range(n):
        toks = rule(P, DRAFTS, g)
        c1[toks[0]] += 1
        if toks[0] == DRAFTS[0]:
            if len(toks) == 1:                 # the first draft rejected, then drawn again: no 2nd token here
                continue
            c2[toks[1]] += 1
    return c1, c2


def test_rejection_sampling_is_exact_and_a_wrong_rule_is_caught():
    c1, c2 = first_two(accept_sampled)
    assert chi2(c1, P[0]) < CHI2_3DF_999 and chi2(c2, P[1]) < CHI2_3DF_999, (c1, c2)
    w1, w2 = first_two(wrong_rule)             # control: the same test rejects a wrong rule
    assert chi2(w1, P[0]) > 10 * CHI2_3DF_999, w1


def test_rejection_sampling_with_a_zero_probability_draft_never_accepts_it():
    g = torch.Generator().manual_seed(1)
    p = torch.tensor([[0.0, 0.6, 0.4], [1.0, 0.0, 0.0]])
    assert all(accept_sampled(p, [0], g)[0] != 0 for _ in range(200))
    assert accept_sampled(torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]), [1], g) == [1, 0]   # certain


# adaptive policy
def test_draft_length_adapts_to_acceptance_and_recovers():
    d = SpecDecoder(k_max=4, min_gain=0.25, recover=0.05)
    assert d.num_drafts("r") == 3                  # prior alpha 2/3: 2/3^3 >= 0.25 > 2/3^4
    for _ in range(5):
        d.observe("r", 4, 4)
    assert d.num_drafts("r") == 4
    proposed, fails = 20, 0
    while d.num_drafts("r"):
        k = d.num_drafts("r")
        d.observe("r", k, 0)
        proposed, fails = proposed + k, fails + 1
        assert fails < 20
    assert 3 <= fails and d.stats.proposed == proposed and d.stats.accepted == 20   # acceptance collapsed: stop
    r = Request(list(range(10)) * 2, SamplingParams(temperature=0), request_id="r")

    def wait():
        steps = 0
        while d.num_drafts("r") == 0:
            assert d.drafts(r, 4) == []
            steps += 1
            assert steps < 500
        return steps
    first = wait()
    assert first >= 1 and d.drafts(r, 4) == [0]     # probes again after a while (alpha^1 >= min_gain: k = 1)
    d.observe("r", 1, 0)                            # the probe fails: a longer wait before the next
    assert wait() > first


def test_only_requests_whose_sampling_stays_exact_draft():
    ok = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, top_p=0.9, min_p=0.1),
          SamplingParams(temperature=0, seed=3)]
    no = [SamplingParams(temperature=0, repetition_penalty=1.2), SamplingParams(temperature=0.7, seed=3),
          SamplingParams(temperature=0, logprobs=2), SamplingParams(presence_penalty=0.5)]
    assert all(SpecDecoder.eligible(Request([1, 2], p)) for p in ok)
    assert not any(SpecDecoder.eligible(Request([1, 2], p)) for p in no)


# scheduler: drafts scheduled, rejected ones rolled back
def make(num_blocks=16, budget=64, max_len=1000):
    return Scheduler(SchedulerConfig(8, budget), KVCacheManager(num_blocks, BS), max_len, spec=SpecDecoder(k_max=4))


def copy_req(max_tokens=12, rid="r", eos=(99999,)):
    # [10..15] twice then 10: after an output 11 the lookup proposes 12, 13, 14, 15
    return Request(list(range(10, 16)) * 2 + [10], SamplingParams(max_tokens=max_tokens, temperature=0),
                   request_id=rid, eos_token_ids=eos, block_size=BS)


def test_rejected_drafts_roll_back_computed_tokens_and_blocks():
    s = make()
    r = copy_req()
    s.add(r)
    b = s.schedule()
    s.update(b, [11])                                 # prefill 13 tokens, first output 11
    assert r.num_computed_tokens == 13 and len(r.block_ids) == 4 and s.kv.num_free_blocks == 12
    b = s.schedule()
    assert r.spec_token_ids == [12, 13, 14] and b.num_new_tokens == [4] and b.samples(0)
    assert len(r.block_ids) == 5                      # positions 13..16 of the verification need block 4
    s.update(b, [[12, 99]])                           # draft 12 stands, 13 is rejected, 99 drawn
    assert r.output_token_ids == [11, 12, 99]
    assert r.num_computed_tokens == 15 and r.num_tokens == 16 and not r.spec_token_ids
    assert len(r.block_ids) == 4 and s.kv.num_free_blocks == 12          # block 4 held only rejected drafts
    assert s.spec.stats.proposed == 3 and s.spec.stats.accepted == 1
    s.abort(r.request_id)
    assert s.kv.num_free_blocks == 16 and not s.spec._state


def test_eos_inside_accepted_drafts_ends_the_request_there():
    s = make()
    r = copy_req(eos=(13,))
    s.add(r)
    s.update(s.schedule(), [11])
    b = s.schedule()
    assert r.spec_token_ids == [12, 13, 14]
    fin = s.update(b, [[12, 13, 14, 15]])             # all accepted, but 13 is EOS
    assert fin == [r] and r.status is Status.FINISHED_STOPPED and r.output_token_ids == [11, 12, 13]
    assert s.kv.num_free_blocks == 16 and not s.has_work()


def test_drafts_never_pass_max_tokens_and_give_way_to_a_short_pool():
    s = make()
    r = copy_req(max_tokens=3)
    s.add(r)
    s.update(s.schedule(), [11])
    s.schedule()
    assert r.spec_token_ids == [12]                   # 1 output so far: 1 draft + 1 drawn = max_tokens
    s2 = make(num_blocks=6)
    r2, filler = copy_req(max_tokens=8), Request([1, 2, 3, 4, 5], SamplingParams(max_tokens=3, temperature=0),
                                                 request_id="f", block_size=BS)
    s2.add(r2)
    s2.add(filler)
    s2.update(s2.schedule(), [11, 7])                 # r2: 13 tokens in 4 blocks, filler 2: the pool is full
    assert s2.kv.num_free_blocks == 0
    b = s2.schedule()
    assert b.num_new_tokens == [1, 1] and not r2.spec_token_ids and not b.preempted   # no room: no drafts


def test_drafts_stop_where_a_step_would_turn_compute_bound():
    s = Scheduler(SchedulerConfig(8, 64), KVCacheManager(32, BS), 1000, spec=SpecDecoder(k_max=4, max_step_tokens=6))
    rs = [copy_req(rid=f"r{i}") for i in range(3)]
    for r in rs:
        s.add(r)
    s.update(s.schedule(), [11, 11, 11])
    b = s.schedule()
    assert b.num_new_tokens == [4, 1, 1]              # 3 rows + 3 drafts = the cap: the others get none
    assert [len(r.spec_token_ids) for r in rs] == [3, 0, 0]
    s.spec.max_step_tokens = 3                        # control: no room at all -> plain decodes
    s.update(b, [[12, 13, 14, 15], 12, 12])
    assert s.schedule().num_new_tokens == [1, 1, 1]


# configuration: --speculative and pools.yaml's per-pool key reach the engine's keywords
def test_speculative_per_pool_and_bad_values():
    from pdcluster.deploy.pools import PoolsConfigError, parse_pools_config
    from pdcluster.engine.config import EngineConfig
    c = parse_pools_config("decode: {speculative: \"off\"}\n")
    assert c.engine_kwargs("decode")["speculative"] == "off"
    assert c.engine_kwargs("prefill")["speculative"] == "ngram"          # the engine section's default
    with pytest.raises(PoolsConfigError, match="decode.speculative: must be one of ngram, off"):
        parse_pools_config("decode: {speculative: eagle}\n")
    with pytest.raises(ValueError, match="speculative must be one of"):
        EngineConfig(model=None, speculative="eagle")
