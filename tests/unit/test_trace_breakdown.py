"""bench/trace_breakdown.py: a trace replay's TTFTs split into own prefill and waiting, and the long waits that
placement could have spread."""
import json

import pytest

from pdcluster.bench import trace_breakdown as tb
from pdcluster.bench.load_curve import arrivals


@pytest.fixture
def trace(tmp_path):
    p = tmp_path / "t.jsonl"        # 4 requests, 1 s of trace time apart
    p.write_text("".join(json.dumps({"timestamp": 1000 * i, "input_length": 16, "output_length": 2,
                                     "hash_ids": [i]}) + "\n" for i in range(4)))
    return p


def side(ttfts_ms, inputs, cached, workers, prefill_s=1.0, prefill_tokens=1000, rounds=1, failed=0):
    return {"ttfts": ttfts_ms, "input_lens": inputs, "cached_lens": cached, "decode_workers": workers,
            "runs": [{"failed": failed}] * rounds,
            "workers": [{"w0": {"engine": {"prefill_s": prefill_s, "prefill_tokens": prefill_tokens}}}]}


def dataset(trace, time_scale=1.0):
    return {"dataset": f"mooncake:{trace}", "time_scale": time_scale, "start": 0, "max_requests": 4,
            "conversation_sample": 1}


def test_arrivals_follow_the_trace_and_its_time_scale(trace):
    assert arrivals(dataset(trace, 0.5)) == [0.0, 0.5, 1.0, 1.5]


def test_own_prefill_is_computed_tokens_at_the_measured_rate_and_the_rest_is_waiting(trace):
    # 1 ms a token; request 0 computes 100 tokens in 300 ms (200 waiting), request 3 computes 2000 in 1,500 (capped)
    s = side([300.0, 50.0, 400.0, 1500.0], [100, 40, 300, 2000], [0, 0, 0, 0], ["a", "a", "b", "b"])
    b = tb.breakdown(s, arrivals(dataset(trace)), long_wait_s=0.5)
    assert b["prefill_ms_per_token"] == pytest.approx(1.0)
    assert b["own_share"] == pytest.approx((100 + 40 + 300 + 1500) / 2250)
    first = b["bins"][0]
    assert (first["lo"], first["hi"], first["n"]) == (0, 64, 1) and first["wait_ms"] == pytest.approx(10.0)
    assert [x["n"] for x in b["bins"]] == [1, 1, 1, 1] and b["bins"][-1]["hi"] is None
    assert b["long_wait_s"] == 0.0                                       # no wait reached 0.5 s


def test_a_long_wait_counts_as_spreadable_only_while_another_worker_had_nothing_in_prefill(trace):
    # 1 ms a token. Request 1 (t=1 s, worker a) waits 1.9 s while worker b's request 0 (t=0, 1.5 s to its first
    # token) is in flight: not spreadable. Requests 0 (t=0) and 3 (t=3) wait 1.49 and 1.9 s with the other idle.
    s = side([1500.0, 2000.0, 100.0, 2000.0], [10, 100, 10, 100], [0, 0, 0, 0], ["b", "a", "a", "a"])
    b = tb.breakdown(s, arrivals(dataset(trace)), long_wait_s=0.5)
    assert b["long_wait_s"] == pytest.approx(1.49 + 1.9 + 1.9)           # requests 0, 1 and 3 (2 waits 0.09 s)
    assert b["long_wait_other_free_s"] == pytest.approx(1.49 + 1.9)      # 0 (a idle at t=0) and 3 (b done by 3 s)


def test_a_result_that_is_not_whole_rounds_or_has_failures_is_refused(trace):
    s = side([1.0] * 3, [1] * 3, [0] * 3, ["a"] * 3)
    with pytest.raises(ValueError, match="3 TTFTs are not 1 rounds of 4 requests"):
        tb.breakdown(s, arrivals(dataset(trace)), 0.5)
    # 2 rounds of 4 with 2 failures each leave 4 samples: before, read as 1 whole round on the wrong arrivals
    s = side([1.0] * 4, [1] * 4, [0] * 4, ["a"] * 4, rounds=2, failed=2)
    with pytest.raises(ValueError, match="4 requests failed"):
        tb.breakdown(s, arrivals(dataset(trace)), 0.5)


def test_the_command_prints_both_sides_and_refuses_other_scenarios(trace, tmp_path, capsys):
    s = side([300.0, 50.0, 400.0, 1500.0], [100, 40, 300, 2000], [0, 0, 0, 0], ["a", "a", "b", "b"])
    res = {"scenario": {"name": "trace-replay", "labels": ["device-only", "kv-tiers"], "dataset": dataset(trace)},
           "baseline": s, "candidate": s}
    p = tmp_path / "r.json"
    p.write_text(json.dumps(res))
    assert tb.main([str(p)]) == 0
    out = capsys.readouterr().out
    assert "device-only (1 rounds)" in out and "kv-tiers (1 rounds)" in out and "waits over 0.5 s" in out
    res["scenario"]["dataset"] = {"dataset": "multi-turn"}
    p.write_text(json.dumps(res))
    assert tb.main([str(p)]) == 2


def test_a_side_not_run_is_skipped_and_a_refused_side_is_one_line(trace, tmp_path, capsys):
    """`bench scenario --only` leaves one side not run; a side with failed requests cannot be broken
    down: both ended in a traceback."""
    s = side([300.0, 50.0, 400.0, 1500.0], [100, 40, 300, 2000], [0, 0, 0, 0], ["a", "a", "b", "b"])
    res = {"scenario": {"name": "trace-replay", "labels": ["device-only", "kv-tiers"], "dataset": dataset(trace)},
           "baseline": s, "candidate": {"not_run": True, "runs": []}}
    p = tmp_path / "r.json"
    p.write_text(json.dumps(res))
    assert tb.main([str(p)]) == 0
    assert "device-only (1 rounds)" in capsys.readouterr().out
    res["candidate"] = side([300.0, 50.0], [100, 40], [0, 0], ["a", "a"], failed=2)
    p.write_text(json.dumps(res))
    assert tb.main([str(p)]) == 2
    assert "kv-tiers: 2 requests failed" in capsys.readouterr().err
