"""bench/load_curve.py: a trace scenario's results at several time scales, their offered rates and pooled rounds."""
import json

import pytest

from pdcluster.bench import load_curve


def result(trace, time_scale, base_rounds, cand_rounds, name="trace-replay", cand_completed=None, cand_failed=0):
    def side(rounds, completed=None, failed=0):
        completed = completed or [10] * len(rounds)
        return {"runs": [{"mean_ttft_ms": m, "completed": n, "failed": failed} for m, n in zip(rounds, completed)],
                "request_throughput": 1.0}
    return {"scenario": {"name": name, "labels": ["device-only", "kv-tiers"],
                         "dataset": {"dataset": f"mooncake:{trace}", "time_scale": time_scale, "start": 0,
                                     "max_requests": 4, "conversation_sample": 1}},
            "baseline": side(base_rounds), "candidate": side(cand_rounds, cand_completed, cand_failed)}


@pytest.fixture
def trace(tmp_path):
    p = tmp_path / "t.jsonl"        # 5 lines 1 s apart; the replay keeps 4: 3 s of trace time
    p.write_text("".join(json.dumps({"timestamp": 1000 * i, "input_length": 16, "output_length": 2,
                                     "hash_ids": [i]}) + "\n" for i in range(5)))
    return p


def test_the_offered_rate_is_the_replayed_requests_over_their_arrival_span(trace):
    p = load_curve.point(result(trace, 0.5, [300.0], [100.0]))
    assert p["offered"] == pytest.approx(4 / 1.5) and p["time_scale"] == 0.5


def test_results_at_one_time_scale_pool_their_rounds_and_sort_by_load(trace):
    pts = load_curve.merge([load_curve.point(result(trace, 1.0, [300.0, 500.0], [100.0, 100.0])),
                            load_curve.point(result(trace, 0.5, [900.0], [300.0])),
                            load_curve.point(result(trace, 1.0, [400.0], [200.0]))])
    assert [p["time_scale"] for p in pts] == [1.0, 0.5]                     # 1.33 then 2.67 req/s
    assert pts[0]["baseline"]["rounds"] == [300.0, 500.0, 400.0]
    assert pts[0]["candidate"]["mean"] == pytest.approx(400 / 3)
    assert pts[0]["ratio"] == pytest.approx(400 / (400 / 3)) and pts[1]["ratio"] == pytest.approx(3.0)


def test_the_command_prints_the_table_and_refuses_other_scenarios(trace, tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(result(trace, 1.0, [300.0], [100.0])))
    b.write_text(json.dumps(result(trace, 0.5, [900.0], [300.0], name="tier-write")))
    assert load_curve.main([str(a), "--capacity", "device-only=2"]) == 0
    out = capsys.readouterr().out
    assert "3.00x" in out and "x1 offers 67%" in out
    with pytest.raises(SystemExit):
        load_curve.main([str(a), str(b)])                                  # two scenarios
    with pytest.raises(SystemExit):
        load_curve.main([str(a), "--capacity", "device-only"])             # no rate


def test_rounds_pool_by_the_requests_they_completed_and_an_empty_one_is_left_out(trace, tmp_path, capsys):
    """Before, the rounds' means were averaged: a round where every request failed (mean 0 ms) halved the
    candidate's mean and doubled the ratio, and the failures were not shown."""
    pts = load_curve.merge([load_curve.point(result(trace, 1.0, [300.0, 300.0], [200.0, 0.0],
                                                    cand_completed=[10, 0], cand_failed=5)),
                            load_curve.point(result(trace, 1.0, [300.0], [100.0], cand_completed=[30]))])
    assert pts[0]["candidate"]["rounds"] == [200.0, 100.0] and pts[0]["candidate"]["failed"] == 10
    assert pts[0]["candidate"]["mean"] == pytest.approx((200 * 10 + 100 * 30) / 40)
    a = tmp_path / "a.json"
    a.write_text(json.dumps(result(trace, 1.0, [300.0], [100.0, 0.0], cand_completed=[10, 0], cand_failed=4)))
    assert load_curve.main([str(a)]) == 0
    assert "3.00x   failed: 0 / 8" in capsys.readouterr().out


def test_results_without_a_rate_or_a_side_are_usage_errors_not_tracebacks(trace, tmp_path):
    """A replay whose requests arrive over 0 s (time scale 0, one request) has no offered rate, and a
    `bench scenario --only` result has one side: each was a ZeroDivisionError or ValueError traceback."""
    one = result(trace, 1.0, [300.0], [100.0])
    one["scenario"]["dataset"]["max_requests"] = 1
    only = result(trace, 1.0, [300.0], [100.0])
    only["candidate"] = {"not_run": True, "runs": []}
    for r, said in ((result(trace, 0.0, [300.0], [100.0]), "arrive over 0 s"), (one, "arrive over 0 s"),
                    (only, "candidate side was not run")):
        with pytest.raises(ValueError, match=said):
            load_curve.point(r)
        p = tmp_path / "r.json"
        p.write_text(json.dumps(r))
        with pytest.raises(SystemExit) as e:
            load_curve.main([str(p)])
        assert e.value.code == 2
