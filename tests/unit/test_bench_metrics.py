"""bench metrics on synthetic streams with hand-computed answers; datasets; the comparison plot."""

import argparse
import json

import pytest

from pdcluster.bench import serve
from pdcluster.bench.datasets import BenchRequest, build_dataset
from pdcluster.bench.metrics import StreamRecorder, calculate_metrics, format_table, parse_goodput
from pdcluster.bench.plots import plot_comparison
from pdcluster.router.proto import generation_pb2 as pb

VOCAB = 1000


def _msg(ids, **fields):
    return pb.GenerateResponse(token_ids=ids, **fields)


def _outputs():
    """A: 5 tokens in 4 messages, remote prefill; B: 1 token; then 3 gRPC failures and 1 abort.

    A (sent at 0.0 s): tokens at 0.10, 0.15, 0.25 (two tokens), 0.30 s
      TTFT 100 ms, ITLs 50, 100, 50 ms, E2EL 300 ms, TPOT (300 - 100) / (5 - 1) = 50 ms
    B (sent at 1.0 s): one token at 1.2 s: TTFT 200 ms, E2EL 200 ms, no TPOT, no ITL
    """
    a = StreamRecorder(start=0.0, prompt_len=10)
    a.on_message(_msg([1], placement=pb.Placement(remote_prefill=True, kv_bytes_transferred=1_000_000,
                                                   kv_transfer_ms=2.0)), 0.10)
    a.on_message(_msg([2]), 0.15)
    a.on_message(_msg([3, 4]), 0.25)
    a.on_message(_msg([5], finish_reason=pb.FINISH_REASON_LENGTH,
                      usage=pb.Usage(prompt_tokens=10, completion_tokens=5, cached_prompt_tokens=4)), 0.30)
    b = StreamRecorder(start=1.0, prompt_len=20)
    b.on_message(_msg([7], placement=pb.Placement(remote_prefill=False), finish_reason=pb.FINISH_REASON_STOP,
                      usage=pb.Usage(prompt_tokens=20, completion_tokens=1)), 1.2)
    aborted = StreamRecorder(start=0.0, prompt_len=3)
    aborted.on_message(_msg([9], finish_reason=pb.FINISH_REASON_ABORT), 0.5)
    return [
        a.finish(0.30),
        b.finish(1.2),
        StreamRecorder(0.0, 3).fail("UNAVAILABLE", 0.01),
        StreamRecorder(0.0, 3).fail("RESOURCE_EXHAUSTED", 0.01),
        StreamRecorder(0.0, 3).fail("UNAVAILABLE", 0.02),
        aborted.finish(0.5),
    ]


def test_stream_recorder_per_request():
    a, b = _outputs()[:2]
    assert a.success and a.ttft == pytest.approx(0.100)
    assert a.itl == pytest.approx([0.050, 0.100, 0.050])
    assert a.latency == pytest.approx(0.300)
    assert (a.prompt_tokens, a.output_tokens, a.cached_prompt_tokens) == (10, 5, 4)
    assert a.token_ids == [1, 2, 3, 4, 5]
    assert b.success and b.ttft == pytest.approx(0.200) and b.itl == []


def test_aggregate_metrics_hand_computed():
    r = calculate_metrics(_outputs(), duration_s=2.0, goodput=None)
    assert (r["completed"], r["failed"]) == (2, 4)
    assert r["errors"] == {"UNAVAILABLE": 2, "RESOURCE_EXHAUSTED": 1, "FINISH_REASON_ABORT": 1}
    assert (r["total_input_tokens"], r["total_output_tokens"]) == (30, 6)
    assert r["request_throughput"] == pytest.approx(1.0)
    assert r["output_throughput"] == pytest.approx(3.0)
    assert r["total_token_throughput"] == pytest.approx(18.0)
    assert r["request_goodput"] is None
    # TTFT [100, 200] ms
    assert r["mean_ttft_ms"] == pytest.approx(150.0)
    assert r["median_ttft_ms"] == pytest.approx(150.0)
    assert r["std_ttft_ms"] == pytest.approx(50.0)
    assert r["p90_ttft_ms"] == pytest.approx(190.0)
    assert r["p99_ttft_ms"] == pytest.approx(199.0)
    # TPOT [50] ms: B's 1-token output has none
    assert r["tpots"] == pytest.approx([50.0])
    assert r["mean_tpot_ms"] == pytest.approx(50.0) and r["std_tpot_ms"] == pytest.approx(0.0)
    # ITL [50, 100, 50] ms: the 2-token message adds one 100 ms gap
    assert r["mean_itl_ms"] == pytest.approx(200.0 / 3)
    assert r["median_itl_ms"] == pytest.approx(50.0)
    assert r["std_itl_ms"] == pytest.approx((5000.0 / 9) ** 0.5)
    assert r["p90_itl_ms"] == pytest.approx(90.0)
    assert r["p99_itl_ms"] == pytest.approx(99.0)
    # E2EL [300, 200] ms
    assert r["mean_e2el_ms"] == pytest.approx(250.0)
    assert r["p90_e2el_ms"] == pytest.approx(290.0)
    assert r["ttfts"] == pytest.approx([100.0, 200.0]) and r["e2els"] == pytest.approx([300.0, 200.0])
    # cache and transfer: 4 of 30 prompt tokens cached; 1e6 bytes in 2 ms = 4 Gbit/s
    assert r["prefix_cache_hit_rate"] == pytest.approx(4 / 30)
    assert r["kv_bytes_transferred"] == 1_000_000
    assert r["mean_kv_transfer_ms"] == pytest.approx(2.0)
    assert r["kv_transfer_bandwidth_gbps"] == pytest.approx(4.0)
    assert r["remote_prefill_fraction"] == pytest.approx(0.5)
    json.dumps(r, allow_nan=False)


@pytest.mark.parametrize(
    "targets, good",
    [
        ({"ttft": 150.0}, 1),  # A (100 ms) meets it, B (200 ms) does not
        ({"tpot": 40.0}, 1),  # A's 50 ms misses; B's 1-token output counts as TPOT 0
        ({"ttft": 150.0, "tpot": 40.0}, 0),  # every target must hold
        ({"e2el": 250.0}, 1),  # only B (200 ms)
        ({"ttft": 200.0, "tpot": 50.0, "e2el": 300.0}, 2),  # bounds are inclusive
    ],
)
def test_goodput(targets, good):
    r = calculate_metrics(_outputs(), duration_s=2.0, goodput=targets)
    assert r["request_goodput"] == pytest.approx(good / 2.0)


def test_empty_and_undefined_metrics():
    r = calculate_metrics([StreamRecorder(0.0, 3).fail("UNAVAILABLE", 0.1)], 1.0, None)
    assert r["completed"] == 0 and r["mean_ttft_ms"] == 0.0 and r["errors"] == {"UNAVAILABLE": 1}
    assert r["prefix_cache_hit_rate"] is None and r["kv_transfer_bandwidth_gbps"] is None
    assert "n/a" in format_table(r)


def test_parse_goodput():
    assert parse_goodput(["ttft:500", "e2el:2000.5"]) == {"ttft": 500.0, "e2el": 2000.5}
    for bad in (["ttft"], ["foo:1"], ["tpot:-1"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)


def test_table_layout_like_vllm():
    table = format_table(calculate_metrics(_outputs(), 2.0, {"ttft": 150.0}))
    for line in ("============ Serving Benchmark Result ============", "Successful requests:",
                 "Benchmark duration (s):", "Request goodput (req/s):", "Mean TTFT (ms):", "P99 TPOT (ms):",
                 "---------------Inter-token Latency----------------", "Median E2EL (ms):",
                 "KV transfer bandwidth (Gbit/s):"):
        assert line in table
    assert "{:<40} {:<10}".format("Successful requests:", 2) in table


# datasets


def test_random_lengths_and_determinism():
    reqs = build_dataset({"dataset": "random", "num_prompts": 20, "input_len": 16, "output_len": 5}, VOCAB)
    assert len(reqs) == 20
    assert all(len(r.prompt_ids) == 16 and r.output_len == 5 for r in reqs)
    assert all(0 <= t < VOCAB for r in reqs for t in r.prompt_ids)
    spread = build_dataset({"num_prompts": 50, "input_len": 100, "output_len": 10, "range_ratio": 0.5}, VOCAB)
    assert all(50 <= len(r.prompt_ids) <= 150 and 5 <= r.output_len <= 15 for r in spread)
    assert len({len(r.prompt_ids) for r in spread}) > 1
    again = build_dataset({"dataset": "random", "num_prompts": 20, "input_len": 16, "output_len": 5}, VOCAB)
    assert [r.prompt_ids for r in again] == [r.prompt_ids for r in reqs]
    other = build_dataset({"num_prompts": 20, "input_len": 16, "output_len": 5, "seed": 1}, VOCAB)
    assert [r.prompt_ids for r in other] != [r.prompt_ids for r in reqs]


def test_shared_prefix_really_shared():
    opts = {"dataset": "shared-prefix", "num_groups": 3, "prompts_per_group": 4, "prefix_len": 32,
            "suffix_len": 8, "output_len": 4, "ignore_eos": True}
    reqs = build_dataset(opts, VOCAB)
    assert len(reqs) == 12 and all(len(r.prompt_ids) == 40 and r.ignore_eos for r in reqs)
    prefixes = {}
    for r in reqs:
        prefixes.setdefault(r.meta["group"], set()).add(tuple(r.prompt_ids[:32]))
    assert all(len(p) == 1 for p in prefixes.values())  # one prefix per group
    assert len({p.pop() for p in prefixes.values()}) == 3  # different across groups
    assert len({tuple(r.prompt_ids[32:]) for r in reqs}) == 12  # suffixes are the request's own
    assert [r.meta["group"] for r in reqs] != sorted(r.meta["group"] for r in reqs)  # interleaved
    assert [r.prompt_ids for r in build_dataset(opts, VOCAB)] == [r.prompt_ids for r in reqs]


def test_multi_turn_structure():
    reqs = build_dataset({"dataset": "multi-turn", "num_conversations": 3, "turns": 2, "input_len": 6}, VOCAB)
    assert [(r.turn, r.conversation) for r in reqs] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert all(len(r.prompt_ids) == 6 and r.output_len == 128 for r in reqs)
    # first_input_len: each conversation's turn 0 opens with its own longer context; later turns as before
    opened = build_dataset({"dataset": "multi-turn", "num_conversations": 3, "turns": 2, "input_len": 6,
                            "first_input_len": 40}, VOCAB)
    assert [len(r.prompt_ids) for r in opened] == [40, 40, 40, 6, 6, 6]
    assert len({tuple(r.prompt_ids) for r in opened[:3]}) == 3


def test_mixed_long_fraction():
    reqs = build_dataset({"dataset": "mixed", "num_prompts": 20, "long_fraction": 0.25, "input_len": 8,
                          "long_input_len": 64}, VOCAB)
    longs = [r for r in reqs if r.meta["long"]]
    assert len(longs) == 5 and all(len(r.prompt_ids) == 64 for r in longs)
    assert all(len(r.prompt_ids) == 8 for r in reqs if not r.meta["long"])


def test_sharegpt(tmp_path):
    words = lambda n: " ".join(["w"] * n)  # noqa: E731
    data = [
        {"id": "ok", "conversations": [{"from": "human", "value": words(5)}, {"from": "gpt", "value": words(7)}]},
        {"id": "sys", "conversations": [{"from": "system", "value": "be nice"}, {"from": "human", "value": words(6)},
                                        {"from": "gpt", "value": words(9)}]},
        {"id": "short-reply", "conversations": [{"from": "human", "value": words(8)},
                                                {"from": "gpt", "value": words(2)}]},
        {"id": "short-prompt", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": words(9)}]},
        {"id": "one-turn", "conversations": [{"from": "human", "value": words(9)}]},
    ]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(data))
    reqs = build_dataset({"dataset": f"sharegpt:{path}", "num_prompts": 10}, VOCAB)
    assert sorted((len(r.prompt_text.split()), r.output_len) for r in reqs) == [(5, 7), (6, 9)]
    assert all(r.prompt_ids is None for r in reqs)
    fixed = build_dataset({"dataset": f"sharegpt:{path}", "num_prompts": 10, "output_len": 3}, VOCAB)
    assert sorted(len(r.prompt_text.split()) for r in fixed) == [5, 6, 8]  # reply length no longer checked
    assert all(r.output_len == 3 for r in fixed)
    assert len(build_dataset({"dataset": f"sharegpt:{path}", "num_prompts": 1}, VOCAB)) == 1


def test_cli_namespace_builds_every_dataset():
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    for name in ("random", "shared-prefix", "multi-turn", "mixed"):
        args = parser.parse_args(["--dataset", name, "--num-prompts", "4", "--input-len", "8",
                                  "--long-input-len", "16", "--prefix-len", "8", "--ignore-eos"])
        reqs = build_dataset(args, VOCAB)
        assert reqs and all(isinstance(r, BenchRequest) and r.ignore_eos for r in reqs)
    with pytest.raises(SystemExit):
        parser.parse_args(["--dataset", "nope"])


@pytest.mark.parametrize("flag, value, says", [("--output-len", "0", ">= 1, got 0"), ("--input-len", "-10", ">= 1"),
                                               ("--num-prompts", "-5", ">= 1"), ("--seed", "-1", ">= 0")])
def test_bad_counts_are_named_errors_before_anything_connects(flag, value, says, capsys):
    """--output-len 0 and --input-len -10 became 1-token lengths without a word; --num-prompts -5 surfaced as
    numpy's "negative dimensions are not allowed". Now exit 2 naming the flag, before the server is asked."""
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args(["--dataset", "random", "--addr", "127.0.0.1:1", flag, value])
    assert serve.main(args) == 2
    assert f"bench serve: {flag} must be an integer {says}" in capsys.readouterr().err


def test_plot_comparison_writes_png(tmp_path):
    result = calculate_metrics(_outputs(), 2.0, {"ttft": 150.0})
    empty = calculate_metrics([StreamRecorder(0.0, 3).fail("UNAVAILABLE", 0.1)], 1.0, None)
    path = tmp_path / "cmp.png"
    plot_comparison({"disagg": result, "colocated": empty}, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
