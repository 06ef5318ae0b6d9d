"""bench/sim_studies.py's edges: bad inputs end with a usage error (exit 2), not a traceback, and
study (c)'s plot draws each pool's replica line from that pool's own start size to the run's end."""
import json

import pytest

from pdcluster.bench.sim_studies import main, replica_steps


@pytest.mark.parametrize("argv, says", [
    (["--rates", "1,-1"], "rate scales must be > 0"),
    (["--duration-s", "0"], "no requests in the first 0 s"),
    # each of these was a traceback (ValueError, IndexError, KeyError, AttributeError) or ran nothing
    (["--model", "bogus"], "unknown model 'bogus'"),
    (["--c-static", "3"], "--c-static takes P,D"),
    (["--c-static", "3,x"], "--c-static takes P,D"),
    (["--b-dynamo-busy", "x"], "--b-dynamo-busy takes TOKENS[:BLOCKS]"),
    (["--c-min", "5", "--c-max", "3"], "need 1 <= --c-min (5) <= --c-max (3)"),
    (["--plot-from", "r.json"], "give --plot PNG"),
    (["--studies", "a,zzz"], "--studies: unknown zzz"),
])
def test_bad_inputs_are_usage_errors(tmp_path, capsys, argv, says):
    trace = tmp_path / "t.jsonl"
    trace.write_text(json.dumps({"timestamp": 0, "input_length": 600, "output_length": 4, "hash_ids": [1, 2]}) + "\n")
    with pytest.raises(SystemExit) as e:
        main(["--trace", str(trace), "--studies", "a"] + argv)
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_an_empty_trace_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SystemExit) as e:
        main(["--trace", str(tmp_path / "empty.jsonl"), "--studies", "a"])
    assert e.value.code == 2 and "no requests" in capsys.readouterr().err


def test_the_decode_replica_line_starts_at_the_decode_pools_minimum():
    c = {"args_min": 2, "decode_min": 1}
    log = [(100.0, "decode", 1, 2), (150.0, "prefill", 1, 3)]
    assert replica_steps(c, log, "decode") == ([0.0, 100.0], [1, 2])     # it started at 1, not --c-auto-min's 2
    assert replica_steps(c, log, "prefill") == ([0.0, 150.0], [2, 3])


def test_each_replica_line_runs_to_the_end_of_the_run():
    """Lines stopped at each pool's last action; a pool that never scaled drew a single, invisible point."""
    c = {"args_min": 2}
    log = [(75.0, "prefill", 1, 3)]
    assert replica_steps(c, log, "prefill", 120.0) == ([0.0, 75.0, 120.0], [2, 3, 3])
    assert replica_steps(c, log, "decode", 120.0) == ([0.0, 120.0], [2, 2])
