"""`ray start` for one on-prem host, with its pool resources taken from a host-to-pool map.

Ray's launcher refuses `available_node_types` for `provider: local`, so the pool a host serves
cannot come from the cluster YAML; deploy/cluster-local.yaml runs this instead of `ray start`:

    python -m pdcluster.deploy.local_start --map MAP --head --autoscaling-config ~/ray_bootstrap_config.yaml
    python -m pdcluster.deploy.local_start --map MAP --address $RAY_HEAD_IP:6379
    (MAP = ~/pdcluster/deploy/local-hosts.yaml: this checkout, synced there by `ray up`)

It finds this host's entry in the map (the entry whose address is bound on this machine, or
--ip), then exec's `ray start ... --resources '{"prefill_pool": N, "decode_pool": M}'`
(--dry-run prints it). A host missing from the map is an error, so a typo fails `ray up` loudly
instead of starting a node that serves nothing.

Map format (deploy/local-hosts.yaml):
    hosts:
      10.0.0.10: {}                          # no pool: router / head only
      10.0.0.11: {prefill: 2}                # 2 prefill replicas fit here (2 GPUs)
      10.0.0.12: {decode: 2, num_gpus: 2}    # num_cpus / num_gpus override Ray's detection
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import yaml

from pdcluster.deploy.worker_options import POOL_RESOURCE

HOST_KEYS = ("prefill", "decode", "num_cpus", "num_gpus")


@dataclass(frozen=True)
class HostEntry:
    host: str                           # as written in the map (IP or hostname, as in cluster-local.yaml)
    prefill: int = 0                    # prefill replicas this host can hold
    decode: int = 0
    num_cpus: int | None = None         # None = Ray detects
    num_gpus: int | None = None

    def resources(self) -> dict[str, int]:
        """Ray custom resources: one unit per replica slot."""
        return {POOL_RESOURCE[p]: n for p, n in (("prefill", self.prefill), ("decode", self.decode)) if n}


def parse_host_map(data: object, source: str = "<map>") -> dict[str, HostEntry]:
    """{host: HostEntry} from the loaded YAML; ValueError naming the file and key on any problem."""
    if not isinstance(data, dict) or set(data) != {"hosts"} or not isinstance(data["hosts"], dict):
        raise ValueError(f"{source}: expected exactly one top-level key `hosts` holding a mapping")
    out = {}
    for host, spec in data["hosts"].items():
        host = str(host)
        spec = {} if spec is None else spec
        if not isinstance(spec, dict):
            raise ValueError(f"{source}: hosts.{host}: expected a mapping like {{prefill: 1}}")
        unknown = set(spec) - set(HOST_KEYS)
        if unknown:
            raise ValueError(f"{source}: hosts.{host}: unknown key(s) {sorted(unknown)} (allowed: {HOST_KEYS})")
        for k, v in spec.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{source}: hosts.{host}.{k}: expected an integer >= 0 (got {v!r})")
        out[host] = HostEntry(host, **spec)
    return out


class _UniqueKeys(yaml.SafeLoader):
    """safe_load that refuses a repeated key (PyYAML keeps the last: a host listed twice lost its first slots)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for kn, _ in node.value:
            if kn.tag == "tag:yaml.org,2002:merge":     # `<<: *anchor`: merged by super(), its keys may repeat
                continue
            key = self.construct_object(kn, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:                           # unhashable: super() says so (a YAMLError)
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"repeated key {key!r} (first on line {first + 1})", kn.start_mark)
            seen[key] = kn.start_mark.line
        return super().construct_mapping(node, deep)


def load_host_map(path: str | Path) -> dict[str, HostEntry]:
    text = Path(path).expanduser().read_text()
    try:
        data = yaml.load(text, Loader=_UniqueKeys)     # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: {e}") from None
    return parse_host_map(data, str(path))


def _resolve(host: str) -> list[str]:
    try:
        return sorted({ai[4][0] for ai in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)})
    except socket.gaierror:
        return []


def _is_local(ip: str) -> bool:
    """True when `ip` is bound on this machine (binding to it succeeds only then)."""
    fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))
        return True
    except OSError:
        return False


def find_this_host(hosts: Iterable[str], is_local: Callable[[str], bool] = _is_local,
                   resolve: Callable[[str], list[str]] = _resolve) -> str:
    """The one map key whose address is this machine's; ValueError if none or several."""
    hosts = list(hosts)
    mine = [h for h in hosts if any(is_local(ip) for ip in resolve(h))]
    if len(mine) == 1:
        return mine[0]
    if not mine:
        raise ValueError(f"this machine ({socket.gethostname()}) is none of the mapped hosts {hosts}; "
                         "add it to the map or pass --ip")
    raise ValueError(f"several mapped hosts are this machine: {mine}; pass --ip")


def ray_start_argv(entry: HostEntry, *, head: bool, address: str | None = None, port: int = 6379,
                   autoscaling_config: str | None = None, ray: str = "ray",
                   extra: Iterable[str] = ()) -> list[str]:
    """The `ray start` command line for this host (argv, no shell)."""
    if head == bool(address):
        raise ValueError("give exactly one of head=True or address")
    argv = [ray, "start"]
    if head:
        argv += ["--head", f"--port={port}", "--dashboard-host=127.0.0.1"]     # the dashboard stays on loopback
        if autoscaling_config:
            argv.append(f"--autoscaling-config={os.path.expanduser(autoscaling_config)}")
    else:
        argv.append(f"--address={address}")
    if entry.num_cpus is not None:
        argv.append(f"--num-cpus={entry.num_cpus}")
    if entry.num_gpus is not None:
        argv.append(f"--num-gpus={entry.num_gpus}")
    if entry.resources():
        argv.append("--resources=" + json.dumps(entry.resources(), sort_keys=True, separators=(",", ":")))
    return argv + list(extra)


def _ray_executable() -> str:
    """The `ray` beside this interpreter (the venv pdcluster runs in), else whatever PATH has."""
    here = Path(sys.executable).with_name("ray")
    return str(here) if here.exists() else "ray"


def main(argv: list[str] | None = None) -> int:
    from pdcluster.deploy.cli import HelpFormatter
    ap = argparse.ArgumentParser(prog="python -m pdcluster.deploy.local_start", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--map", required=True, help="host-to-pool map (deploy/local-hosts.yaml)")
    role = ap.add_mutually_exclusive_group(required=True)
    role.add_argument("--head", action="store_true", help="start the head node")
    role.add_argument("--address", help="join the head at HOST:PORT (worker nodes; required without --head)")
    ap.add_argument("--port", type=int, default=6379, help="head: GCS port")
    ap.add_argument("--autoscaling-config", default=None, help="head: Ray's bootstrap config (ray up sets it)")
    ap.add_argument("--ip", default=None, help="this host's key in the map (default: found from local addresses)")
    ap.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    ap.add_argument("extra", nargs="*", help="more `ray start` flags, after --")
    a = ap.parse_args(argv)
    try:
        hosts = load_host_map(a.map)
        key = a.ip if a.ip is not None else find_this_host(hosts)
        if key not in hosts:
            raise ValueError(f"{a.map}: no entry for {key}")
        cmd = ray_start_argv(hosts[key], head=a.head, address=a.address, port=a.port,
                             autoscaling_config=a.autoscaling_config, ray=_ray_executable(), extra=a.extra)
    except (OSError, ValueError, yaml.YAMLError) as e:
        print(f"local_start: {e}", file=sys.stderr)
        return 2
    if a.dry_run:
        print(shlex.join(cmd))
        return 0
    print(f"local_start: {key}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    sys.exit(main())
