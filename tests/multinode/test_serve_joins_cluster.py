"""`pdcluster serve --address auto` joins a Ray cluster started by `ray start --head` (what a `ray up`
head runs), spawns its workers there and answers a Generate with the offline engine's tokens.

Both are subprocesses with their own temp dir and ports. Teardown does not run `ray stop`: it stops
every Ray instance of the host (other test runs included). `ray start --block` in a new session is
stopped instead: SIGTERM (Ray's own shutdown of its processes), then SIGKILL to its process group.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import pytest

from pdcluster.router.proto import generation_pb2_grpc as pbg
from tests.multinode.client import generate

BIN = Path(sys.executable).parent
PROMPT = "The capital of France is"
MAX_NEW = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout_s: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while not pred():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited {proc.returncode}\n{log.read_text()[-3000:] if log else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f}s\n{log.read_text()[-3000:] if log else ''}")
        time.sleep(0.5)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def stop_group(proc: subprocess.Popen, sig: int, grace_s: float) -> None:
    """Signal the process; after grace_s SIGKILL its whole process group (it was started in its own)."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


@pytest.fixture
def ray_head():
    """`ray start --head` with both pool resources (one slot each), 2 CPUs, a private temp dir.
    Ray's token auth is off for this loopback cluster: `ray start` turns it on whenever the host has a
    token (~/.ray/auth_token), while a driver given an explicit address (RAY_ADDRESS) never does."""
    tmp = Path(tempfile.mkdtemp(prefix="pdc-ray-", dir="/tmp"))     # short: Ray's socket paths have a limit
    port = free_port()
    log = tmp / "ray-start.log"
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
                        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
                        "TOKENIZERS_PARALLELISM": "false"}
    argv = [str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=2",
            "--resources=" + json.dumps({"prefill_pool": 1, "decode_pool": 1}), f"--temp-dir={tmp}",
            "--include-dashboard=false", f"--dashboard-agent-listen-port={free_port()}",
            f"--ray-client-server-port={free_port()}", "--block"]
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_for(lambda: port_open(port), 60, "ray start --head", proc, log)
        yield {"address": f"127.0.0.1:{port}", "env": env | {"RAY_ADDRESS": f"127.0.0.1:{port}"}, "tmp": tmp}
    finally:
        stop_group(proc, signal.SIGTERM, 30)
        shutil.rmtree(tmp, ignore_errors=True)


def test_serve_address_auto_joins_ray_start_head(ray_head):
    from pdcluster.engine import LLM, SamplingParams
    llm = LLM(dtype="float32", kv_cache_memory=32 * 2**20, max_num_seqs=1)
    ids = llm.tokenizer.encode(PROMPT, add_special_tokens=False)
    [want] = [o.token_ids for o in llm.generate([ids], SamplingParams(max_tokens=MAX_NEW, temperature=0))]
    del llm

    port = free_port()
    log = ray_head["tmp"] / "serve.log"
    # RAY_ADDRESS points `--address auto` at this cluster (not whichever one /tmp/ray names last)
    argv = [str(BIN / "pdcluster"), "serve", "--address", "auto", "--port", str(port), "--metrics-port", "0",
            "--kv-cache-memory", "64"]
    with open(log, "w") as out:
        serve = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=ray_head["env"],
                                 start_new_session=True)
    try:
        wait_for(lambda: "pdcluster serving on" in log.read_text(), 240, "pdcluster serve", serve, log)

        async def ask():
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                return await generate(pbg.GenerationStub(ch), ids, MAX_NEW, timeout=60)

        reply = asyncio.run(ask())
        assert reply.finish in ("LENGTH", "STOP") and reply.token_ids == want, (reply, want)
        # the default (cost-model) policy may prefill a short prompt on the decode worker itself
        assert reply.decode_worker == "decode-0" and reply.prefill_worker in ("prefill-0", "decode-0")
        text = log.read_text()
        assert "1 prefill, 1 decode workers" in text, text[-2000:]
        # stdout is a file, not a terminal: progress comes as log lines, not a progress bar
        assert "starting 2 workers (loading the model)" in text and "ready (2/2)" in text, text[-2000:]
        assert "\x1b[" not in text, text[-2000:]          # no raw ANSI escapes in the server's log
    finally:
        stop_group(serve, signal.SIGINT, 60)
    assert "shutting down" in log.read_text()
