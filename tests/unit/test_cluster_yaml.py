"""The shipped Ray cluster configs pass Ray's own checks (what `ray up` runs), agree with the pools
config, and the on-prem host map turns into the right `ray start` per host."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import click
import jsonschema
import pytest
import yaml

import ray
from ray.autoscaler._private.util import prepare_config, validate_config

from pdcluster.deploy.local_start import HostEntry, find_this_host, load_host_map, main, parse_host_map, ray_start_argv
from pdcluster.deploy.pools import load_pools_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CLUSTER_YAMLS = sorted(DEPLOY.glob("cluster-*.yaml"))
POOL_RES = {"prefill": "prefill_pool", "decode": "decode_pool"}


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def ray_checks(cfg: dict) -> dict:
    """What `ray up` does to a config before launching anything (commands._bootstrap_config)."""
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


# Ray's validation

def test_cluster_yamls_are_shipped():
    assert {p.name for p in CLUSTER_YAMLS} >= {"cluster-aws.yaml", "cluster-local.yaml"}


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_shipped_cluster_yaml_passes_ray_validation(path):
    prepared = ray_checks(yaml.safe_load(path.read_text()))
    assert prepared["head_node_type"] in prepared["available_node_types"]


def _break_min_workers(cfg: dict) -> dict:
    cfg = copy.deepcopy(cfg)
    if cfg["provider"]["type"] == "local":
        cfg["min_workers"] = "4"                        # local clusters: one global min_workers
    else:
        for name, nt in cfg["available_node_types"].items():
            if name != cfg["head_node_type"]:
                nt["min_workers"] = "1"
    return cfg


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_string_min_workers_is_rejected(path):
    broken = _break_min_workers(yaml.safe_load(path.read_text()))
    # the schema rejects it (aws); for local clusters prepare_config already fails comparing it
    with pytest.raises((jsonschema.ValidationError, TypeError, ValueError)):
        ray_checks(broken)


def test_aws_string_min_workers_fails_the_schema_itself():
    with pytest.raises(jsonschema.ValidationError, match="not of type 'integer'"):
        ray_checks(_break_min_workers(load("cluster-aws.yaml")))


def test_local_bad_worker_ips_fails_the_schema():
    cfg = load("cluster-local.yaml")
    cfg["provider"]["worker_ips"] = "10.0.0.11"
    with pytest.raises(jsonschema.ValidationError, match="not of type 'array'"):
        ray_checks(cfg)


def test_local_rejects_node_types_as_ray_does():
    cfg = load("cluster-local.yaml")
    cfg["available_node_types"] = {"prefill": {"resources": {"prefill_pool": 1}, "node_config": {}}}
    with pytest.raises(click.ClickException, match="available_node_types is not supported"):
        prepare_config(cfg)


# AWS: node types, install, router start

def test_aws_node_types_carry_the_pool_resources():
    cfg = load("cluster-aws.yaml")
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert not set(head["resources"]) & set(POOL_RES.values())     # no worker actor on the head
    for pool, res in POOL_RES.items():
        [nt] = [t for t in types.values() if res in t["resources"]]
        assert nt["resources"][res] >= 1 and 0 <= nt["min_workers"] <= nt["max_workers"]
        assert set(nt["resources"]) & set(POOL_RES.values()) == {res}     # a node serves one pool


@pytest.mark.parametrize("name", ["cluster-aws.yaml", "cluster-local.yaml"])
def test_nodes_get_this_checkout_without_its_venv_or_git(name):
    cfg = load(name)
    assert cfg["file_mounts"] == {"~/pdcluster": "."}               # `ray up` from the repository root
    assert (ROOT / "pyproject.toml").is_file() and ".gitignore" in cfg["rsync_filter"]
    assert ".venv/" in (ROOT / ".gitignore").read_text().split()     # so the local .venv is not synced
    assert "**/.git" in cfg["rsync_exclude"] and not cfg.get("file_mounts_sync_continuously", False)
    assert "YOUR_ORG" not in (DEPLOY / name).read_text() and "git clone" not in (DEPLOY / name).read_text()
    setup = " ".join(cfg["setup_commands"] + cfg.get("head_setup_commands", []) + cfg.get("worker_setup_commands", []))
    assert "cd ~/pdcluster && " in setup and "make install" in setup


def test_aws_installs_pdcluster_and_starts_the_router():
    cfg = load("cluster-aws.yaml")
    setup = " ".join(cfg["setup_commands"] + cfg["head_setup_commands"] + cfg["worker_setup_commands"])
    assert "make install" in setup
    head = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in head and "--autoscaling-config" in head
    assert "pdcluster serve --config deploy/pools.yaml --address auto" in head
    assert any("ray start --address=$RAY_HEAD_IP" in c for c in cfg["worker_start_ray_commands"])


@pytest.mark.parametrize("name", ["cluster-aws.yaml", "cluster-local.yaml"])
def test_nodes_install_this_ray_version_from_the_lock(name):
    cfg = load(name)
    cmds = [c for k in ("setup_commands", "head_setup_commands", "worker_setup_commands") for c in cfg.get(k, [])]
    assert any("make install" in c for c in cmds)          # builds .venv from requirements.lock
    assert f"ray=={ray.__version__}" in (ROOT / "requirements.lock").read_text().splitlines()


def test_aws_pool_capacity_covers_max_replicas():
    cfg, serve = ray_checks(load("cluster-aws.yaml")), load_pools_config(DEPLOY / "pools.yaml")
    for pool, res in POOL_RES.items():
        slots = sum(t["max_workers"] * t["resources"].get(res, 0) for t in cfg["available_node_types"].values())
        assert serve.pools.pool(pool).hi <= slots, pool
        assert cfg["max_workers"] >= sum(t.get("min_workers", 0) for t in cfg["available_node_types"].values())


# local: every host mapped, pools from the map

def test_local_hosts_all_mapped_and_capacity_covers_max_replicas():
    cfg = load("cluster-local.yaml")
    assert "available_node_types" not in cfg
    hosts = load_host_map(DEPLOY / "local-hosts.yaml")
    ips = [cfg["provider"]["head_ip"], *cfg["provider"]["worker_ips"]]
    assert sorted(ips) == sorted(hosts)
    serve = load_pools_config(DEPLOY / "pools.yaml")
    for pool in POOL_RES:
        assert serve.pools.pool(pool).hi <= sum(getattr(h, pool) for h in hosts.values()), pool


def test_local_start_commands_use_the_synced_map():
    cfg = load("cluster-local.yaml")
    [(remote, local)] = cfg["file_mounts"].items()
    assert (ROOT / local / "deploy" / "local-hosts.yaml").is_file()
    for key, role in (("head_start_ray_commands", "--head"), ("worker_start_ray_commands", "--address")):
        [cmd] = [c for c in cfg[key] if "pdcluster.deploy.local_start" in c]
        assert f"--map {remote}/deploy/local-hosts.yaml" in cmd and role in cmd
    assert any("pdcluster serve --config" in c and "--address auto" in c for c in cfg["head_start_ray_commands"])


# host map -> ray start

def test_host_map_to_ray_start_per_host():
    hosts = load_host_map(DEPLOY / "local-hosts.yaml")
    cfg = load("cluster-local.yaml")
    head = ray_start_argv(hosts[cfg["provider"]["head_ip"]], head=True, autoscaling_config="/b.yaml")
    assert head == ["ray", "start", "--head", "--port=6379", "--dashboard-host=127.0.0.1",
                    "--autoscaling-config=/b.yaml"]     # router only; the dashboard on loopback (as cluster-aws.yaml)
    for ip in cfg["provider"]["worker_ips"]:
        argv = ray_start_argv(hosts[ip], head=False, address="10.0.0.10:6379")
        assert argv[:3] == ["ray", "start", "--address=10.0.0.10:6379"]
        [res] = [a for a in argv if a.startswith("--resources=")]
        got = json.loads(res.split("=", 1)[1])
        want = {r: getattr(hosts[ip], p) for p, r in POOL_RES.items() if getattr(hosts[ip], p)}
        assert got == want and got


def test_ray_start_argv_both_pools_and_overrides():
    e = HostEntry("h", prefill=1, decode=3, num_cpus=16, num_gpus=4)
    argv = ray_start_argv(e, head=False, address="h0:6379", ray="/v/bin/ray", extra=["--block"])
    assert argv == ["/v/bin/ray", "start", "--address=h0:6379", "--num-cpus=16", "--num-gpus=4",
                    '--resources={"decode_pool":3,"prefill_pool":1}', "--block"]
    with pytest.raises(ValueError):
        ray_start_argv(e, head=True, address="h0:6379")
    with pytest.raises(ValueError):
        ray_start_argv(e, head=False)


def test_parse_host_map_rejects_bad_entries():
    assert parse_host_map({"hosts": {"a": None}})["a"] == HostEntry("a")
    for bad in ({"hosts": {"a": {"prefil": 1}}}, {"hosts": {"a": {"prefill": -1}}},
                {"hosts": {"a": {"decode": "2"}}}, {"hosts": {"a": {"decode": True}}},
                {"hosts": {"a": [1]}}, {"hostz": {}}, [1]):
        with pytest.raises(ValueError):
            parse_host_map(bad, "m.yaml")


@pytest.mark.parametrize("text", ["hosts:\n  10.0.0.11: {prefill: 2}\n  10.0.0.11: {decode: 2}\n",
                                  "hosts:\n  10.0.0.11: {prefill: 2, prefill: 0}\n"])
def test_a_repeated_host_or_key_is_an_error_not_a_silent_merge(tmp_path, text):
    """PyYAML keeps a repeated key's last value: the first entry's slots vanished without a word."""
    (tmp_path / "h.yaml").write_text(text)
    with pytest.raises(ValueError, match="repeated key .* line 2"):
        load_host_map(tmp_path / "h.yaml")


def test_find_this_host():
    resolve = {"10.0.0.1": ["10.0.0.1"], "gpu-a": ["10.0.0.2"], "gpu-b": ["10.0.0.3"]}.get
    assert find_this_host(["10.0.0.1", "gpu-a"], is_local=lambda ip: ip == "10.0.0.2", resolve=resolve) == "gpu-a"
    with pytest.raises(ValueError, match="none of the mapped hosts"):
        find_this_host(["10.0.0.1", "gpu-a"], is_local=lambda ip: False, resolve=resolve)
    with pytest.raises(ValueError, match="several"):
        find_this_host(["gpu-a", "gpu-b"], is_local=lambda ip: True, resolve=resolve)


def test_find_this_host_on_loopback():
    assert find_this_host(["192.0.2.1", "127.0.0.1"]) == "127.0.0.1"   # 192.0.2.1: TEST-NET, never local


def test_main_dry_run(tmp_path, capsys):
    m = tmp_path / "hosts.yaml"
    m.write_text("hosts:\n  127.0.0.1: {decode: 2}\n  192.0.2.1: {prefill: 1}\n")
    assert main(["--map", str(m), "--address", "127.0.0.1:6379", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "start --address=127.0.0.1:6379" in out and '{"decode_pool":2}' in out
    assert main(["--map", str(m), "--ip", "10.9.9.9", "--head", "--dry-run"]) == 2     # unmapped host


def test_the_host_map_keeps_merge_keys_and_reports_an_unhashable_key_in_one_line(tmp_path):
    """The repeated-key check saw `<<: *anchor` as a key (refusing a file safe_load took) and raised a raw
    TypeError on a complex key."""
    p = tmp_path / "h.yaml"
    p.write_text("hosts:\n  10.0.0.1: &b {prefill: 1, decode: 1}\n  10.0.0.2: {<<: *b, decode: 2}\n")
    hosts = load_host_map(p)
    assert (hosts["10.0.0.2"].prefill, hosts["10.0.0.2"].decode) == (1, 2)
    p.write_text("hosts:\n  ? [a, b]\n  : {prefill: 1}\n")
    with pytest.raises(ValueError, match="unhashable"):
        load_host_map(p)
