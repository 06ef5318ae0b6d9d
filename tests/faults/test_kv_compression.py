"""KV compressed on the wire (int8 / fp8, kv_transfer/codec.py) between real workers (no Ray) over
TCP: greedy tokens stay within the top-5 rule against the uncompressed transfer, itself checked against
transformers' greedy output (tests/e2e/conftest check_top5, with transformers on the embedded model's
weights as the judge of near-ties), on ~4x fewer bytes."""
import pytest

from pdcluster.kv_transfer.codec_policy import CompressionPolicy
from pdcluster.messages import PrefillResult
from tests.e2e.conftest import PROMPTS, check_top5, hf_greedy
from tests.unit import kv_workers
from tests.unit.kv_workers import GREEDY
CASES = PROMPTS[::3] + ["Describe a lighthouse on a stormy night. " * 12]  # 7 prompts, 5-110 tokens


@pytest.fixture(scope="module")
def workers(tcp_pair):
    """The session's TCP worker pair (tests/faults/conftest.py), its compression put back after."""
    p, d = tcp_pair
    saved = p.compression
    yield p, d
    p.compression = saved


def remote(p, d, rid, ids, salt) -> tuple[list[int], PrefillResult]:
    """Prefill on p, KV over TCP, decode on d: (tokens, the prefill's figures). The cache salt
    keeps each mode off the decode side's prefix cache: every block crosses the link."""
    return kv_workers.remote(p, d, rid, ids, GREEDY, salt, fresh=True)


@pytest.fixture(scope="module")
def judge():
    """transformers on our float32 weights of the embedded GGUF (tests/hf_reference.py): the same
    reference as transformers' own GGUF load (tests/unit/test_loader.py proves the weights and
    config equal), without its 20-50 s numpy dequantization in this process."""
    from tests.hf_reference import transformers_on_our_weights
    return transformers_on_our_weights()


@pytest.mark.timeout(180)
def test_compressed_transfers_keep_greedy_tokens_within_top5(workers, judge):
    p, d = workers
    prompts = [d.engine.tokenizer.encode(t, add_special_tokens=False) for t in CASES]
    runs = {}
    for mode in ("off", "int8", "fp8"):
        p.compression = CompressionPolicy(mode)
        runs[mode] = [remote(p, d, f"{mode}-{i}", ids, salt=mode) for i, ids in enumerate(prompts)]
    ref = [toks for toks, _ in runs["off"]]
    for ids, toks in zip(prompts, ref):                     # the uncompressed transfer against transformers
        check_top5(judge, ids, toks, hf_greedy(judge, ids, GREEDY.max_tokens))
    for mode in ("int8", "fp8"):
        same, diverged = 0, []
        for ids, (toks, res), want, (_, base) in zip(prompts, runs[mode], ref, runs["off"]):
            assert res.kv_codec == mode and base.kv_codec == "none"
            assert base.kv_bytes / 4.1 < res.kv_bytes <= base.kv_bytes / 4  # fp32 cache -> 1 byte
            check_top5(judge, ids, toks, want)
            if toks == want:
                same += 1
            else:
                diverged.append(next(j for j, (a, b) in enumerate(zip(toks, want)) if a != b))
        print(f"\n[kv compression] {mode}: {same}/{len(prompts)} prompts token-exact vs uncompressed, "
              f"first divergences at {diverged}")
        # near-ties may flip a token (every step stays within the top-5 rule above); most must not
        assert same >= len(prompts) - 2, (mode, same, diverged)
