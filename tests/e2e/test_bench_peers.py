"""`bench scenario peers` against a real OpenAI-compatible server given by URL: the session
cluster's own HTTP API stands in for a peer (llama-server and vLLM are not installed in CI)."""
from pdcluster.bench.peers import Peer, format_peers, run_peers


def test_a_peer_given_by_url_is_measured_through_the_openai_client(cluster):
    url = f"http://127.0.0.1:{cluster.http.port}/v1"
    workload = {"dataset": "random", "num_prompts": 3, "input_len": 16, "output_len": 4, "ignore_eos": True}
    report = cluster.run(run_peers([], [Peer("self", url)], (1, 3), rounds=1, seed=7, workload=workload,
                                   progress=False))
    res = report["results"]["self"]
    assert set(res) == {"1", "3"}
    for c in ("1", "3"):
        assert res[c]["completed"] == 3 and res[c]["failed"] == 0, res[c]
        # ignore_eos: exactly output_len tokens each, counted from the server's usage chunk
        assert res[c]["output_throughput"] > 0 and res[c]["mean_tpot_ms"] > 0
    assert report["scenario"]["peers"] == {"self": url} and report["ratios"] == {}
    table = format_peers(report)
    assert "self" in table and "output_throughput" in table
