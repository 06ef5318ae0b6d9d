"""Bearer-token auth, tenant isolation of the prefix cache, and client deadlines, on the live cluster."""
import ast
import pathlib
import time

import grpc
import pytest

from pdcluster.router.auth import TokenAuth
from pdcluster.router.proto import generation_pb2 as pb
from pdcluster.router.proto import generation_pb2_grpc as pbg
from pdcluster.router.server import RouterServer
from tests.e2e.test_cluster import idle_pools

TOKENS = {"alice": "alice-secret-token-0001", "bob": "bob-secret-token-00002"}


@pytest.fixture(scope="module")
def secured(cluster, tmp_path_factory):
    f = tmp_path_factory.mktemp("auth") / "tokens"
    f.write_text("# tenants\n" + "".join(f"{t}:{k}\n" for t, k in TOKENS.items()))

    async def start():  # grpc.aio servers bind to the loop they are created on
        s = RouterServer(cluster.router, "m", 49152, "127.0.0.1", 0, auth=TokenAuth.from_file(str(f)))
        await s.start()
        return s
    srv = cluster.run(start())
    yield f"127.0.0.1:{srv.port}"
    cluster.run(srv.stop(0.5))


def md(tenant):
    return (("authorization", f"Bearer {TOKENS[tenant]}"),)


def test_missing_or_wrong_token_is_unauthenticated(cluster, secured):
    req = pb.GenerateRequest(text="Hello", sampling=pb.SamplingParams(max_tokens=2))

    async def go():
        async with grpc.aio.insecure_channel(secured) as ch:
            stub = pbg.GenerationStub(ch)
            codes = []
            for meta in ((), (("authorization", "Bearer nope-nope-nope-nope"),), (("authorization", TOKENS["bob"]),)):
                try:
                    async for _ in stub.Generate(req, metadata=meta):
                        pass
                    codes.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as e:
                    codes.append(e.code())
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.GetModelInfo(pb.ModelInfoRequest())
            codes.append(e.value.code())
            ok = [m async for m in stub.Generate(req, metadata=md("alice"))]
            return codes, ok
    codes, ok = cluster.run(go())
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 4
    assert ok[-1].usage.completion_tokens == 2


def test_prefix_cache_is_isolated_between_tenants(cluster, secured):
    text = "Tenant isolation check: the quick brown fox jumps over the lazy dog. " * 4
    req = pb.GenerateRequest(text=text, sampling=pb.SamplingParams(max_tokens=2))

    async def go():
        async with grpc.aio.insecure_channel(secured) as ch:
            stub = pbg.GenerationStub(ch)
            out = []
            for tenant in ("alice", "alice", "bob", "bob"):
                msgs = [m async for m in stub.Generate(req, metadata=md(tenant))]
                out.append(msgs[-1].usage.cached_prompt_tokens)
            return out
    a1, a2, b1, b2 = cluster.run(go())
    assert a1 == 0 and a2 >= 32          # same tenant hits
    assert b1 == 0 and b2 >= 32          # other tenant misses, then hits its own


def test_deadline_exceeded_frees_blocks(cluster):
    req = pb.GenerateRequest(text="Write a very long essay about rivers.",
                             sampling=pb.SamplingParams(max_tokens=2000, ignore_eos=True))

    async def go():
        before = await idle_pools(cluster)
        async with grpc.aio.insecure_channel(cluster.address) as ch:
            t = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in pbg.GenerationStub(ch).Generate(req, timeout=2.0):
                    pass
            took = time.monotonic() - t
        after = await idle_pools(cluster)
        return e.value.code(), took, before, after
    code, took, before, after = cluster.run(go())
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and took < 2.5
    assert {k: v.engine.free_blocks for k, v in after.items()} == {k: v.engine.free_blocks for k, v in before.items()}


UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}
UNSAFE_CALLS = {"loads", "load", "Unpickler"}


def unsafe_loads(tree: ast.AST) -> list[int]:
    """Lines that import an unpickling module (any form) or call a loader: pickle.loads(...),
    `from pickle import loads`, torch.load(...) (a pickle underneath)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] in UNSAFE_MODULES for a in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            lines.append(node.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in UNSAFE_CALLS:
            owner = node.func.value
            name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
            if name in UNSAFE_MODULES | {"torch"}:
                lines.append(node.lineno)
    return lines


def test_the_unpickling_scan_catches_each_form():
    for code in ("import pickle", "import cloudpickle as cp", "from pickle import loads", "from marshal import *",
                 "import torch\ntorch.load(f)", "x = pickle.loads(b)", "import dill.settings"):
        assert unsafe_loads(ast.parse(code)), code
    assert not unsafe_loads(ast.parse("import json\njson.loads(s)\nimport msgpack\nmsgpack.loads(b)"))


def test_no_unpickling_anywhere_in_the_project():
    """Nothing received from the network is unpickled: no unpickling module is even imported, and
    no torch.load, anywhere in the installed code."""
    root = pathlib.Path(__file__).resolve().parents[2]
    bad = []
    for d in ("pdcluster", "engine", "router", "prefill_worker", "decode_worker", "kv_transfer", "kernels", "deploy",
              "bench"):
        for f in (root / d).rglob("*.py"):
            bad += [f"{f.relative_to(root)}:{n}" for n in unsafe_loads(ast.parse(f.read_text()))]
    assert bad == []


def test_internal_kv_endpoint_requires_the_cluster_secret(cluster):
    """The decode worker's KV endpoint binds loopback and refuses a sender without the cluster secret
    (serve generates one when --cluster-secret-file is not given); nothing lands, nothing leaks."""
    import torch

    from pdcluster.kv_transfer import KVTransferError, TcpKVTransport
    st = cluster.run(cluster.worker_status())
    dec = next(s for s in st.values() if s.role == "decode")
    assert dec.kv_address.startswith("127.0.0.1:")
    for secret in (None, "not-the-cluster-secret"):
        tr = TcpKVTransport(secret=secret)
        sender = tr.open(dec.kv_address, "intruder", [0])
        block = torch.zeros(1, 16, 3, 64)   # one block: (blocks, block_size, kv_heads, head_dim)
        sender.send_layer(0, block, block)
        with pytest.raises(KVTransferError) as e:
            sender.finish(timeout=20)
        tr.close()
        assert e.value.status == "UNAUTHENTICATED"
    after = cluster.run(cluster.worker_status())
    assert all(s.engine.free_blocks == s.engine.num_blocks for s in after.values())
