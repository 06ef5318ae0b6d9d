"""bench/trace_load.py: a trace replay's time scale for an offered load (a share of device-only's capacity on
the host that runs it), the probe of the host's prefill speed, and the busy share that says what a run's load
was; and `bench scenario --load`."""
import json
import math
from dataclasses import replace

import pytest

from pdcluster.bench import trace_load
from pdcluster.bench.datasets import BenchRequest
from pdcluster.bench.scenario import SCENARIOS, main
from pdcluster.bench.trace_load import at_load
from pdcluster.deploy import cli

pytestmark = pytest.mark.timeout(300)


def reqs(arrivals, lens=None):
    lens = lens or [10] * len(arrivals)
    return [BenchRequest(prompt_ids=list(range(n)), arrival_s=t) for t, n in zip(arrivals, lens)]


def test_the_time_scale_offers_the_load_asked_of_the_workers_capacity():
    r = reqs([0.0, 500.0, 1000.0])                  # 3 requests over 1,000 trace s
    s = trace_load.time_scale_for(0.5, r, workers=2, ms_per_token=2.0)
    busy_per_req = trace_load.WORKER_S_PER_PROBE_MS * 2.0
    offered = 3 / (1000 * s)                         # req/s at that time scale
    assert math.isclose(offered * busy_per_req / 2, 0.5)
    assert math.isclose(trace_load.time_scale_for(1.0, r, 2, 4.0), 2 * trace_load.time_scale_for(1.0, r, 2, 2.0))
    for bad in (0, -1, 11, float("nan")):
        with pytest.raises(ValueError, match="load must be in"):
            trace_load.time_scale_for(bad, r, 2, 2.0)
    with pytest.raises(ValueError, match="2 or more requests"):
        trace_load.time_scale_for(0.5, reqs([3.0, 3.0]), 2, 2.0)


def test_the_probe_takes_the_slices_length_quantiles():
    r = reqs([0.0] * 10, lens=[5, 50, 10, 40, 20, 30, 1, 2, 3, 4])
    assert [len(p) for p in trace_load.probe_prompts(r)] == [3, 5, 20, 40]


def test_busy_share_pools_runs_and_workers_and_is_none_without_figures():
    runs = [{"a": {"busy_s": 50.0}, "b": {"busy_s": 30.0}}, {"a": {"busy_s": 10.0}, "b": {"busy_s": 10.0}}]
    assert math.isclose(trace_load.busy_share(runs, [100.0, 50.0]), 100.0 / 300.0)
    assert trace_load.busy_share([{"a": {}}], [10.0]) is None and trace_load.busy_share([], []) is None


def test_the_probe_times_the_real_engine():
    ms = trace_load.probe_ms_per_token([list(range(100, 164)), list(range(200, 296))], repeats=1)
    assert 0.01 < ms < 100                           # ms a prompt token on one thread


def test_at_load_sets_a_trace_replays_time_scale_from_the_probe(tmp_path, monkeypatch):
    p = tmp_path / "t.jsonl"
    p.write_text("".join(json.dumps({"timestamp": 1000 * i, "input_length": 700, "output_length": 64,
                                     "hash_ids": [0, 40 * i]}) + "\n" for i in range(6)))
    sc = SCENARIOS["trace-replay"]
    sc = replace(sc, dataset=dict(sc.dataset, dataset=f"mooncake:{p}"))
    seen = []
    monkeypatch.setattr(trace_load, "probe_ms_per_token", lambda prompts: seen.append(prompts) or 3.0)
    got, cal = at_load(sc, 0.5, seed=0)
    want = 6 * trace_load.WORKER_S_PER_PROBE_MS * 3.0 / (5.0 * 0.5 * 2)      # 6 requests over 5 trace s, 2 workers
    assert math.isclose(got.dataset["time_scale"], want) and cal["load"] == 0.5 and cal["probe_ms_per_token"] == 3.0
    assert len(seen) == 1 and len(seen[0]) == len(trace_load.PROBE_PROMPTS)
    assert SCENARIOS["trace-replay"].load == 0.73 and SCENARIOS["slo-admission"].load == 1.1


@pytest.mark.parametrize("args, says", [
    (["multi-turn", "--load", "0.5"], "--load applies to a trace replay; multi-turn replays none"),
    (["trace-replay", "--load", "0.5", "--time-scale", "0.1"], "give --load or --time-scale, not both"),
])
def test_load_is_refused_where_it_cannot_apply(args, says, capsys):
    a = cli.build_parser().parse_args(["bench", "scenario", *args])
    assert main(a) == 2 and says in capsys.readouterr().err
