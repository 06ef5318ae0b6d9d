"""A taken port gives one clear error naming the port and the flag that moves it: the router's gRPC
and metrics ports (checked by `pdcluster serve` before anything starts, and again at bind), and the
decode workers' KV listeners. gRPC servers must not share a taken port through SO_REUSEPORT."""
import asyncio
import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pdcluster.ports import PortInUse, check_free, host_port

VENV_BIN = Path(sys.executable).parent


@pytest.fixture
def taken():
    """A port held by a listening socket for the test's duration."""
    s = socket.create_server(("127.0.0.1", 0))
    yield s.getsockname()[1]
    s.close()


def test_check_free(taken):
    check_free("127.0.0.1", 0, "x", "--x")               # ephemeral: always free
    with pytest.raises(OSError) as e:                   # ...on an address this host has: port 0 skipped the bind,
        check_free("192.0.2.1", 0, "x", "--x")          # and serve failed after Ray and the model load
    assert e.value.errno == errno.EADDRNOTAVAIL and not isinstance(e.value, PortInUse)
    with pytest.raises(PortInUse) as e:
        check_free("127.0.0.1", taken, "the thing", "--thing-port")
    assert e.value.port == taken and e.value.strerror == (
        f"port {taken} on 127.0.0.1 (the thing) is already in use: pick another with --thing-port")


def test_metrics_port_taken(taken):
    from pdcluster.router.metrics import RouterMetrics
    m = RouterMetrics()
    with pytest.raises(PortInUse, match=f"port {taken} .*metrics.* --metrics-port"):
        m.serve_http("127.0.0.1", taken)
    assert m._http is None


def test_grpc_ports_taken_are_refused_not_shared(taken):
    """Without so_reuseport=0 a grpc server would bind a port another socket holds."""
    from pdcluster.kv_transfer.receiver import KVReceiver
    from pdcluster.kv_transfer.grpc.server import KVServer
    from pdcluster.router.server import RouterServer

    async def router():
        with pytest.raises(PortInUse, match=f"port {taken} .*router's gRPC endpoint.*--port"):
            RouterServer(None, "m", 10, "127.0.0.1", taken)
    asyncio.run(router())

    async def kv():
        srv = KVServer(KVReceiver(), host="127.0.0.1", port=taken)
        with pytest.raises(PortInUse, match=f"port {taken} .*gRPC KV listener.*kv_port"):
            await srv.start()
        await srv.stop()
    asyncio.run(kv())


def test_kv_tcp_port_taken(taken):
    from pdcluster.kv_transfer.receiver import KVReceiver
    from pdcluster.kv_transfer.tcp.server import KVTcpServer
    with pytest.raises(PortInUse, match=f"port {taken} .*TCP KV listener.*kv_tcp_port"):
        KVTcpServer(KVReceiver(), host="127.0.0.1", port=taken).start_sync()


@pytest.mark.parametrize("flag, what", [("--metrics-port", "metrics"), ("--port", "gRPC endpoint"),
                                        ("--http-port", "OpenAI HTTP endpoint")])
def test_serve_on_a_taken_port_says_so_in_one_line(taken, flag, what, tmp_path):
    """A second `pdcluster serve` on a taken port: exit 2 and one line, before Ray or a model starts."""
    other = [x for f in ("--port", "--metrics-port", "--http-port") if f != flag for x in (f, "0")]
    r = subprocess.run([str(VENV_BIN / "pdcluster"), "serve", flag, str(taken), *other], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"port {taken} on 127.0.0.1" in lines[0] and what in lines[0] and f"pick another with {flag}" in lines[0]
    assert "starting pdcluster" not in r.stdout


def serve(tmp_path, *args):
    return subprocess.run([str(VENV_BIN / "pdcluster"), "serve", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.mark.parametrize("args, says", [
    # each port free alone: the second listener failed after every worker had loaded the model
    (["--port", "18931", "--metrics-port", "18931", "--http-port", "0"], "--port and --metrics-port are both 18931"),
    (["--host", ""], "--host must be an address"),                      # bound every interface, then failed late
    (["--kv-transport", "mooncake", "--kv-compression", "int8"], "needs the tcp or grpc transport"),
])
def test_configs_that_cannot_start_are_value_errors(args, says):
    """The config tree refuses them (`pdcluster serve` prints its ValueError in one line, exit 2)."""
    from pdcluster.deploy import cli
    from pdcluster.deploy.config import ClusterConfig
    from pdcluster.deploy.flags import apply_flags
    a = cli.build_parser().parse_args(["serve", *args])
    with pytest.raises(ValueError, match=says):
        apply_flags(ClusterConfig(), a, a.tree_flags)


@pytest.mark.parametrize("args, says", [
    (["--host", "192.0.2.1"], "cannot bind --host '192.0.2.1'"),        # an address this host lacks: a traceback
    (["--model", "/nonexistent/model", "--port", "0", "--metrics-port", "0", "--http-port", "0"],
     "/nonexistent/model: expected a Hugging Face model folder"),       # a traceback once Ray had started
    (["--port", "18931", "--metrics-port", "18931", "--http-port", "0"], "--port and --metrics-port are both 18931"),
    (["--max-model-len", "9000", "--port", "0", "--metrics-port", "0", "--http-port", "0"],
     "--max-model-len must be in [1, 8192]"),                           # the workers' traceback once Ray had started
])
def test_serve_refuses_what_cannot_start_in_one_line_before_anything_starts(tmp_path, args, says):
    r = serve(tmp_path, *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert says in r.stderr and "Traceback" not in r.stderr and "starting pdcluster" not in r.stdout, r.stderr


def test_a_taken_port_set_in_the_config_file_names_its_key(taken, tmp_path):
    (tmp_path / "pools.yaml").write_text(f"router:\n  http_port: {taken}\n  port: 0\n  metrics_port: 0\n")
    r = serve(tmp_path, "--config", str(tmp_path / "pools.yaml"))
    assert r.returncode == 2 and f"(router.http_port in {tmp_path / 'pools.yaml'})" in r.stderr, r.stderr


def test_an_ipv6_host_binds_the_grpc_router():
    """bind_grpc made "::1:0" of host ::1 (no brackets): gRPC could not parse it."""
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    from pdcluster.router.server import RouterServer

    async def go():
        s = RouterServer(None, "m", 10, "::1", 0)
        await s.server.start()
        import grpc
        async with grpc.aio.insecure_channel(host_port("::1", s.port)) as ch:     # the address serve prints
            await asyncio.wait_for(ch.channel_ready(), 5)
        await s.server.stop(None)
    asyncio.run(go())
    from types import SimpleNamespace

    from pdcluster.deploy.config import ClusterConfig, ServerSection
    from pdcluster.deploy.launch import Cluster
    c = Cluster(ClusterConfig(server=ServerSection(host="::1")))
    c.server = SimpleNamespace(port=5)
    assert c.address == "[::1]:5" and host_port("127.0.0.1", 5) == "127.0.0.1:5"


def test_gpu_workers_past_this_hosts_gpus_are_refused_before_ray_starts():
    """--gpu gives each worker actor one GPU: on a host with fewer, Ray could never place them and serve
    waited start_timeout_s (600 s) before failing. A cluster joined by --address has its own GPUs."""
    import torch

    from pdcluster.deploy.cli import check_gpus
    from pdcluster.deploy.config import ClusterConfig
    from pdcluster.deploy.flags import dotted, override
    if torch.cuda.device_count() >= 2:
        pytest.skip("this host has the 2 GPUs a 1 prefill + 1 decode cluster takes")
    gpu = override(ClusterConfig(), dotted(engine__use_gpu=True))
    with pytest.raises(ValueError, match=f"--gpu: 2 workers take one GPU each; this host has "
                                         f"{torch.cuda.device_count()}"):
        check_gpus(gpu)
    check_gpus(override(gpu, dotted(address="10.0.0.1:6379")))     # no error
    check_gpus(ClusterConfig())


def test_a_disk_tier_directory_that_cannot_be_made_is_refused_before_ray_starts(tmp_path):
    """Each worker made it itself: a bad --kv-disk-cache-dir failed every worker after Ray had started (three
    tracebacks, exit 1)."""
    from pdcluster.deploy.cli import check_disk_tiers
    from pdcluster.deploy.config import ClusterConfig
    from pdcluster.deploy.flags import dotted, override
    (tmp_path / "file").write_text("")
    tiers = dict(engine__cache__disk_cache_gb=1.0)
    with pytest.raises(NotADirectoryError, match="KV disk tier directory .--kv-disk-cache-dir"):
        check_disk_tiers(override(ClusterConfig(), dotted(engine__cache__disk_cache_dir=str(tmp_path / "file" / "kv"),
                                                          **tiers)))
    with pytest.raises(FileExistsError, match="--kv-disk-cache-dir"):      # (before: "[Errno 17] File exists")
        check_disk_tiers(override(ClusterConfig(), dotted(engine__cache__disk_cache_dir=str(tmp_path / "file"),
                                                          **tiers)))
    check_disk_tiers(override(ClusterConfig(), dotted(engine__cache__disk_cache_dir=str(tmp_path / "kv"), **tiers)))
    assert (tmp_path / "kv").is_dir()



@pytest.mark.parametrize("error", [ConnectionError("Could not find any running Ray instance."),
                                   "StartFailed"])
def test_serve_that_cannot_join_ray_or_place_its_workers_says_so_in_one_line(monkeypatch, capsys, error):
    """No Ray cluster at --address (ConnectionError) or workers not placed within start_timeout_s: each was a
    traceback. Cluster.start stands in (a real join of a missing cluster retries for minutes)."""
    from pdcluster.deploy import cli, launch
    if error == "StartFailed":
        error = launch.StartFailed("workers did not start within 600s: does the Ray cluster have free ...")

    async def start(self):
        raise error
    monkeypatch.setattr(launch.Cluster, "start", start)
    # (serve's own logging setup would leave a handler on this test's captured stderr: later tests' log lines
    # from background threads then hit a closed file)
    monkeypatch.setattr("pdcluster.logs.setup_logging", lambda *a, **kw: None)
    assert cli.main(["serve", "--port", "0", "--metrics-port", "0", "--http-port", "0"]) == 1
    err = capsys.readouterr().err
    assert err == f"pdcluster serve: {error}\n", err
