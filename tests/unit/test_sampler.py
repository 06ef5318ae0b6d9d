"""Sampler statistics and the incremental detokenizer (torch, no model)."""
import torch

from pdcluster.engine.sampler import filter_logits, make_generator, sample
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


def test_seed_is_per_request_and_batch_independent():
    logits = torch.randn(3, 50)
    p = SamplingParams(max_tokens=1, temperature=1.0, seed=42)
    q = SamplingParams(max_tokens=1, temperature=1.0, seed=43)
    alone = [sample(logits[:1], [p], [make_generator(p)])[0] for _ in range(1)]
    gens = [make_generator(q), make_generator(p), make_generator(q)]
    batched = sample(logits[[1, 0, 2]], [q, p, q], gens)
    assert batched[1] == alone[0]
