"""The README's security claims through the real CLI: `pdcluster serve --tls-cert/--tls-key
--auth-token-file --cluster-secret-file --kv-transport grpc --kv-compression int8`, then
`pdcluster generate --tls-ca --auth-token`: TLS only, bearer tokens required except for health,
and remote prefills whose KV crosses the gRPC transport int8-compressed, tokens still exact."""
import asyncio
import signal
import subprocess
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdcluster import SamplingParams
from pdcluster.router.proto import generation_pb2 as pb
from pdcluster.router.proto import generation_pb2_grpc as pbg
from tests.procs import BIN, free_port, serving_port, stop_group, wait_for

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("sec")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    (d / "tokens").write_text("alice:tok-alice-0123456789\n")
    (d / "secret").write_text("a-cluster-secret-of-some-length\n")
    log = d / "serve.log"
    http_port = free_port()
    argv = [str(BIN / "pdcluster"), "serve", "--port", "0", "--metrics-port", "0", "--http-port", str(http_port),
            "--kv-cache-memory", "64",
            "--tls-cert", str(cert), "--tls-key", str(key), "--auth-token-file", str(d / "tokens"),
            "--cluster-secret-file", str(d / "secret"), "--kv-transport", "grpc", "--kv-compression", "int8",
            "--policy", "least-loaded"]
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=d)
    try:
        wait_for(lambda: "pdcluster serving on" in log.read_text(), 240, "pdcluster serve", proc, log)
        port = serving_port(log)                    # --port 0: no port picked early and lost
        wait_for(lambda: "OpenAI API on" in log.read_text(), 10, "the HTTP address line", proc, log)
        assert f"OpenAI API on https://127.0.0.1:{http_port}/v1" in log.read_text()
        yield {"addr": f"localhost:{port}", "cert": cert, "log": log, "pid": proc.pid, "proc": proc,
               "base_url": f"https://localhost:{http_port}/v1"}
    finally:
        stop_group(proc, signal.SIGINT, 60)     # the graceful stop


@pytest.mark.parametrize("flag, content, words", [
    ("--auth-token-file", "alice:short\n", "shorter than 16"),
    ("--cluster-secret-file", "too-short\n", "at least 16 characters"),
    ("--cluster-secret-file", None, "No such file"),
])
def test_a_bad_token_or_secret_file_stops_serve_at_once_in_one_line(tmp_path, flag, content, words):
    f = tmp_path / "file"
    if content is not None:
        f.write_text(content)
    r = subprocess.run([str(BIN / "pdcluster"), "serve", "--port", "0", "--metrics-port", "0", "--http-port", "0", flag, str(f)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr and words in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "starting pdcluster" not in r.stdout


@pytest.mark.parametrize("which, words", [
    ("cert only", "TLS needs both --tls-cert and --tls-key"),
    ("missing files", "cannot read --tls-cert"),        # (the bare errno message named no file)
    ("not PEM", "PEM"),
])
def test_bad_tls_files_stop_serve_at_once_in_one_line(tmp_path, which, words):
    """Before, these were found only when the router's server was built, after every worker had
    loaded, and ended in a traceback."""
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    args = {"cert only": ["--tls-cert", str(bad)],
            "missing files": ["--tls-cert", str(tmp_path / "none.pem"), "--tls-key", str(tmp_path / "none.key")],
            "not PEM": ["--tls-cert", str(bad), "--tls-key", str(bad)]}[which]
    r = subprocess.run([str(BIN / "pdcluster"), "serve", "--port", "0", "--metrics-port", "0", "--http-port", "0",
                        *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr and words in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "starting pdcluster" not in r.stdout


def test_generate_with_a_missing_ca_file_is_one_line(tmp_path):
    r = subprocess.run([str(BIN / "pdcluster"), "generate", PROMPT, "--addr", "127.0.0.1:1", "--tls-ca",
                        str(tmp_path / "none.pem")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--tls-ca" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def generate(s, *extra):
    return subprocess.run([str(BIN / "pdcluster"), "generate", PROMPT, "--addr", s["addr"], "--max-tokens", "8",
                           *extra], capture_output=True, text=True, timeout=120)


def test_generate_over_tls_with_a_token(served):
    # (--seed -1: any int64, as the HTTP API takes it; the proto's uint64 field raised a traceback)
    r = generate(served, "--tls-ca", str(served["cert"]), "--auth-token", "tok-alice-0123456789", "-v", "--seed", "-1")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    assert "completion_tokens: 8" in r.stderr


def test_no_or_a_wrong_token_is_unauthenticated(served):
    for extra in ((), ("--auth-token", "tok-mallory-0123456789")):
        r = generate(served, "--tls-ca", str(served["cert"]), *extra)
        assert r.returncode == 1 and "UNAUTHENTICATED" in r.stderr, r.stderr


def test_plaintext_is_refused_on_the_tls_port(served):
    r = generate(served, "--auth-token", "tok-alice-0123456789", "--timeout", "10")
    assert r.returncode == 1 and "error:" in r.stderr


def test_health_needs_no_token_and_kv_crosses_grpc_compressed(served, llm):
    creds = grpc.ssl_channel_credentials(served["cert"].read_bytes())
    ids = llm.tokenizer.encode(PROMPT * 6, add_special_tokens=False)
    want = llm.generate([ids], SamplingParams(max_tokens=6, temperature=0))[0].token_ids

    async def run():
        async with grpc.aio.secure_channel(served["addr"], creds) as ch:
            h = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            msgs = [m async for m in pbg.GenerationStub(ch).Generate(
                pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParams(max_tokens=6)),
                metadata=(("authorization", "Bearer tok-alice-0123456789"),))]
            return h.status, msgs
    status, msgs = asyncio.run(run())
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert [t for m in msgs for t in m.token_ids] == want
    p = msgs[0].placement
    assert p.remote_prefill and p.prefill_worker == "prefill-0"
    fp32 = len(ids) * llm.engine.cfg.model.kv_bytes_per_token(4)
    assert 0 < p.kv_bytes_transferred < fp32 / 3          # int8 on the wire: about a quarter of fp32


def test_a_single_host_serve_and_its_ray_listen_on_loopback_only(served):
    """Issue 15 (8): `serve` without --address starts Ray with every port on 127.0.0.1 (GCS, raylet,
    agents, workers, metrics exporters) and no dashboard UI."""
    import psutil
    procs = [psutil.Process(served["pid"])]
    procs += procs[0].children(recursive=True)        # GCS, raylet, agents, worker actors
    listening = [(p.pid, p.name(), c.laddr) for p in procs for c in _listeners(p)]
    assert len(listening) >= 6, listening             # router, GCS, raylet, agents, workers' gRPC servers
    assert any(a.port == int(served["addr"].rsplit(":", 1)[1]) for _, _, a in listening)
    exposed = [x for x in listening if x[2].ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert not exposed, exposed
    assert not any(a.port == 8265 for _, _, a in listening), "Ray's dashboard UI is up"


def _listeners(p):
    import psutil
    try:
        return [c for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    except psutil.NoSuchProcess:
        return []


def test_the_http_api_takes_the_same_tls_and_tokens(served):
    import httpx
    import openai
    tls = httpx.Client(verify=str(served["cert"]), timeout=120)
    ok = openai.OpenAI(base_url=served["base_url"], api_key="tok-alice-0123456789", http_client=tls, max_retries=0)
    model = ok.models.list().data[0].id
    r = ok.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
    assert r.choices[0].text and r.usage.completion_tokens == 8
    for key in ("", "tok-mallory-0123456789"):
        bad = tls.post(f"{served['base_url']}/completions", json={"model": model, "prompt": PROMPT},
                       headers={"authorization": f"Bearer {key}"} if key else {})
        assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error", bad.text
    assert tls.get(served["base_url"].replace("/v1", "/health")).status_code == 200     # open, like gRPC health
    with pytest.raises(httpx.HTTPError):
        httpx.get(served["base_url"].replace("https", "http") + "/models", timeout=10)    # no plaintext


def test_graceful_stop_does_not_wait_on_an_idle_keep_alive_client(served):
    """Last in the module: it stops the served process. A client that keeps its HTTP connection open
    between requests (every pooled client does) holds no request: the drain must not wait its 30 s
    bound for it (it did: the connection count, not the request count, was waited on)."""
    import httpx
    proc, log = served["proc"], served["log"]
    with httpx.Client(verify=str(served["cert"]), timeout=30) as idle:
        assert idle.get(served["base_url"].replace("/v1", "/health")).status_code == 200   # now idle, kept alive
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
        took = time.monotonic() - t0
    text = log.read_text()
    assert "draining 0 stream(s) for up to 30s" in text and "drained" in text, text[-2000:]
    assert took < 20, f"stop took {took:.1f}s with one idle keep-alive connection (drain bound 30s)"


@pytest.mark.parametrize("weights, words", [
    ("readable", "cannot load the tokenizer"),      # Ray and the workers started, then the router's load failed
    ("empty", "not a readable safetensors file"),   # safetensors' own error type got past the pre-flight
])
def test_a_broken_model_folder_stops_serve_at_once_in_one_line(tmp_path, weights, words):
    """A folder with config.json and weights but no tokenizer, or a weights file that is not safetensors:
    each ended in a traceback."""
    import json

    import torch
    from safetensors.torch import save_file
    (tmp_path / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=576,
        intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        max_position_embeddings=8192, bos_token_id=1, eos_token_id=2)))
    if weights == "readable":
        save_file({"model.norm.weight": torch.ones(576)}, str(tmp_path / "model.safetensors"))
    else:
        (tmp_path / "model.safetensors").write_bytes(b"")
    r = subprocess.run([str(BIN / "pdcluster"), "serve", "--model", str(tmp_path), "--port", "0", "--metrics-port",
                        "0", "--http-port", "0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr and words in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "starting pdcluster" not in r.stdout
