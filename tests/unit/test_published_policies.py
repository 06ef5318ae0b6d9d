"""llm-d's weighted scorers and Dynamo's KV router cost (router/placement/llmd.py, dynamo.py) on crafted
loads, each choice checked against the documented formula by hand."""
import pytest

from pdcluster.router.placement import POLICY_NAMES, WorkerLoad, make_policy
from pdcluster.router.prefix_index import PrefixIndex
from pdcluster.router.telemetry import Telemetry
from pdcluster.router.cost_config import CostConfig

pytestmark = pytest.mark.timeout(30)
BS = 16


def D(wid, free=1000, in_flight=0, **kw):
    return WorkerLoad(wid, "decode", num_blocks=1000, free_blocks=free, in_flight=in_flight, **kw)


def P(wid, queued=0, in_flight=0):
    return WorkerLoad(wid, "prefill", queued_tokens=queued, in_flight=in_flight)


def index_with(holdings: dict, hashes):
    ix = PrefixIndex()
    for w, n in holdings.items():
        ix.apply(w, "stored", hashes[:n], seq=1, now=0.0)
    return ix


def test_registered_and_block_size_from_the_router():
    assert {"llm-d", "dynamo-kv"} <= set(POLICY_NAMES)
    t = Telemetry(CostConfig(block_size=32))
    assert make_policy("llm-d", telemetry=t).block_size == 32
    assert make_policy("dynamo-kv", telemetry=t, block_size=64).block_size == 64


def test_dynamo_cost_by_hand():
    hs = list(range(1, 11))                         # a 160-token prompt, 10 blocks
    ix = index_with({"d1": 8}, hs)
    pol = make_policy("dynamo-kv", index=ix, block_size=BS)
    d0, d1 = D("d0", free=990), D("d1", free=985)
    # d0: prefill 160/16 = 10 blocks, decode 10 used + 10 = 20 -> 30;  d1: (160 - 128)/16 = 2, 15 + 10 -> 27
    assert pol.choose(160, [], [d0, d1], hashes=hs, now=0.0).decode == "d1"
    # overlap weight 0: pure load -> d0 (20 < 25)
    assert make_policy("dynamo-kv", index=ix, block_size=BS, overlap_score_weight=0.0).choose(
        160, [], [d0, d1], hashes=hs, now=0.0).decode == "d0"
    # prefill pool: queued tokens count as prefill blocks: p0 (320 queued) 30 + 10 vs p1 10 + 10
    got = pol.choose(160, [P("p0", queued=320), P("p1")], [d0, d1], hashes=hs, now=0.0)
    assert (got.kind, got.prefill, got.decode) == ("remote", "p1", "d1")


def test_llmd_scores_by_hand():
    hs = list(range(1, 11))
    ix = index_with({"d1": 5}, hs)
    pol = make_policy("llm-d", index=ix, block_size=BS)
    # d0: prefix 0, queue (3-0)/3 = 1 -> 2, load 1.0 -> 3.0;  d1: prefix 3*0.5 = 1.5, queue 0, load 0.5 -> 2.0
    d0, d1 = D("d0", in_flight=0), D("d1", in_flight=3, free=500)
    assert pol.choose(160, [], [d0, d1], hashes=hs, now=0.0).decode == "d0"
    # a full hit outweighs the queue: d1 prefix 3 + load 0.5 = 3.5 > 3.0
    ix2 = index_with({"d1": 10}, hs)
    assert make_policy("llm-d", index=ix2, block_size=BS).choose(160, [], [d0, d1], hashes=hs, now=0.0).decode == "d1"
    # P/D: the decode worker's uncached tokens against pd_threshold decide decode-only vs remote prefill
    pd = make_policy("llm-d", index=ix2, block_size=BS, pd_threshold=32)
    assert pd.choose(160, [P("p0")], [d0, d1], hashes=hs, now=0.0).kind == "local"     # d1 has it all cached
    # pd_threshold 0 (the default) is "always P/D", a whole-prompt hit too (0 uncached <= 0 prefilled locally)
    assert make_policy("llm-d", index=ix2, block_size=BS).choose(160, [P("p0")], [d0, d1], hashes=hs,
                                                                 now=0.0).kind == "remote"
    got = make_policy("llm-d", index=ix, block_size=BS, pd_threshold=32).choose(160, [P("p0", in_flight=2), P("p1")],
                                                                                 [d0, d1], hashes=hs, now=0.0)
    assert (got.kind, got.prefill, got.decode) == ("remote", "p1", "d0")
    assert pol.choose(160, [], [D("d0", healthy=False)], hashes=hs, now=0.0) is None
