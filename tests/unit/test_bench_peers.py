"""The pure parts of `bench scenario peers` (bench/peers.py): peer URLs, ratios, the table."""
import pytest

from pdcluster.bench.peers import Peer, format_peers, parse_peer, peer_ratios


@pytest.mark.parametrize("text, peer", [
    ("llama=http://127.0.0.1:8103/v1", Peer("llama", "http://127.0.0.1:8103/v1")),
    ("vllm=http://127.0.0.1:8102", Peer("vllm", "http://127.0.0.1:8102/v1")),     # /v1 added
    ("http://127.0.0.1:8103/v1/", Peer("127.0.0.1:8103", "http://127.0.0.1:8103/v1")),
])
def test_parse_peer(text, peer):
    assert parse_peer(text) == peer


@pytest.mark.parametrize("text", ["llama=127.0.0.1:8103", "ftp://x/v1", ""])
def test_parse_peer_refuses_what_is_not_a_url(text):
    with pytest.raises(ValueError, match="--peer"):
        parse_peer(text)


def test_ratios_are_ours_over_theirs_per_concurrency():
    res = {"ours": {1: {"output_throughput": 30.0, "mean_tpot_ms": 20.0},
                    4: {"output_throughput": 60.0, "mean_tpot_ms": None}},
           "llama": {1: {"output_throughput": 60.0, "mean_tpot_ms": 10.0},
                     4: {"output_throughput": 40.0, "mean_tpot_ms": 30.0}}}
    r = peer_ratios(res, ["ours"], ["llama"], (1, 4))
    assert r == {"ours vs llama": {"1": {"output_throughput": 0.5, "mean_tpot_ms": 2.0},
                                   "4": {"output_throughput": 1.5, "mean_tpot_ms": None}}}
    report = {"scenario": {"workload": {}, "rounds": 1, "concurrency": [1, 4]},
              "results": {s: {str(c): v | {"median_tpot_ms": None, "mean_ttft_ms": 1.0, "failed": 0}
                              for c, v in by.items()} for s, by in res.items()},
              "ratios": r}
    table = format_peers(report)
    assert "0.50x" in table and "1.50x" in table and "2.00x" in table and "n/a" in table
    assert "failed requests" not in table
    report["results"]["llama"]["4"] |= {"failed": 3, "errors": {"NO_TOKENS": 1, "ReadTimeout": 2}}
    assert "failed requests (the client's error codes): llama at 4: 1 NO_TOKENS, 2 ReadTimeout" in format_peers(report)
