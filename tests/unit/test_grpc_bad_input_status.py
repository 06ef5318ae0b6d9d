"""The gRPC servicer (router/server.py) in front of a stand-in router, on loopback: input that used to get the
wrong status. A client string echoed whole into the status message (a 20 KB chat role) passed gRPC's 16 KiB
metadata bound, so the client saw RESOURCE_EXHAUSTED ("overloaded, retry"); a schema nested past the JSON
parser's stack raised RecursionError, answered UNAVAILABLE; a deep but valid schema went to xgrammar, whose
compile time grows steeply with depth, on the router's one tokenizing thread. API.md: bad input is
INVALID_ARGUMENT naming its field, and the next request is served."""
import asyncio
import time

import grpc
import pytest

from pdcluster.engine.structured import MAX_SCHEMA_DEPTH, StructuredOutput, json_depth
from pdcluster.router.lifecycle.run import Event
from pdcluster.router.proto import generation_pb2 as pb
from pdcluster.router.proto import generation_pb2_grpc as pb_grpc
from pdcluster.router.server import MAX_STATUS_TEXT, RouterServer
from tests.unit.char_tok import VOCAB
from tests.unit.char_tok import CharTok as Tok

pytestmark = pytest.mark.timeout(60)
CONTEXT = 256


class Router:
    """Answers each request with two tokens."""
    def __init__(self):
        self.tokenizer, self.tokenize_pool, self.context_tokens = Tok(), None, CONTEXT

    def ready(self):
        return True

    def check_room(self):
        pass

    async def generate(self, prompt_ids, params, request_id="", cache_salt=None, deadline_s=None):
        for i in range(2):
            yield Event([5], "x", "length" if i else None,
                        dict(prompt_tokens=len(prompt_ids), completion_tokens=i + 1, cached_prompt_tokens=0) if i
                        else None,
                        None if i else dict(prefill_worker="p", decode_worker="d", remote_prefill=False,
                                            kv_bytes_transferred=0, kv_transfer_ms=0.0))


def nested(depth: int) -> str:
    return '{"type":"object","properties":{"a":' * depth + '{"type":"string"}' + "}}" * depth


def test_bad_input_gets_invalid_argument_with_a_bounded_message_and_the_next_request_is_served():
    big = "w" * 20_000
    cases = [
        ("chat role", pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role=big, content="hi")]),
                                         sampling=pb.SamplingParams(max_tokens=2))),
        ("response_format type", pb.GenerateRequest(text="Hi", sampling=pb.SamplingParams(
            max_tokens=2, response_format=pb.ResponseFormat(type=big)))),
        ("schema past the parser's stack", pb.GenerateRequest(text="Hi", sampling=pb.SamplingParams(
            max_tokens=2, response_format=pb.ResponseFormat(type="json_schema", json_schema="[" * 30_000)))),
        ("a deep valid schema", pb.GenerateRequest(text="Hi", sampling=pb.SamplingParams(
            max_tokens=2, response_format=pb.ResponseFormat(type="json_schema", json_schema=nested(400))))),
    ]

    async def go():
        server = RouterServer(Router(), "m", VOCAB, "127.0.0.1", 0)
        await server.start()
        out = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                stub = pb_grpc.GenerationStub(ch)
                for name, rq in cases:
                    t0 = time.monotonic()
                    try:
                        [m async for m in stub.Generate(rq, timeout=20)]
                        out.append((name, "OK", "", 0.0))
                    except grpc.aio.AioRpcError as e:
                        out.append((name, e.code(), e.details(), time.monotonic() - t0))
                ok = [m async for m in stub.Generate(pb.GenerateRequest(text="Hi", sampling=pb.SamplingParams(
                    max_tokens=2)), timeout=20)]
        finally:
            await server.stop(0)
        return out, ok

    out, ok = asyncio.run(go())
    for name, code, details, took in out:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, code, details[:200])
        assert len(details) <= MAX_STATUS_TEXT and took < 5.0, (name, len(details), took)
    assert "deeper than" in out[3][2] and "response_format" in out[2][2]
    assert ok[-1].finish_reason == pb.FINISH_REASON_LENGTH


def test_schema_depth_is_measured_without_recursion_and_bounded():
    assert json_depth("x") == 0 and json_depth({}) == 1 and json_depth({"a": [1, {"b": []}]}) == 4
    deep: list = []
    for _ in range(100_000):                    # far past Python's recursion limit
        deep = [deep]
    assert json_depth(deep) == 100_001
    StructuredOutput("json_schema", nested(60)).validate()          # 121 levels: fine
    with pytest.raises(ValueError, match=f"deeper than {MAX_SCHEMA_DEPTH}"):
        StructuredOutput("json_schema", nested(70)).validate()
