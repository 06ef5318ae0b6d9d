"""`pdcluster plan`: SLO parsing, names case-insensitive, bad input, and its pools.yaml read back by the
real config loader. The search runs the simulator on a tiny trace (a second or so)."""
import dataclasses
import json

import pytest

from pdcluster.deploy import cli
from pdcluster.deploy.pools import load_pools_config
from pdcluster.sim.plan import parse_slo

pytestmark = pytest.mark.timeout(120)


def test_parse_slo():
    assert parse_slo("ttft:2000,tpot:50") == (2.0, 0.05)
    assert parse_slo("TPOT:40, TTFT:500") == (0.5, 0.04)
    for bad in ("ttft:2000", "ttft:x,tpot:5", "ttft:0,tpot:5", "ttft:1,tpot:2,ttft:3", "latency:3,tpot:4"):
        with pytest.raises(ValueError, match="slo"):
            parse_slo(bad)


@pytest.fixture
def trace(tmp_path):
    p = tmp_path / "t.jsonl"
    rows = [dict(timestamp=i * 250, input_length=3000 + 500 * (i % 5), output_length=40 + i % 7,
                 hash_ids=[0, i % 6, 100 + i]) for i in range(80)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def test_plan_writes_a_pools_yaml_serve_accepts(trace, tmp_path, capsys):
    out = tmp_path / "pools.yaml"
    rc = cli.main(["plan", "--trace", trace, "--model", "llama-3-8b", "--prefill-hw", "h200", "--decode-hw", "h20",
                   "--slo", "ttft:2000,tpot:50", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "best:" in text and "predicted goodput" in text and "$" in text
    cfg = load_pools_config(out)                  # what `pdcluster serve --config` runs
    best = text.split("best: ")[1]
    n_p, n_d = int(best.split(" x H200")[0]), int(best.split("+ ")[1].split(" x H20")[0])
    assert (cfg.pools.prefill.initial_replicas, cfg.pools.decode.initial_replicas) == (n_p, n_d)
    assert cfg.pools.prefill.lo == cfg.pools.prefill.hi == n_p and cfg.router.policy == "cost-model"
    assert cfg.pools.prefill.autoscale.signal == "p90_ttft" and cfg.pools.prefill.autoscale.ttft_slo_ms == 2000
    assert cfg.pools.decode.autoscale.tpot_slo_ms == 50


def test_plan_budget_and_bad_input(trace, capsys):
    assert cli.main(["plan", "--trace", trace, "--model", "LLAMA-3-8B", "--budget", "1"]) == 1    # nothing fits $1/h
    assert "no configuration of at most 64 instances fits the budget ($1/h)" in capsys.readouterr().err
    for argv, msg in ((["--model", "gpt-9"], "unknown model"),
                      (["--model", "llama-3-8b", "--max-instances", "1"], "--max-instances must be >= 2"),
                      (["--model", "llama-3-8b", "--rate-scale", "nan"], "--rate-scale must be a finite number"),
                      (["--model", "llama-3-8b", "--admit-ttft", "nan"], "--admit-ttft must be a finite number"),
                      (["--model", "llama-3-8b", "--out", "/nonexistent/dir/pools.yaml"], "its directory does not"),
                      (["--model", "llama-3-8b", "--prefill-hw", "tpu"],
                      "unknown hardware"), (["--model", "llama-3-8b", "--slo", "ttft:5"], "slo"),
                      (["--model", "llama-3-8b", "--validate"], "--validate runs the local cluster's model"),
                      (["--validate", "--validate-max-requests", "0"], "must be >= 1")):
        assert cli.main(["plan", "--trace", trace, *argv]) == 2
        assert msg in capsys.readouterr().err


def test_plan_with_cache_tiers_writes_them_per_pool(trace, tmp_path, capsys):
    out = tmp_path / "pools.yaml"
    rc = cli.main(["plan", "--trace", trace, "--model", "llama-3-8b", "--host-cache-gb", "200", "--disk-cache-gb", "1024",
                   "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    cfg = load_pools_config(out)                  # the real loader reads the simulated tiers back
    for pool in (cfg.pools.prefill, cfg.pools.decode):
        assert pool.kv_tiers.host_cache_gb == 200 and pool.kv_tiers.disk_cache_gb == 1024
        assert pool.kv_tiers.disk_cache_dir
    assert cli.main(["plan", "--trace", trace, "--model", "llama-3-8b", "--host-cache-gb", "-1"]) == 2
    assert "--host-cache-gb" in capsys.readouterr().err


def test_plan_for_a_router_with_slo_admission_writes_it_into_pools_yaml(trace, tmp_path, capsys):
    """--admit-ttft: the simulated router refuses what it expects past the TTFT bound, and the written
    pools.yaml carries the bound (router.admit_ttft_s) for `serve --config`; a bad value is refused."""
    out = tmp_path / "pools.yaml"
    rc = cli.main(["plan", "--trace", trace, "--model", "llama-3-8b", "--admit-ttft", "2", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "--admit-ttft 2" in text and "best:" in text
    assert load_pools_config(out).router.admit_ttft_s == 2.0
    assert cli.main(["plan", "--trace", trace, "--model", "llama-3-8b", "--admit-ttft", "-1"]) == 2
    assert "--admit-ttft" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("router:\n  admit_ttft_s: 0\n")
    with pytest.raises(Exception, match=r"router\.admit_ttft_s: must be > 0"):
        load_pools_config(bad)
    ok = tmp_path / "off.yaml"
    ok.write_text("router:\n  admit_ttft_s: null\n")
    assert load_pools_config(ok).router.admit_ttft_s is None


def test_the_deployed_router_prices_local_prefills_as_planned(trace, tmp_path, capsys):
    """plan simulated the cost model's TPOT guard at the plan's TPOT SLO over the decode engine's step budget
    (2048 prompt tokens a step), while the router `serve --config` started ran the defaults: 0.25 s and 512.
    pools.yaml now carries router.tpot_slo_s, and the cluster gives the cost model its decode engine's chunk."""
    from pdcluster.deploy.config import ClusterConfig
    from pdcluster.sim.cluster import SimConfig
    out = tmp_path / "pools.yaml"
    argv = ["plan", "--trace", trace, "--model", "llama-3-8b", "--slo", "ttft:2000,tpot:50", "--out", str(out)]
    assert cli.main(argv) == 0
    cfg = load_pools_config(out)
    assert cfg.cost.tpot_slo_s == 0.05
    assert cfg.local_chunk_tokens == SimConfig.local_chunk_tokens == 2048
    assert ClusterConfig().local_chunk_tokens == 2048
    e = ClusterConfig().engine
    sched = dataclasses.replace(e.sched, long_prefill_token_threshold=256)
    capped = ClusterConfig(engine=dataclasses.replace(e, sched=sched))
    assert capped.local_chunk_tokens == 256
    off = tmp_path / "off.yaml"
    off.write_text("router:\n  tpot_slo_s: null\n")
    assert load_pools_config(off).cost.tpot_slo_s is None
    off.write_text("router:\n  tpot_slo_s: -1\n")
    with pytest.raises(Exception, match=r"router\.tpot_slo_s: must be > 0"):
        load_pools_config(off)
