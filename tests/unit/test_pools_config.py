"""deploy/pools.yaml -> the config tree: the shipped file, defaults, and errors naming key and line."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pdcluster.deploy.config import ClusterConfig, KVSection
from pdcluster.deploy.pools import PoolsConfigError, load_pools_config, parse_pools_config
from pdcluster.router.autoscaler import ScalingRule

SHIPPED = Path(__file__).resolve().parents[2] / "deploy" / "pools.yaml"
TEXT = SHIPPED.read_text()


def edited(old: str, new: str, text: str = TEXT, after: str = "") -> tuple[str, int]:
    """`text` with the first `old` (after the first `after`) replaced by `new`, and the 1-based line
    where the replacement starts."""
    i = text.index(old, text.index(after) if after else 0)
    return text[:i] + new + text[i + len(old):], text[:i].count("\n") + 1


def issues(text: str, tmp_path: Path) -> tuple[str, list]:
    p = tmp_path / "pools.yaml"
    p.write_text(text)
    with pytest.raises(PoolsConfigError) as ei:
        load_pools_config(p)
    return str(ei.value), [(i.key, i.line) for i in ei.value.issues]


# the shipped file

def test_shipped_file_loads():
    c = load_pools_config(SHIPPED)
    assert isinstance(c, ClusterConfig)
    assert c.model is None and c.server.port == 50051 and c.router.policy == "cost-model"
    p, d = c.pools.prefill, c.pools.decode
    assert p.min_replicas <= p.initial_replicas <= p.max_replicas
    assert d.min_replicas <= d.initial_replicas <= d.max_replicas
    assert p.autoscale.signal == "queued_prompt_tokens_per_replica" and p.autoscale.signal_target == 8192
    assert d.autoscale.signal == "kv_utilization" and 0 < d.autoscale.signal_target <= 1
    assert p.autoscale.scale_down_below < p.autoscale.scale_up_above
    assert p.autoscale.max_step == 2 and isinstance(p.autoscale.upscale_delay_s, float)


def test_tree_is_frozen():
    c = load_pools_config(SHIPPED)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.pools.prefill.max_replicas = 9
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.pools.decode.autoscale.target = 0.1


def test_the_file_lands_in_the_cluster_tree():
    c = load_pools_config(SHIPPED)
    assert (c.pools.prefill.initial_replicas, c.pools.decode.initial_replicas) == (1, 1)
    assert (c.pools.prefill.max_replicas, c.pools.decode.max_replicas) == (4, 4)
    assert c.server.host == "127.0.0.1" and c.server.port == 50051 and c.server.metrics_port == 9090
    assert c.threads("prefill") == c.threads("decode") == 2 and c.engine.use_gpu


def test_keys_the_file_leaves_out_keep_the_base():
    base = ClusterConfig(kv=KVSection(transport="grpc"))
    c = parse_pools_config("router: {port: 6000}\n", base=base)
    assert c.server.port == 6000 and c.kv.transport == "grpc" and c.server.metrics_port == base.server.metrics_port


def test_model_null_keeps_serves_model_and_a_path_overrides_it():
    """The shipped file's `model: null` discarded --model: `serve --model X --config deploy/pools.yaml` served the
    embedded model, while the pools' nulls kept serve's flags."""
    base = ClusterConfig(model="/models/x.gguf")
    assert load_pools_config(SHIPPED, base=base).model == "/models/x.gguf"
    assert parse_pools_config("model: /models/y.gguf\n", base=base).model == "/models/y.gguf"
    assert parse_pools_config("model: null\n").model is None          # no --model either: the embedded one


def test_per_pool_sizes_the_tree_cannot_express_name_key_and_line(tmp_path):
    text, line = edited("    cpus: 2\n    gpus: 1\n    threads: 2\n", "    cpus: 2\n    gpus: 0\n    threads: 2\n",
                        after="\ndecode:")
    with pytest.raises(ValueError, match="gpus: prefill 1 != decode 0"):
        parse_pools_config(text)
    assert issues(text, tmp_path)[1] == [("decode.resources.gpus", line + 1)]
    text, line = edited("    cpus: 2 ", "    cpus: 3 ")
    with pytest.raises(ValueError, match=r"prefill: resources.cpus \(3\) != resources.threads \(2\)"):
        parse_pools_config(text)
    assert issues(text, tmp_path)[1] == [("prefill.resources.cpus", line)]


def test_scaling_rules_match_the_file():
    c = load_pools_config(SHIPPED)
    r = c.pools.scaling_rules()
    assert r["prefill"] == ScalingRule(signal="queued_prompt_tokens_per_replica", target=8192.0, min_replicas=1,
                                       max_replicas=4, up_ratio=1.0, down_ratio=0.5, upscale_delay_s=30.0,
                                       downscale_delay_s=300.0, max_step=2, cooldown_s=120.0)
    assert r["decode"].signal == "kv_utilization" and r["decode"].target == 0.8


def test_latency_signal_uses_its_slo_as_target():
    text, _ = edited("signal: kv_utilization ", "signal: p90_tpot ")
    text, _ = edited("signal: queued_prompt_tokens_per_replica ", "signal: p90_ttft ", text)
    c = parse_pools_config(text).pools
    assert c.scaling_rules()["prefill"].target == 1000 and c.scaling_rules()["prefill"].signal == "p90_ttft"
    assert c.scaling_rules()["decode"].target == 50


def test_minimal_file_gets_defaults():
    c = parse_pools_config("prefill: {max_replicas: 3}\n")
    assert c.server.host == "127.0.0.1" and c.pools.autoscaler.enabled and c.pools.autoscaler.interval_s == 5.0
    p, d = c.pools.prefill, c.pools.decode
    assert (p.min_replicas, p.initial_replicas, p.max_replicas) == (1, 1, 3)
    assert d.max_replicas == 1 and d.autoscale.signal == "kv_utilization"
    assert p.autoscale.signal_target == 4096.0


# errors: key and line

@pytest.mark.parametrize("old,new,after,key,msg", [
    ("max_step: 2 ", "max_step: 0 ", "", "prefill.autoscale.max_step", "must be >= 1"),
    ("port: 50051", "port: 70000", "", "router.port", "must be in [0, 65535]"),
    ("target: 0.8 ", "target: 1.5 ", "", "decode.autoscale.target", "must be in (0, 1]"),
    ("gpus: 1 ", "gpus: 2 ", "", "prefill.resources.gpus", "must be in [0, 1]"),
    ("upscale_delay_s: 30 ", "upscale_delay_s: -1 ", "", "prefill.autoscale.upscale_delay_s", "must be >= 0"),
    ("initial_replicas: 1 ", "initial_replicas: 9 ", "", "prefill.initial_replicas", "[1, 4]"),
    ("max_replicas: 4", "max_replicas: 0", "\ndecode:", "decode.max_replicas", "must be >= 1"),
    ("scale_down_below: 0.5 ", "scale_down_below: 1.5 ", "", "prefill.autoscale.scale_down_below",
     "need scale_down_below < scale_up_above (got 1.5 and 1.0)"),
    ("cpus: 2 ", 'cpus: "2" ', "", "prefill.resources.cpus", "expected an integer"),
    ("enabled: true ", "enabled: 1 ", "", "autoscaler.enabled", "expected true or false"),
    ("policy: cost-model ", "policy: random ", "", "router.policy", "must be one of round-robin"),
    ("signal: kv_utilization ", "signal: p90_ttft ", "", "decode.autoscale.signal", "must be one of kv_utilization"),
    ("interval_s: 5 ", "interval_s: 0 ", "", "autoscaler.interval_s", "must be > 0"),
    ("target: 8192 ", "target: [1, 2] ", "", "prefill.autoscale.target", "expected a single value"),
    ("target: 8192 ", "target: 1e3 ", "", "prefill.autoscale.target", "expected a number (got '1e3')"),
    ("target: 8192 ", "target: 1" + "0" * 400 + " ", "", "prefill.autoscale.target", "expected a number"),  # no float
    ("target: 0.8 ", "target: 1.0 ", "", "decode.autoscale.target",       # kv_utilization never exceeds 1
     "could never scale up (need target x scale_up_above < 1)"),
])
def test_out_of_range_values_name_key_and_line(tmp_path, old, new, after, key, msg):
    text, line = edited(old, new, after=after)
    err, found = issues(text, tmp_path)
    assert found == [(key, line)], err
    assert f"pools.yaml:{line}: {key}: " in err and msg in err


def test_up_threshold_below_the_default_down_threshold(tmp_path):
    err, found = issues("decode:\n  autoscale:\n    scale_up_above: 0.4\n", tmp_path)
    assert found == [("decode.autoscale.scale_up_above", 3)] and "(got 0.5 and 0.4)" in err


def test_max_below_min_names_max_line(tmp_path):
    text, line = edited("  min_replicas: 1\n  max_replicas: 4\n", "  min_replicas: 3\n  max_replicas: 2\n")
    err, found = issues(text, tmp_path)
    assert found == [("prefill.max_replicas", line + 1), ("prefill.initial_replicas", line + 2)], err
    assert "must be >= min_replicas (3) (got 2)" in err and "[3, 2] (got 1)" in err


@pytest.mark.parametrize("old,new,key,offset", [
    ("  host: ", "  hots: ", "router.hots", 0),
    ("max_step: 2 ", "max_stp: 2 ", "prefill.autoscale.max_stp", 0),
    ("    threads: 2 ", "    gpu: 1\n    threads: 2 ", "prefill.resources.gpu", 0),
    ("model: null", "modle: null", "modle", 0),
    ("  min_replicas: 1\n", "  min_replicas: 1\n  replicas: 3\n", "prefill.replicas", 1),
])
def test_unknown_keys_name_key_and_line(tmp_path, old, new, key, offset):
    text, line = edited(old, new)
    err, found = issues(text, tmp_path)
    assert found == [(key, line + offset)], err
    assert "unknown key" in err


def test_slo_of_the_other_pool_is_refused(tmp_path):
    text, line = edited("    tpot_slo_ms: 50 ", "    ttft_slo_ms: 50 ")
    err, found = issues(text, tmp_path)
    assert found == [("decode.autoscale.ttft_slo_ms", line)] and "the decode latency target is tpot_slo_ms" in err


def test_latency_signal_without_its_slo(tmp_path):
    text, _ = edited("    ttft_slo_ms: 1000 ", "    # no slo ")
    text, line = edited("signal: queued_prompt_tokens_per_replica ", "signal: p90_ttft ", text)
    err, found = issues(text, tmp_path)
    assert found == [("prefill.autoscale.ttft_slo_ms", line)] and "required when signal is p90_ttft" in err


def test_repeated_key(tmp_path):
    text, line = edited("  port: 50051\n", "  port: 50051\n  port: 50052\n")
    err, found = issues(text, tmp_path)
    assert found == [("router.port", line + 1)] and f"first on line {line}" in err


def test_every_error_is_reported_in_line_order(tmp_path):
    text, l1 = edited("max_step: 1\n", "max_step: x\n")
    text, l2 = edited("port: 50051", "port: -1", text)
    text, l3 = edited("gpus: 1 ", "gpus: 3 ", text)
    err, found = issues(text, tmp_path)
    assert [ln for _, ln in found] == sorted([l1, l2, l3]) and len(err.splitlines()) == 3
    assert [k for k, _ in found] == ["router.port", "prefill.resources.gpus", "decode.autoscale.max_step"]


def test_section_of_the_wrong_shape(tmp_path):
    err, found = issues("router: [1]\nprefill: 3\n", tmp_path)
    assert found == [("router", 1), ("prefill", 2)] and "expected a mapping" in err


def test_syntax_error_has_a_line(tmp_path):
    err, found = issues("router:\n  port: 1\n bad indent: [\n", tmp_path)
    assert found and found[0][0] == "(syntax)" and found[0][1] >= 3


@pytest.mark.parametrize("text", ["# nothing\n", "~\n", "null  # the whole document\n"])
def test_empty_file(tmp_path, text):
    """A document that is only null sets nothing, as an empty one (it loaded as all defaults)."""
    err, found = issues(text, tmp_path)
    assert found == [("(top level)", 1)] and "empty" in err


def test_shaped_kv_link_needs_tcp_on_one_host():
    from pdcluster.deploy.netns import ShapedLink
    link = ShapedLink("ap", "ad", "10.231.0.1", "10.231.0.2", 1e6, 65536, 50.0)
    assert ClusterConfig(kv=KVSection(link=link)).kv.link is link
    with pytest.raises(ValueError, match="kv_transport 'tcp'"):
        ClusterConfig(kv=KVSection(link=link, transport="grpc"))
    with pytest.raises(ValueError, match="cluster on this host"):
        ClusterConfig(kv=KVSection(link=link), address="auto")


def test_worker_keywords_come_from_the_tree():
    from pdcluster.deploy.flags import dotted, override
    from pdcluster.deploy.launch import worker_kwargs
    c = override(ClusterConfig(), dotted(kv__transport="grpc", kv__transfer_timeout_s=10.0, timeouts__prefill_s=100.0,
                                         kv__compression="int8", pools__max_restarts=1))
    wk = worker_kwargs(c, "s" * 16)
    assert wk["prefill"]["transport"] == wk["decode"]["kv_transport"] == "grpc"
    assert wk["prefill"]["kv_compression"] == "int8" and wk["prefill"]["transfer_timeout_s"] == 10.0
    assert wk["decode"]["reservation_ttl_s"] == 100.0 + 2 * 10.0 and wk["decode"]["max_restarts"] == 1
    kw = c.engine.engine_kwargs(c.model)
    assert kw["block_size"] == c.engine.cache.block_size and kw["kv_cache_memory"] == 512 * 2**20


def test_kv_tiers_per_pool_and_by_flag_reach_the_workers(tmp_path):
    from pdcluster.deploy.flags import dotted, override
    base = override(ClusterConfig(), dotted(engine__cache__host_cache_gb=1.5))          # --kv-host-cache-gb 1.5
    c = load_pools_config(SHIPPED, base=base)                                           # shipped: all null
    assert c.engine_kwargs("decode")["host_cache_gb"] == 1.5 and c.engine_kwargs("decode")["disk_cache_dir"] is None
    text, _ = edited("    disk_cache_dir: null", f"    disk_cache_dir: {tmp_path}", after="\ndecode:")
    text, _ = edited("    disk_cache_gb: null", "    disk_cache_gb: 8", text, after="\ndecode:")
    text, _ = edited("    host_cache_gb: null", "    host_cache_gb: 0", text, after="\ndecode:")
    text, _ = edited("    tier_layerwise: null", "    tier_layerwise: false", text, after="\ndecode:")
    text, _ = edited("    tier_write_through: null", "    tier_write_through: false", text, after="\ndecode:")
    c = parse_pools_config(text, base=base)
    d, p = c.engine_kwargs("decode"), c.engine_kwargs("prefill")
    assert (d["host_cache_gb"], d["disk_cache_dir"], d["disk_cache_gb"]) == (0, str(tmp_path), 8)
    assert d["tier_layerwise"] is False and p["tier_layerwise"] is True              # the file's, the engine's
    assert (p["host_cache_gb"], p["disk_cache_dir"], p["disk_cache_gb"]) == (1.5, None, 0.0)
    from pdcluster.engine.config import CacheConfig
    fields = {f.name for f in dataclasses.fields(CacheConfig)}
    cache = CacheConfig(**{k: v for k, v in d.items() if k in fields})                 # what a worker builds
    from pdcluster.kv_transfer.tiers.attach import tier_config
    assert tier_config(cache).layerwise is False and tier_config(CacheConfig()).layerwise is True
    assert d["tier_write_through"] is False and p["tier_write_through"] is True
    assert tier_config(cache).write_through is False and tier_config(CacheConfig()).write_through is True


@pytest.mark.parametrize("old,new,key,msg", [
    ("    host_cache_gb: null", "    host_cache_gb: -1", "decode.kv_tiers.host_cache_gb", "must be >= 0"),
    ("    tier_codec: null", "    tier_codec: zip", "decode.kv_tiers.tier_codec", "must be one of none, int8, fp8"),
    ("    tier_layerwise: null", "    tier_layerwise: 1", "decode.kv_tiers.tier_layerwise", "expected true or false"),
    ("    tier_write_through: null", "    tier_write_through: yes please", "decode.kv_tiers.tier_write_through",
     "expected true or false"),
    ("    disk_cache_gb: null", "    disk_cache_gb: 4", "decode.kv_tiers", "needs both disk_cache_dir"),
])
def test_bad_kv_tiers_name_key_and_line(tmp_path, old, new, key, msg):
    text, line = edited(old, new, after="\ndecode:")
    err, found = issues(text, tmp_path)
    assert [k for k, _ in found] == [key] and msg in err, err


def test_kv_tier_flags_are_checked():
    from pdcluster.engine.config import CacheConfig
    with pytest.raises(ValueError, match="needs both"):
        CacheConfig(disk_cache_dir="/tmp/x")
    with pytest.raises(ValueError, match=">= 0"):
        CacheConfig(host_cache_gb=-0.5)
    with pytest.raises(ValueError, match="tier_codec"):
        CacheConfig(tier_codec="zip")
# per-pool engine tuning (issue 18 point 5)

def test_per_pool_engine_tuning_lands_in_each_pools_engine_kwargs():
    text = TEXT.replace("  dtype: null               # float32", "  dtype: bfloat16           # float32", 1)
    text, _ = edited("  kv_cache_dtype: null      # int8", "  kv_cache_dtype: int8      # int8", text=text)
    text, _ = edited("  max_num_seqs: null", "  max_num_seqs: 48", text=text, after="\ndecode:")
    text, _ = edited("    cpus: 2\n    gpus: 1\n    threads: 2\n", "    cpus: 1\n    gpus: 1\n    threads: 1\n",
                     text=text, after="\ndecode:")
    c = parse_pools_config(text)
    pre, dec = c.engine_kwargs("prefill"), c.engine_kwargs("decode")
    assert (pre["dtype"], pre["kv_cache_dtype"], pre["max_num_seqs"]) == ("bfloat16", "auto", 64)
    assert (dec["dtype"], dec["kv_cache_dtype"], dec["max_num_seqs"]) == ("float32", "int8", 48)
    assert (c.threads("prefill"), c.threads("decode")) == (2, 1)
    assert c.dtype_bytes("prefill") == 2 and c.block_size == 16


@pytest.mark.parametrize("old,new,key,message", [
    ("  kv_cache_dtype: null      # int8", "  kv_cache_dtype: int4      # int8", "decode.kv_cache_dtype",
     "must be one of auto, int8, fp8 or null"),
    ("  dtype: null               # float32", "  dtype: float64            # float32", "prefill.dtype",
     "must be one of float32, bfloat16, float16 or null"),
    ("  max_num_seqs: null        # most", "  max_num_seqs: 0           # most", "prefill.max_num_seqs",
     "must be >= 1"),
])
def test_bad_per_pool_tuning_names_key_and_line(tmp_path, old, new, key, message):
    text, line = edited(old, new)
    msg, found = issues(text, tmp_path)
    assert found == [(key, line)] and message in msg


def test_block_sizes_that_differ_are_refused_at_parse(tmp_path):
    text, line = edited("  block_size: null", "  block_size: 32", after="\ndecode:")
    msg, found = issues(text, tmp_path)
    assert found == [("decode.block_size", line)] and "re-blocking is not supported" in msg
    both = TEXT.replace("  block_size: null", "  block_size: 32")      # control: equal sizes are fine
    assert parse_pools_config(both).block_size == 32


def test_tree_checks_per_pool_values_built_without_the_file():
    from dataclasses import replace
    c = ClusterConfig()
    with pytest.raises(ValueError, match="re-blocking"):
        replace(c, pools=replace(c.pools, decode=replace(c.pools.decode, block_size=8)))
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        replace(c, pools=replace(c.pools, prefill=replace(c.pools.prefill, kv_cache_dtype="int3")))
    with pytest.raises(ValueError, match="cpu_int8_rows must be an integer >= 0"):
        replace(c, pools=replace(c.pools, decode=replace(c.pools.decode, cpu_int8_rows=-2)))
    with pytest.raises(ValueError, match="--cpu-int8-rows must be an integer >= 0"):   # serve --cpu-int8-rows -1
        replace(c, engine=replace(c.engine, cpu_int8_rows=-1))


def test_tree_checks_replica_bounds_and_signal_targets_built_without_the_file():
    """A tree built in code (bench/scenario.py's override) holds pools.yaml's rules too. Before, min 3 >
    max 2 and a latency signal without its SLO passed, failing later inside autoscaling_rules (a TypeError)."""
    from pdcluster.deploy.flags import dotted, override
    with pytest.raises(ValueError, match=r"decode pool: need 0 <= min_replicas \(3\) <= initial_replicas \(1\) "
                                         r"<= max_replicas \(2\)"):
        override(ClusterConfig(), dotted(pools__decode__min_replicas=3, pools__decode__max_replicas=2))
    with pytest.raises(ValueError, match="decode pool: autoscale signal p90_tpot needs tpot_slo_ms > 0, got None"):
        override(ClusterConfig(), dotted(pools__decode__autoscale__signal="p90_tpot"))
    ok = override(ClusterConfig(), dotted(pools__decode__autoscale__signal="p90_tpot",
                                          pools__decode__autoscale__tpot_slo_ms=80.0,
                                          pools__decode__min_replicas=1, pools__decode__max_replicas=3))
    assert {n: r.target for n, r in ok.pools.autoscaling_rules().items()} == {"decode": 80.0}


def test_cpu_compile_per_pool_over_the_flag():
    """pools.yaml's cpu_compile: the decode pool compiled, the prefill pool on serve's --cpu-compile (off)."""
    text, _ = edited("  cpu_compile: null", "  cpu_compile: true", after="\ndecode:")
    c = parse_pools_config(text)
    assert c.engine_kwargs("decode")["cpu_compile"] is True and c.engine_kwargs("prefill")["cpu_compile"] is False
    from pdcluster.deploy.flags import dotted, override
    on = override(ClusterConfig(), dotted(engine__cpu_compile=True))                     # --cpu-compile
    c = load_pools_config(SHIPPED, base=on)                                             # shipped: null
    assert c.engine_kwargs("decode")["cpu_compile"] is True and c.engine_kwargs("prefill")["cpu_compile"] is True


def test_cpu_int8_rows_per_pool_over_the_flag(tmp_path):
    """pools.yaml's cpu_int8_rows: the decode pool's wide steps on int8 copies, the prefill pool on the flag's 0."""
    text, _ = edited("  cpu_int8_rows: null", "  cpu_int8_rows: 10", after="\ndecode:")
    c = parse_pools_config(text)
    assert c.engine_kwargs("decode")["cpu_int8_rows"] == 10 and c.engine_kwargs("prefill")["cpu_int8_rows"] == 0
    from pdcluster.deploy.flags import dotted, override
    on = override(ClusterConfig(), dotted(engine__cpu_int8_rows=12))                     # --cpu-int8-rows 12
    c = load_pools_config(SHIPPED, base=on)                                             # shipped: null
    assert c.engine_kwargs("decode")["cpu_int8_rows"] == c.engine_kwargs("prefill")["cpu_int8_rows"] == 12
    text, line = edited("  cpu_int8_rows: null", "  cpu_int8_rows: -1", after="\ndecode:")
    msg, found = issues(text, tmp_path)
    assert found == [("decode.cpu_int8_rows", line)] and "must be >= 0" in msg, msg


def test_bad_cpu_compile_names_key_and_line(tmp_path):
    text, _ = edited("  cpu_compile: null", "  cpu_compile: yes please", after="\ndecode:")
    err, found = issues(text, tmp_path)
    assert [k for k, _ in found] == ["decode.cpu_compile"] and "expected true or false" in err, err


@pytest.mark.parametrize("flag, pool, want", [
    (3, "{min_replicas: 1, max_replicas: 4}", (1, 3, 4)),     # --decode-workers 3 inside the file's bounds
    (3, "{min_replicas: 1}", (1, 3, 3)),                      # an unset max is the flag's count
    (1, "{initial_replicas: 3}", (3, 3, 3)),                  # alone: a fixed pool of 3, not "[1, 1]"
    (5, "{max_replicas: 2}", (2, 2, 2)),                      # a count past the file's bound starts at it
    (1, "{min_replicas: 2}", (2, 2, 2)),
    (3, "{}", (3, 3, 3)),
])
def test_a_key_the_file_leaves_out_keeps_the_flags_worker_count(flag, pool, want):
    """README: "a key it leaves out keeps the flag's value"; before, `--decode-workers 3` with a file
    setting only bounds started min_replicas (1) workers."""
    from pdcluster.deploy.flags import dotted, override
    base = override(ClusterConfig(), dotted(pools__decode__initial_replicas=flag))
    d = parse_pools_config(f"decode: {pool}\n", base=base).pools.decode
    assert (d.lo, d.initial_replicas, d.hi) == want


@pytest.mark.parametrize("value", ["!foo 3", "!!int abc", "!!python/name:os.system x"])
def test_a_tag_the_parser_cannot_read_names_key_and_line(tmp_path, value):
    err, found = issues(f"decode:\n  max_replicas: {value}\n", tmp_path)
    assert found == [("decode.max_replicas", 2)] and "cannot read" in err, err


@pytest.mark.parametrize("path, value, flag", [
    ("pools__decode__initial_replicas", 0, "--decode-workers"),
    ("pools__prefill__initial_replicas", -1, "--prefill-workers"),
    ("engine__threads_per_worker", 0, "--threads-per-worker"), ("pools__max_restarts", -5, "--max-restarts"),
    ("server__shutdown_drain_s", -1.0, "--drain-timeout"), ("kv__transfer_timeout_s", 0.0, "--transfer-timeout"),
    ("server__port", 99999, "--port"), ("server__shutdown_drain_s", float("nan"), "--drain-timeout"),
])
def test_flag_values_out_of_range_are_refused_naming_the_flag(path, value, flag):
    """What the file's parser checks, the flags get too (a zero-worker decode pool never served)."""
    from pdcluster.deploy.flags import dotted, override
    with pytest.raises(ValueError, match=flag):
        override(ClusterConfig(), dotted(**{path: value}))


@pytest.mark.parametrize("text, line, says", [
    ("model: null\x00\n", 1, "character #x0000 is not allowed"),      # a ReaderError escaped as a traceback
    ("decode:\n  dtype: float32\x0c\n", 2, "character #x000c is not allowed"),
    ("model: " + "[" * 3000 + "]" * 3000 + "\n", 1, "nested too deeply"),    # a RecursionError did too
])
def test_text_yaml_cannot_read_is_a_config_error(text, line, says):
    with pytest.raises(PoolsConfigError) as e:
        parse_pools_config(text)
    assert e.value.issues[0].line == line and says in e.value.issues[0].message


def test_a_bare_off_is_the_choice_not_false():
    """YAML 1.1 reads a bare `off` as False: `speculative: off`, the value the shipped file's comment lists,
    was refused ("must be one of ngram, off or null (got False)")."""
    c = parse_pools_config("decode:\n  speculative: off\nprefill:\n  speculative: ngram\n")
    assert (c.pools.decode.speculative, c.pools.prefill.speculative) == ("off", "ngram")
    with pytest.raises(PoolsConfigError, match="must be one of"):
        parse_pools_config("decode:\n  speculative: yes\n")       # a bool that is no choice stays an error


def test_a_null_section_is_an_empty_one():
    """`kv_tiers:` with every child commented out (or `kv_tiers: null`: "null or absent: the engine's", as its
    doc says) was refused as "expected a mapping"; so was an empty `router:` or pool."""
    c = parse_pools_config("decode:\n  kv_tiers:\n  #  host_cache_gb: 1\nrouter: null\nprefill:\n")
    base = ClusterConfig()
    assert c.pools.decode.kv_tiers == base.pools.decode.kv_tiers and c.server == base.server
    assert c.pools.prefill == parse_pools_config("prefill: {}\n").pools.prefill     # as an empty mapping
