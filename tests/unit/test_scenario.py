"""bench scenario's pure parts with fake results: ratios, merging rounds, the --out layout, the table."""
import json

import pytest

from pdcluster.bench.scenario import SCENARIOS, Scenario, cluster
from pdcluster.bench.scenario_report import build_report, format_report, merge_results, ratios
from pdcluster.deploy.config import ClusterConfig


def fake(duration, ttfts, tpots, out_tokens, goodput, remote=0.0, kv_ms=None, hit=0.0):
    n = len(ttfts)
    r = dict(duration=duration, completed=n, failed=0, total_input_tokens=100 * n, total_output_tokens=out_tokens,
             kv_bytes_transferred=1000 * n if remote else 0, ttfts=list(ttfts), tpots=list(tpots),
             itls=list(tpots), e2els=[t + 100 for t in ttfts], input_lens=[100] * n, output_lens=[1] * n,
             request_goodput=goodput, prefix_cache_hit_rate=hit, remote_prefill_fraction=remote,
             mean_kv_transfer_ms=kv_ms, errors={}, request_rate=1.0, burstiness=1.0, max_concurrency=None)
    r.update(request_throughput=n / duration, output_throughput=out_tokens / duration,
             p99_tpot_ms=max(tpots), median_ttft_ms=sorted(ttfts)[n // 2])
    return r


SC = Scenario(name="t", summary="test",
              baseline=cluster(pools__decode__initial_replicas=2, pools__prefill__initial_replicas=0,
                               router__remote_prefill=False),
              candidate=ClusterConfig(), dataset={"dataset": "random", "num_prompts": 2}, request_rate=1.0,
              goodput={"tpot": 50.0}, metrics=("p99_tpot_ms", "median_ttft_ms", "request_goodput", "output_throughput"),
              labels=("colo", "disagg"))


def test_ratios_are_candidate_over_baseline_and_none_without_a_baseline():
    r = ratios({"a": 200.0, "b": 0.0, "c": 1.0, "d": None}, {"a": 100.0, "b": 5.0, "c": None, "d": 1.0},
               ("a", "b", "c", "d", "e"))
    assert r == {"a": 0.5, "b": None, "c": None, "d": None, "e": None}


def test_merge_pools_samples_and_divides_totals_by_summed_durations():
    a = fake(10.0, [100, 300], [20, 40], 50, goodput=0.1, remote=1.0, kv_ms=2.0, hit=0.5)
    b = fake(30.0, [200, 400], [10, 80], 150, goodput=0.0, remote=0.5, kv_ms=4.0, hit=0.0)
    m = merge_results([a, b])
    assert m["completed"] == 4 and m["duration"] == 40.0 and m["total_output_tokens"] == 200
    assert m["ttfts"] == [100, 300, 200, 400]
    assert m["output_throughput"] == 5.0 and m["request_throughput"] == 0.1
    assert m["request_goodput"] == pytest.approx(1 / 40)          # 1 good request in 40 s
    assert m["median_ttft_ms"] == 250.0 and m["mean_tpot_ms"] == 37.5
    assert m["prefix_cache_hit_rate"] == pytest.approx(0.25)
    assert m["remote_prefill_fraction"] == pytest.approx(0.75)     # 2 + 1 of 4
    assert m["mean_kv_transfer_ms"] == pytest.approx((2 * 2.0 + 1 * 4.0) / 3)
    assert merge_results([a, dict(b, request_goodput=None)])["request_goodput"] is None


def test_report_layout_is_json_and_ratios_use_merged_sides():
    base = [fake(10.0, [100, 300], [40, 60], 40, 0.1), fake(10.0, [100, 300], [40, 80], 40, 0.1)]
    cand = [fake(10.0, [200, 600], [20, 30], 40, 0.2), fake(10.0, [200, 600], [20, 40], 40, 0.2)]
    workers = {"baseline": [{"decode-0": {"busy_s": 5.0}}] * 2, "candidate": [{"prefill-0": {"busy_s": 1.0}}] * 2}
    rep = build_report(SC, dict(rounds=2, seed=0), base, cand, workers)
    rep = json.loads(json.dumps(rep))                                # plain JSON, no Infinity
    assert set(rep) == {"scenario", "baseline", "candidate", "ratios"}
    assert rep["scenario"]["name"] == "t" and rep["scenario"]["rounds"] == 2
    assert rep["baseline"]["label"] == "colo" and rep["candidate"]["label"] == "disagg"
    assert rep["baseline"]["config"]["pools"]["decode"]["initial_replicas"] == 2
    assert rep["candidate"]["config"]["router"]["remote_prefill"]
    assert len(rep["baseline"]["runs"]) == 2 and rep["baseline"]["runs"][1]["p99_tpot_ms"] == 80
    assert rep["candidate"]["workers"][0]["prefill-0"]["busy_s"] == 1.0
    assert set(rep["ratios"]) == set(SC.metrics)
    assert rep["ratios"]["median_ttft_ms"] == pytest.approx(rep["candidate"]["median_ttft_ms"]
                                                            / rep["baseline"]["median_ttft_ms"])
    assert rep["ratios"]["request_goodput"] == pytest.approx(2.0)
    assert rep["ratios"]["output_throughput"] == pytest.approx(1.0)
    assert len(rep["candidate"]["ttfts"]) == 4                      # samples kept for the plot
    table = format_report(rep)
    assert "baseline (colo)" in table and "candidate (disagg)" in table and "2.000x" in table
    assert table.count("round ") == 4


def test_registered_scenario_compares_same_cores():
    sc = SCENARIOS["colocated-vs-disagg"]
    b, c = sc.baseline, sc.candidate
    shape = lambda t: (t.router.remote_prefill, t.pools.prefill.initial_replicas,  # noqa: E731
                       t.pools.decode.initial_replicas)
    assert shape(b) == (False, 0, 2) and shape(c) == (True, 1, 1)
    assert b.engine.threads_per_worker == c.engine.threads_per_worker == 1
    assert sc.dataset["dataset"] == "mixed" and "tpot" in sc.goodput
    assert {"p99_tpot_ms", "p99_itl_ms", "request_goodput"} <= set(sc.metrics)


def leaves(tree, path=""):
    """{dotted path: value} of every leaf of a config tree."""
    import dataclasses
    out = {}
    for f in dataclasses.fields(tree):
        v = getattr(tree, f.name)
        out |= leaves(v, path + f.name + ".") if dataclasses.is_dataclass(v) else {path + f.name: v}
    return out


def test_placement_scenarios_are_registered_and_build():
    """prefix-routing, layerwise-transfer, selective-offload: each builds its workload and differs
    from its baseline only in what it compares."""
    from pdcluster.bench.datasets import build_dataset
    from pdcluster.bench.scenario import KV_BLOCK_BYTES
    for name, knob in (("prefix-routing", "router.policy"), ("layerwise-transfer", "kv.layerwise"),
                       ("selective-offload", "router.policy"), ("prefix-pull", "cost.peer_pull")):
        sc = SCENARIOS[name]
        b, c = leaves(sc.baseline), leaves(sc.candidate)
        assert {k for k in b if b[k] != c[k]} == {knob}, name
        reqs = build_dataset(dict(sc.dataset, seed=0), 1000)
        ds = sc.dataset
        assert len(reqs) == ds.get("num_prompts") or len(reqs) == ds["num_groups"] * ds["prompts_per_group"]
    pr = SCENARIOS["prefix-routing"]
    assert (pr.baseline.router.policy, pr.candidate.router.policy) == ("round-robin", "cost-model")
    blocks = pr.baseline.engine.cache.kv_cache_memory // KV_BLOCK_BYTES
    per_prefix = pr.dataset["prefix_len"] // 16
    assert 4 * per_prefix <= blocks < 5 * per_prefix          # about half of the 8 prefixes per worker
    lw = SCENARIOS["layerwise-transfer"]
    lens = [len(r.prompt_ids) for r in build_dataset(dict(lw.dataset, seed=0), 1000)]
    assert 512 <= min(lens) and max(lens) <= 2048 and lw.baseline.kv.bandwidth_limit
    so = SCENARIOS["selective-offload"]
    assert so.baseline.pools.prefill.zone != so.baseline.pools.decode.zone and so.baseline.kv.bandwidth_limit
    assert so.baseline.router.policy == "least-loaded" and so.baseline.router.local_prefill_max_tokens == 0
    assert so.baseline.cost.tpot_slo_s == 0.5
    assert so.dataset["dataset"] == "mixed" and "request_goodput" in so.metrics


def test_kv_link_says_which_throttle_ran():
    from pdcluster.bench.scenario import kv_link, link_mode
    cfg, notes = cluster(kv__bandwidth_limit=5e6), {}
    with kv_link(cfg, False, notes) as run_cfg:         # no shaped link: the transport's token bucket
        assert run_cfg is cfg
    with kv_link(ClusterConfig(), True, notes) as run_cfg:  # no throttle at all: nothing to say
        assert run_cfg.kv.link is None
    assert list(notes) == ["token bucket in the transport at 5.0 MB/s"]
    assert link_mode(SC) == (False, "")                  # SC throttles nothing
    assert SCENARIOS["layerwise-transfer"].shaped_link and SCENARIOS["selective-offload"].shaped_link
    base = [fake(10.0, [100, 300], [40, 60], 40, 0.1)]
    rep = build_report(SC, dict(rounds=1, seed=0, kv_link="token bucket in the transport at 5.0 MB/s"), base, base)
    assert "KV link: token bucket in the transport at 5.0 MB/s" in format_report(rep)


def test_prefix_breakdown_classes_each_request_against_earlier_holders():
    from types import SimpleNamespace

    from pdcluster.bench.prefix_breakdown import classify
    reqs = [SimpleNamespace(meta={"group": g}) for g in (0, 0, 1, 0, 1)]
    result = {"ttfts": [10, 20, 30, 40, 50], "decode_workers": ["a", "a", "b", "b", "b"],
              "cached_lens": [0, 384, 0, 0, 100]}
    kinds = classify(reqs, result, prefix_len=384)
    assert kinds == {"cold": [10, 30], "hit": [20], "miss, sent elsewhere": [40], "miss on a holder": [50]}


def test_ideal_hit_rate_counts_every_prompt_but_each_prefixs_first_in_whole_blocks():
    from types import SimpleNamespace

    from pdcluster.bench.prefix_breakdown import ideal_hit_rate
    reqs = [SimpleNamespace(meta={"group": g}, prompt_ids=[0] * n) for g, n in ((0, 40), (0, 40), (1, 40), (1, 33))]
    # prefix 32 tokens (2 blocks of 16): prompts 2 and 4 hit 32 tokens each; 4's last token is its 33rd
    assert ideal_hit_rate(reqs, prefix_len=32) == pytest.approx(64 / 153)
    short = [SimpleNamespace(meta={"group": 0}, prompt_ids=[0] * 32)] * 2      # a prompt that is only the prefix
    assert ideal_hit_rate(short, prefix_len=32) == pytest.approx(16 / 64)      # its last token always computes


# KV tier scenarios (issue 19 point 6)
def test_tier_scenarios_differ_only_by_the_candidates_tier_flags():
    from pdcluster.bench.scenario import FRESH_DIR
    for name in ("multi-turn", "trace-replay"):
        sc = SCENARIOS[name]
        assert leaves(sc.baseline) == leaves(sc.candidate), name       # same cluster; the flags add the tiers
        assert set(sc.candidate_flags) == {"--kv-host-cache-gb", "--kv-disk-cache-dir", "--kv-disk-cache-gb",
                                           "--peer-pull"}
        assert sc.candidate_flags["--kv-disk-cache-dir"] == FRESH_DIR
        assert sc.baseline.router.policy == "cost-model" and not sc.baseline.router.remote_prefill
        assert "mean_ttft_ms" in sc.metrics and "prefix_cache_hit_rate" in sc.metrics
    assert SCENARIOS["multi-turn"].dataset["dataset"] == "multi-turn"
    assert SCENARIOS["trace-replay"].dataset["dataset"].startswith("mooncake:")


def test_prefill_chunk_is_trace_replay_device_only_with_the_chunk_cap_alone():
    sc, tr = SCENARIOS["prefill-chunk"], SCENARIOS["trace-replay"]
    b, c = leaves(sc.baseline), leaves(sc.candidate)
    assert {k for k in b if b[k] != c[k]} == {"engine.sched.long_prefill_token_threshold"}
    assert b["engine.sched.long_prefill_token_threshold"] == 0 and c["engine.sched.long_prefill_token_threshold"] > 0
    assert leaves(tr.baseline) == b and not sc.candidate_flags and sc.dataset == tr.dataset


def test_candidate_flags_resolve_by_name_with_fresh_dirs_or_say_what_is_missing(tmp_path):
    import contextlib
    import os

    from pdcluster.bench.scenario import FRESH_DIR, side_config, with_flags
    assert with_flags(ClusterConfig(), {"--kv-cache-memory": 64}).engine.cache.kv_cache_memory == 64 * 2**20
    # a per-pool flag is set in both pools by its pool-less name
    both = with_flags(ClusterConfig(), {"--workers": 3})
    assert (both.pools.prefill.initial_replicas, both.pools.decode.initial_replicas) == (3, 3)
    with pytest.raises(ValueError, match="--no-such-flag"):
        with_flags(ClusterConfig(), {"--kv-cache-memory": 64, "--no-such-flag": 1})
    sc = Scenario(name="d", summary="", baseline=ClusterConfig(), candidate=ClusterConfig(), dataset={},
                  request_rate=1.0, goodput={}, metrics=(), candidate_flags={"--kv-cache-memory": 32})
    assert side_config(sc, "baseline") is sc.baseline
    assert side_config(sc, "candidate").engine.cache.kv_cache_memory == 32 * 2**20
    # FRESH_DIR: a new directory per run, removed with the run (the disk tier's dir flag)
    from dataclasses import replace
    sc2 = replace(sc, candidate_flags={"--kv-cache-memory": 32, "--model": FRESH_DIR})
    with contextlib.ExitStack() as dirs:
        made = side_config(sc2, "candidate", dirs).model
        assert os.path.isdir(made) and os.listdir(made) == [] and made != side_config(sc2, "candidate").model
    assert not os.path.exists(made)
    for name in ("trace-replay", "multi-turn"):                     # the tier flags reach the engine config
        with contextlib.ExitStack() as dirs:
            cand, base = side_config(SCENARIOS[name], "candidate", dirs).engine.cache, SCENARIOS[name].baseline
            assert cand.host_cache_gb > 0 and cand.disk_cache_gb > 0 and os.path.isdir(cand.disk_cache_dir)
            assert base.engine.cache.host_cache_gb == 0 and base.engine.cache.disk_cache_dir is None
            assert side_config(SCENARIOS[name], "candidate", dirs).cost.peer_pull and not base.cost.peer_pull
    # baseline_flags: tier-write's two sides are trace-replay's candidate, one storing on eviction only
    with contextlib.ExitStack() as dirs:
        wb, wt = (side_config(SCENARIOS["tier-write"], side, dirs).engine.cache for side in ("baseline", "candidate"))
        assert (wb.tier_write_through, wt.tier_write_through) == (False, True)
        assert wb.host_cache_gb == wt.host_cache_gb > 0 and os.path.isdir(wb.disk_cache_dir)
        assert wb.disk_cache_dir != wt.disk_cache_dir                 # each side its own fresh directory


def test_a_side_that_did_not_run_reports_not_run():
    base = [fake(10.0, [100, 300], [40, 60], 40, 0.1)]
    rep = json.loads(json.dumps(build_report(SC, dict(rounds=1, seed=0), base, [])))
    assert rep["candidate"]["not_run"] and rep["candidate"]["label"] == "disagg"
    assert set(rep["ratios"].values()) == {None} and rep["baseline"]["mean_ttft_ms"] == 200
    table = format_report(rep)
    assert "not run" in table and table.count("round ") == 1


def test_trace_scenario_builds_the_slice_from_the_trace_file(tmp_path):
    from dataclasses import replace

    from pdcluster.bench.scenario import scenario_requests
    p = tmp_path / "t.jsonl"
    p.write_text("".join(json.dumps({"timestamp": 1000 * i, "input_length": 700, "output_length": 64,
                                     "hash_ids": [0, 40 * i]}) + "\n" for i in range(6)))
    sc = SCENARIOS["trace-replay"]
    sc = replace(sc, dataset=dict(sc.dataset, dataset=f"mooncake:{p}", max_requests=2))
    reqs, vocab = scenario_requests(sc, seed=0)
    bs = sc.baseline.engine.cache.block_size
    assert len(reqs) == 2 and vocab == 49152
    assert len(reqs[0].prompt_ids) == bs + round(188 * bs / 512)    # one engine block per trace block
    assert reqs[0].prompt_ids[:bs] == reqs[1].prompt_ids[:bs]       # the shared block 0
    assert min(t for r in reqs for t in r.prompt_ids) > 16          # SmolLM2's added tokens are 0..16
    assert [r.arrival_s for r in reqs] == [0.0, 0.1]                # time_scale 0.1


def test_time_scale_overrides_a_trace_replay_and_is_refused_elsewhere():
    from pdcluster.bench.scenario import trace_override
    sc = trace_override(SCENARIOS["trace-replay"], "time_scale", 0.05)
    assert sc.dataset["time_scale"] == 0.05 and SCENARIOS["trace-replay"].dataset["time_scale"] == 0.1
    with pytest.raises(ValueError, match="--time-scale applies to a trace replay; multi-turn"):
        trace_override(SCENARIOS["multi-turn"], "time_scale", 0.05)


@pytest.mark.parametrize("name, says", [("trace-replay", "a trace replay: --max-requests"),
                                         ("multi-turn", "its conversations x turns")])
def test_num_prompts_is_refused_where_the_dataset_counts_otherwise(name, says, capsys):
    """Before, it was set and ignored: the run sent the scenario's own count."""
    from pdcluster.bench.scenario import main
    from pdcluster.deploy import cli
    a = cli.build_parser().parse_args(["bench", "scenario", name, "--num-prompts", "10"])
    assert main(a) == 2 and f"--num-prompts does not apply to {name} ({says})" in capsys.readouterr().err


def test_tier_counters_are_per_run_deltas_summed_over_runs_and_workers():
    from pdcluster.bench.scenario_report import tier_deltas, tier_totals
    from pdcluster.messages import TierFigures
    before = (TierFigures("host", capacity_blocks=10, hits=5, stored=7, blocks=7),)
    after = (TierFigures("host", capacity_blocks=10, hits=9, stored=10, evicted=2, blocks=8),
             TierFigures("disk", capacity_blocks=40, stored=3, blocks=3))       # a tier with no "before"
    d = tier_deltas(before, after)
    assert d["host"]["hits"] == 4 and d["host"]["stored"] == 3 and d["host"]["evicted"] == 2
    assert d["host"]["blocks"] == 8 and d["host"]["capacity_blocks"] == 10
    assert d["disk"]["stored"] == 3 and d["disk"]["hits"] == 0
    assert tier_deltas((), ()) == {}                                              # tiers off
    runs = [{"decode-0": {"tiers": d}, "decode-1": {"tiers": d}}, {"decode-0": {"tiers": {}}}]
    tot = tier_totals(runs)
    assert tot["host"]["hits"] == 8 and tot["disk"]["stored"] == 6
    base = [fake(10.0, [100, 300], [40, 60], 40, 0.1)]
    rep = build_report(SC, dict(rounds=1, seed=0), base, base, {"baseline": [{"d": {"tiers": {}}}],
                                                                "candidate": [runs[0]]})
    assert rep["baseline"]["tiers"] == {} and rep["candidate"]["tiers"]["host"]["hits"] == 8
    table = format_report(rep)
    assert "candidate tiers" in table and "host hits 8" in table and "baseline tiers" not in table


def test_the_peers_int4_sides_are_their_base_side_with_packed_gguf_weights_and_the_compiled_step():
    from dataclasses import replace

    from pdcluster.bench.peers import SIDE_LABELS, SIDES
    assert set(SIDE_LABELS) == set(SIDES)
    for base in ("disagg", "single"):
        fast = SIDES[f"{base}-int4"]
        assert (fast.engine.quantization, fast.engine.cpu_compile) == ("int4", True)
        assert replace(fast, engine=replace(fast.engine, quantization=SIDES[base].engine.quantization,
                                            cpu_compile=False)) == SIDES[base]


def test_the_peers_split_side_is_disagg_int4_with_a_bfloat16_float_prefill_pool():
    from dataclasses import replace

    from pdcluster.bench.peers import SIDES
    from pdcluster.deploy.pool_config import PoolConfig
    split, fast = SIDES["disagg-split"], SIDES["disagg-int4"]
    p = split.pools.prefill
    assert (p.quantization, p.dtype, p.cpu_compile) == ("none", "bfloat16", False)
    assert split.pools.decode == fast.pools.decode and split.pools.decode.quantization is None   # the engine's int4
    plain = replace(p, quantization=None, dtype=None, cpu_compile=None)
    assert plain == fast.pools.prefill and isinstance(plain, PoolConfig)
    assert replace(split, pools=replace(split.pools, prefill=plain)) == fast


def test_peers_never_measures_a_prompt_twice():
    """A server's prefix cache must not serve a repeat: each (seed, round, concurrency) gets prompts of its own,
    the same for every server in the round."""
    from pdcluster.bench.peers import WORKLOAD, measured_prompts
    seen = {}
    for seed in (11, 14):           # runs with nearby seeds against one llama-server (14's level 1 was 11's level 4)
        for rnd in range(2):
            got = measured_prompts(dict(WORKLOAD), 49152, seed, rnd, (1, 4, 16))
            assert got == measured_prompts(dict(WORKLOAD), 49152, seed, rnd, (1, 4, 16))     # every server alike
            for c, reqs in got.items():
                assert len(reqs) == WORKLOAD["num_prompts"]
                for r in reqs:
                    key = tuple(r.prompt_ids[:16])                  # no shared first block: no prefix hit
                    assert key not in seen, (seed, rnd, c, seen.get(key))
                    seen[key] = (seed, rnd, c)


def test_deploy_pools_cpu_yaml_is_the_peers_split_side():
    """The README's one-host config serves what `bench scenario peers --sides disagg-split-i8` measured."""
    from pathlib import Path

    from pdcluster.bench.peers import SIDES
    from pdcluster.deploy.pools import load_pools_config
    got = load_pools_config(Path(__file__).resolve().parents[2] / "deploy" / "pools-cpu.yaml")
    want = SIDES["disagg-split-i8"]
    for role in ("prefill", "decode"):
        keys = ("quantization", "dtype", "cpu_compile", "block_size", "kv_cache_dtype", "speculative", "cpu_int8_rows")
        assert {k: got.engine_kwargs(role)[k] for k in keys} == {k: want.engine_kwargs(role)[k] for k in keys}
        assert got.threads(role) == want.threads(role) == 1
    assert got.engine_kwargs("prefill")["dtype"] == "bfloat16" and got.engine_kwargs("decode")["quantization"] == "int4"
    assert got.engine_kwargs("decode")["cpu_int8_rows"] == 12
    assert (got.pools.prefill.initial_replicas, got.pools.decode.initial_replicas) == (1, 1)


def test_slo_admission_differs_from_its_baseline_in_the_admission_bound_alone():
    sc = SCENARIOS["slo-admission"]
    b, c = leaves(sc.baseline), leaves(sc.candidate)
    assert {k for k in b if b[k] != c[k]} == {"router.admit_ttft_s"}
    assert b["router.admit_ttft_s"] is None and c["router.admit_ttft_s"] * 1e3 == sc.goodput["ttft"]
    assert not sc.candidate_flags and b["router.policy"] == "cost-model" and "request_goodput" in sc.metrics
