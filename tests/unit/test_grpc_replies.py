"""The gRPC servicer's reply messages (router/server.py `message`) in front of a stand-in router, on loopback:
a message that carries a prompt's logprobs (every prompt token x its alternatives, times n choices) is built
on the router's tokenizing thread, not on the event loop every stream shares; small ones stay on the loop."""
import asyncio
import threading

import grpc
import pytest

from pdcluster.engine.sampling_params import TokenLogprobs
from pdcluster.router import server as server_mod
from pdcluster.router.lifecycle.run import Event
from pdcluster.router.proto import generation_pb2 as pb
from pdcluster.router.proto import generation_pb2_grpc as pb_grpc
from pdcluster.router.server import OFF_LOOP_LOGPROBS, RouterServer
from tests.unit.char_tok import VOCAB
from tests.unit.test_grpc_bad_input_status import Router as TwoTokens

pytestmark = pytest.mark.timeout(60)
CONTEXT = 2048


class Router(TwoTokens):
    """Two tokens a request; the first event carries the prompt's logprobs when asked (2 alternatives each)."""
    def __init__(self):
        super().__init__()
        self.context_tokens = CONTEXT

    async def generate(self, prompt_ids, params, request_id="", cache_salt=None, deadline_s=None):
        for i in range(2):
            ev = Event([5], "x", "length" if i else None,
                       dict(prompt_tokens=len(prompt_ids), completion_tokens=i + 1, cached_prompt_tokens=0) if i
                       else None)
            if i == 0 and params.prompt_logprobs is not None:
                ev.prompt_logprobs = tuple(TokenLogprobs(t, -1.0, ((7, -2.0), (8, -3.0))) for t in prompt_ids[1:])
            yield ev


def test_a_reply_with_a_prompts_logprobs_is_built_off_the_event_loop(monkeypatch):
    built = []
    message = server_mod.message

    def recorded(rid, k, ev):
        built.append((len(ev.prompt_logprobs or ()), threading.get_ident()))
        return message(rid, k, ev)
    monkeypatch.setattr(server_mod, "message", recorded)
    prompt = "a" * (OFF_LOOP_LOGPROBS + 100)

    async def go():
        server = RouterServer(Router(), "m", VOCAB, "127.0.0.1", 0)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                rq = pb.GenerateRequest(text=prompt, sampling=pb.SamplingParams(max_tokens=2, prompt_logprobs=2, n=2))
                return threading.get_ident(), [m async for m in pb_grpc.GenerationStub(ch).Generate(rq, timeout=20)]
        finally:
            await server.stop(0)
    loop_thread, msgs = asyncio.run(go())
    firsts = [m for m in msgs if m.prompt_logprobs]
    assert sorted(m.index for m in firsts) == [0, 1] and len(msgs) == 4
    for m in firsts:
        assert len(m.prompt_logprobs) == len(prompt) - 1
        lp = m.prompt_logprobs[0]
        top = [(t.token_id, t.logprob) for t in lp.top]
        assert (lp.token_id, lp.logprob, top) == (97, -1.0, [(7, -2.0), (8, -3.0)])
    assert {t != loop_thread for n, t in built if n} == {True}        # the two big ones: off the loop
    assert {t == loop_thread for n, t in built if not n} == {True}    # the rest: on it


class SlowCleanup(Router):
    """Streams a token every 50 ms until told to stop; a cancelled stream takes 0.5 s to clean up (the workers'
    aborts)."""

    async def generate(self, prompt_ids, params, request_id="", cache_salt=None, deadline_s=None):
        try:
            for _ in range(200):
                yield Event([5], "x")
                await asyncio.sleep(0.05)
        finally:
            await asyncio.shield(asyncio.sleep(0.5))


def test_a_cancelled_request_id_is_free_for_its_client_at_once_and_never_freed_for_another_call():
    """The id was held until the cancelled call's cleanup ended (50-200 ms on a real cluster): a client retrying
    it at once heard ALREADY_EXISTS. Now the client's end of the call frees it; the old call's late cleanup must
    not free it again under the retry."""
    async def go():
        server = RouterServer(SlowCleanup(), "m", VOCAB, "127.0.0.1", 0)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                stub = pb_grpc.GenerationStub(ch)
                rq = pb.GenerateRequest(request_id="x", text="hi", sampling=pb.SamplingParams(max_tokens=200))
                first = stub.Generate(rq)
                await first.read()
                first.cancel()
                await asyncio.sleep(0.1)                        # inside the old call's 0.5 s cleanup
                retry = stub.Generate(rq)
                got = await retry.read()                        # served, not ALREADY_EXISTS
                await asyncio.sleep(0.6)                        # the old call's cleanup ends meanwhile
                third = stub.Generate(rq)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await third.read()
                retry.cancel()
                return got, e.value.code()
        finally:
            await server.stop(0)
    got, code = asyncio.run(go())
    assert got.token_ids == [5] and code == grpc.StatusCode.ALREADY_EXISTS
