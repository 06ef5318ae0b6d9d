"""Every option of every command has help text and shows its default (on/off flags aside; an unset one says so)."""
import argparse

import pytest

from pdcluster.deploy import cli


def parsers() -> dict:
    out = {}

    def walk(p, name):
        out[name] = p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub, sp in a.choices.items():
                    walk(sp, f"{name} {sub}")
    walk(cli.build_parser(), "pdcluster")
    return out


@pytest.mark.parametrize("name", ["pdcluster serve", "pdcluster generate", "pdcluster bench serve", "pdcluster plan",
                                  "pdcluster bench scenario"])
def test_every_option_has_help_and_its_default(name, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")       # no wrapping inside a default
    p = parsers()[name]
    text = p.format_help()
    for a in p._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        assert a.help and a.help.strip(), (name, a.option_strings or a.dest)
        if a.option_strings and a.default is None:          # unset: its help says what happens then
            assert "default" in cli.HelpFormatter("x")._get_help_string(a).lower(), (name, a.option_strings)
        elif a.option_strings and a.default is not False:
            assert f"default: {a.default}" in text, (name, a.option_strings, a.default)


# serve's flags come from the config tree (deploy/flags.py)

SERVE_FLAGS = {     # every flag serve has (each one it had before the tree kept), with its default in the flag's units
    "--model": None, "--host": "127.0.0.1", "--port": 50051, "--prefill-workers": 1, "--decode-workers": 1,
    "--address": None, "--threads-per-worker": 1, "--gpu": False, "--enforce-eager": False, "--cpu-compile": False, "--cpu-int8-rows": 0, "--dtype": "float32", "--kv-cache-memory": 512,
    "--max-num-seqs": 64, "--max-num-batched-tokens": 2048, "--long-prefill-token-threshold": 0,
    "--max-model-len": None, "--local-prefill": False,
    "--local-prefill-max-tokens": 0, "--metrics-port": 9090, "--http-port": 8000, "--kv-transport": "tcp",
    "--kv-compression": "off", "--quantization": "none", "--kv-cache-dtype": "auto", "--speculative": "ngram",
    "--logprobs-mode": "raw_logprobs",
    "--kv-host-cache-gb": 0.0, "--kv-disk-cache-dir": None, "--kv-disk-cache-gb": 0.0, "--kv-tier-codec": "none", "--kv-tier-block-loads": False,
    "--kv-tier-write-back": False,
    "--policy": "cost-model", "--auth-token-file": None, "--tls-cert": None, "--tls-key": None,
    "--cluster-secret-file": None, "--max-restarts": 3, "--worker-timeout": 60.0, "--prefill-timeout": 120.0,
    "--health-timeout": 5.0, "--transfer-timeout": 30.0, "--max-queue-wait": 30.0, "--admit-ttft": 0,
    "--drain-timeout": 30.0,
    "--place-wait": 0, "--tpot-slo": 0.25, "--kv-full-fallback": "wait", "--peer-pull": False,
    "--config": None, "--log-level": "INFO", "--log-format": "text",
}


def test_serve_keeps_every_flag_and_default():
    p = parsers()["pdcluster serve"]
    have = {s: a.default for a in p._actions for s in a.option_strings if s.startswith("--") and s != "--help"}
    assert have == SERVE_FLAGS


def test_serve_choices_come_from_the_registries():
    from pdcluster.kv_transfer.codec_policy import MODES
    from pdcluster.kv_transfer.registry import TRANSPORTS
    from pdcluster.router.placement import POLICY_NAMES
    p = parsers()["pdcluster serve"]
    choices = {a.option_strings[0]: a.choices for a in p._actions if a.option_strings}
    assert choices["--kv-transport"] == TRANSPORTS and choices["--policy"] == POLICY_NAMES
    assert choices["--kv-compression"] == MODES and set(choices["--dtype"]) == {"float32", "bfloat16", "float16"}


def test_serve_flags_land_in_the_tree_in_its_units():
    from pdcluster.deploy.config import ClusterConfig
    from pdcluster.deploy.flags import apply_flags
    a = cli.build_parser().parse_args(["serve"])
    assert apply_flags(ClusterConfig(), a, a.tree_flags) == ClusterConfig()      # no flag: the tree's defaults
    a = cli.build_parser().parse_args(["serve", "--kv-cache-memory", "64", "--local-prefill", "--max-queue-wait", "0",
                                       "--prefill-workers", "2", "--worker-timeout", "7", "--gpu", "--policy",
                                       "round-robin", "--drain-timeout", "3"])
    c = apply_flags(ClusterConfig(), a, a.tree_flags)
    assert c.engine.cache.kv_cache_memory == 64 * 2**20 and c.router.remote_prefill is False
    assert c.router.max_queue_wait_s is None and c.pools.prefill.initial_replicas == 2
    assert c.timeouts.stream_gap_s == 7.0 and c.engine.use_gpu and c.router.policy == "round-robin"
    assert c.server.shutdown_drain_s == 3.0 and c.workers("prefill") == 0      # local prefill: no prefill pool
    assert c.router.place_wait_s is None and c.cost.kv_full_fallback == "wait"  # defaults: wait for room
    a = cli.build_parser().parse_args(["serve", "--place-wait", "7.5", "--kv-full-fallback", "local"])
    c = apply_flags(ClusterConfig(), a, a.tree_flags)
    assert c.router.place_wait_s == 7.5 and c.cost.kv_full_fallback == "local"
    for flag, want in (("0.05", 0.05), ("0", None)):        # the TPOT guard: settable, 0 turns it off
        a = cli.build_parser().parse_args(["serve", "--tpot-slo", flag])
        assert apply_flags(ClusterConfig(), a, a.tree_flags).cost.tpot_slo_s == want
    assert c.engine.engine_kwargs(None)["cuda_graphs"] is True                 # graphs unless --enforce-eager
    a = cli.build_parser().parse_args(["serve", "--enforce-eager", "--kv-tier-block-loads"])
    c = apply_flags(ClusterConfig(), a, a.tree_flags)
    assert c.engine_kwargs("decode")["cuda_graphs"] is False and c.engine.cache.tier_layerwise is False
    assert ClusterConfig().engine.cache.tier_layerwise is True


def test_override_rebuilds_nodes_and_refuses_unknown_paths():
    from pdcluster.deploy.config import ClusterConfig
    from pdcluster.deploy.flags import dotted, override
    c = override(ClusterConfig(), dotted(kv__transport="grpc", engine__cache__block_size=32))
    assert c.kv.transport == "grpc" and c.engine.cache.block_size == 32
    with pytest.raises(TypeError, match="KVSection has no field transprt"):
        override(ClusterConfig(), dotted(kv__transprt="grpc"))
    with pytest.raises(ValueError, match="kv transport must be one of"):
        override(ClusterConfig(), dotted(kv__transport="udp"))
    with pytest.raises(ValueError, match="--admit-ttft must be a finite number"):     # not OverflowError
        override(ClusterConfig(), dotted(router__admit_ttft_s=10**400))


@pytest.mark.parametrize("flags, says", [
    ("--kv-cache-memory 0", "--kv-cache-memory must be an integer > 0, got 0"),
    ("--kv-cache-memory -5", "--kv-cache-memory must be an integer > 0, got -5"),
    ("--max-model-len -1", "--max-model-len must be an integer >= 1"),
    ("--max-num-seqs 0", "--max-num-seqs must be an integer >= 1"),
    ("--max-num-batched-tokens 0", "--max-num-batched-tokens must be an integer >= 1"),
    ("--max-queue-wait -1", "--max-queue-wait must be a finite number >= 0 (0: off)"),
    ("--admit-ttft -1", "--admit-ttft must be a finite number >= 0 (0: off)"),
    ("--place-wait -1", "--place-wait must be a finite number >= 0 (0: off)"),
    ("--health-timeout -1", "--health-timeout must be a finite number > 0"),
    ("--prefill-timeout 0", "--prefill-timeout must be a finite number > 0"),
    ("--worker-timeout nan", "--worker-timeout must be a finite number > 0"),
    ("--local-prefill-max-tokens -3", "--local-prefill-max-tokens must be an integer >= 0"),
    ("--kv-cache-dtype int8 --kv-tier-codec fp8", "tier codec (--kv-tier-codec) must be none or int8"),
    ("--prefill-workers 0", "--prefill-workers 0 needs --local-prefill"),
])
def test_serve_flags_out_of_range_fail_at_parse_naming_the_flag(flags, says):
    """Before, these were accepted: some failed inside every worker's engine after Ray and the model
    loaded (a KV budget of 0, a negative context), some refused every request (a negative
    --max-queue-wait), and --prefill-workers 0 without --local-prefill never became ready."""
    from pdcluster.deploy.config import ClusterConfig
    from pdcluster.deploy.flags import apply_flags
    a = cli.build_parser().parse_args(["serve", *flags.split()])
    with pytest.raises(ValueError) as e:
        apply_flags(ClusterConfig(), a, a.tree_flags)
    assert says in str(e.value)


def test_in_range_flags_and_their_zero_offs_parse():
    from pdcluster.deploy.config import ClusterConfig
    from pdcluster.deploy.flags import apply_flags
    a = cli.build_parser().parse_args(["serve", *("--prefill-workers 0 --local-prefill --max-queue-wait 0 "
                                                  "--admit-ttft 2.5 --place-wait 0 --max-model-len 512 "
                                                  "--kv-cache-memory 64").split()])
    c = apply_flags(ClusterConfig(), a, a.tree_flags)
    assert (c.router.max_queue_wait_s, c.router.admit_ttft_s, c.router.place_wait_s) == (None, 2.5, None)
    assert c.engine.max_model_len == 512 and c.engine.cache.kv_cache_memory == 64 * 2**20


@pytest.mark.parametrize("args, says", [
    # past int64, protobuf raised ValueError in a traceback; a NaN, infinite or negative deadline failed
    # at once as DEADLINE_EXCEEDED, before the call even connected
    (["--max-tokens", "99999999999999999999"], "out of the 64-bit integer range"),
    (["--top-k", "-99999999999999999999"], "out of the 64-bit integer range"),
    (["--timeout", "nan"], "not a finite number"), (["--timeout", "inf"], "not a finite number"),
    (["--timeout", "-1"], "a deadline must be > 0 seconds"), (["--temperature", "inf"], "not a finite number"),
    # finite here but not on the wire (float32): 1e39 went as infinity (INVALID_ARGUMENT, exit 1), and 1e-46 as
    # 0, which top_p reads as "off"
    (["--temperature", "1e39"], "past a 32-bit float's range"), (["--top-p", "1e-46"], "rounds to 0"),
])
def test_generate_numbers_out_of_range_are_usage_errors(args, says, capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["generate", "hi", *args])
    assert e.value.code == 2 and says in capsys.readouterr().err
    assert cli.build_parser().parse_args(["generate", "hi", "--timeout", "2.5"]).timeout == 2.5
