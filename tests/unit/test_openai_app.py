"""The OpenAI app (router/openai/app.py) served by uvicorn on loopback in front of a stand-in router (its
events are the test's input): strict JSON out, the legacy completions' top_logprobs, vLLM's leniencies
on seed and model, and the non-streamed answer built off the event loop."""
import asyncio
import contextlib
import json
import math
import socket
import threading

import httpx
import pytest
import uvicorn

from pdcluster.engine.sampling_params import TokenLogprobs
from pdcluster.router.config import RouterConfig
from pdcluster.router.lifecycle.run import Event
from pdcluster.router.openai import app as app_mod
from pdcluster.router.openai.app import Api, asgi_app
from tests.unit.char_tok import VOCAB
from tests.unit.char_tok import CharTok as Tok

pytestmark = pytest.mark.timeout(60)
CONTEXT = 256


class Router:
    """Answers every request with `text`, one token an event; each token's logprob is `lp` and its top
    alternatives are `top` (token id, logprob) pairs, as many as asked."""

    def __init__(self, text="hi", lp=-0.5, top=((120, -1.0),)):
        self.tokenizer, self.context_tokens, self.cfg = Tok(), CONTEXT, RouterConfig()
        self.text, self.lp, self.top, self.params = text, lp, top, []

    def check_room(self):
        pass

    def ready(self):
        return True

    async def generate(self, ids, params, rid, cache_salt=None, deadline_s=None):
        self.params.append(params)
        for i, ch in enumerate(self.text):
            last = i == len(self.text) - 1
            lps = [TokenLogprobs(ord(ch), self.lp, tuple(self.top[:params.logprobs]))] if params.logprobs is not None \
                else []
            yield Event([ord(ch)], ch, "stop" if last else None,
                        dict(prompt_tokens=len(ids), completion_tokens=i + 1, cached_prompt_tokens=0) if last else None,
                        logprobs=lps)


@contextlib.asynccontextmanager
async def served(router):
    api = Api(router, "m", VOCAB)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(asgi_app(api), loop="none", lifespan="off", log_level="warning"))
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1") as c:
            yield c
    finally:
        server.should_exit = True
        await task
        api.tokenize.shutdown(wait=False)


def strict(text: str):
    """json.loads that refuses NaN and +-Infinity (JavaScript's JSON.parse, Go's and serde's do)."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def run(router, go):
    async def main():
        async with served(router) as c:
            return await go(c)
    return asyncio.run(main())


CHAT = {"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 2}


@pytest.mark.parametrize("lp", [-math.inf, math.nan])
def test_masked_logprobs_are_shown_at_openai_s_floor_and_every_answer_is_strict_json(lp):
    """A grammar or bias masks tokens to -inf before logprobs are taken: fewer allowed tokens than top_logprobs
    asks for came back as -Infinity, which Python's json writes and strict parsers refuse."""
    async def go(c):
        chat = await c.post("/chat/completions", json=CHAT)
        comp = await c.post("/completions", json={"model": "m", "prompt": "x", "logprobs": 2})
        stream = await c.post("/chat/completions", json=CHAT | {"stream": True})
        return chat, comp, stream

    chat, comp, stream = run(Router(lp=lp, top=((120, lp), (121, -math.inf))), go)
    assert chat.status_code == comp.status_code == stream.status_code == 200
    content = strict(chat.text)["choices"][0]["logprobs"]["content"]
    assert [x["logprob"] for x in content] == [-9999.0] * 2
    assert [t["logprob"] for t in content[0]["top_logprobs"]] == [-9999.0, -9999.0]
    assert strict(comp.text)["choices"][0]["logprobs"]["token_logprobs"] == [-9999.0] * 2
    chunks = [strict(line[6:]) for line in stream.text.splitlines() if line.startswith("data: {")]
    assert [x["logprob"] for ch in chunks for c in ch["choices"] if c.get("logprobs")
            for x in c["logprobs"]["content"]] == [-9999.0] * 2


def test_completions_top_logprobs_hold_the_sampled_token_too():
    """The legacy API's top_logprobs has up to logprobs + 1 entries: the sampled token's among them (vLLM's,
    OpenAI's). Before, a sampled token outside the top was missing, and logprobs=0 gave {}."""
    async def go(c):
        return [strict((await c.post("/completions", json={"model": "m", "prompt": "x", "logprobs": n})).text)
                for n in (0, 1)]

    zero, one = run(Router(text="h", lp=-6.9, top=((120, -0.4),)), go)
    assert zero["choices"][0]["logprobs"]["top_logprobs"] == [{"h": -6.9}]
    assert one["choices"][0]["logprobs"]["top_logprobs"] == [{"h": -6.9, "x": -0.4}]


def test_any_int64_seed_and_a_request_without_model_are_served_as_vllm_serves_them():
    async def go(c):
        neg = await c.post("/completions", json={"model": "m", "prompt": "x", "seed": -1})
        nomodel = await c.post("/completions", json={"prompt": "x"})
        empty = await c.post("/chat/completions", json={"model": "", "messages": [{"role": "user", "content": "x"}]})
        other = await c.post("/completions", json={"model": "other", "prompt": "x"})
        low = await c.post("/completions", json={"model": "m", "prompt": "x", "seed": -2 ** 63 - 1})
        return neg, nomodel, empty, other, low

    router = Router()
    neg, nomodel, empty, other, low = run(router, go)
    assert neg.status_code == nomodel.status_code == empty.status_code == 200, (neg.text, nomodel.text, empty.text)
    assert router.params[0].seed == 2 ** 64 - 1 and strict(nomodel.text)["model"] == "m"
    assert other.status_code == 404 and strict(other.text)["error"]["param"] == "model"
    assert low.status_code == 400 and strict(low.text)["error"]["param"] == "seed"


def test_a_non_streamed_answer_is_built_off_the_event_loop(monkeypatch):
    """n choices x max_tokens x top_logprobs token texts took seconds of decoding on the loop every stream and
    gRPC call shares; whole() runs on the router's tokenizing thread now."""
    threads = []
    whole = app_mod.Stream.whole

    def recorded(self):
        threads.append(threading.get_ident())
        return whole(self)
    monkeypatch.setattr(app_mod.Stream, "whole", recorded)

    async def go(c):
        loop_thread = threading.get_ident()
        r = await c.post("/chat/completions", json=CHAT)
        return loop_thread, r

    loop_thread, r = run(Router(), go)
    assert r.status_code == 200 and strict(r.text)["choices"][0]["message"]["content"] == "hi"
    assert threads and threads[0] != loop_thread


def test_a_bodys_validation_errors_become_its_400_off_the_event_loop(monkeypatch):
    """pydantic's error list for a body of 900,000 bad items took ~2 s to build: on the loop that every
    stream and gRPC call shares, after the validation itself had run off it."""
    threads = []
    convert_error = app_mod.validation_error

    def recorded(e):
        threads.append(threading.get_ident())
        return convert_error(e)
    monkeypatch.setattr(app_mod, "validation_error", recorded)

    async def go(c):
        return threading.get_ident(), await c.post("/chat/completions", json=CHAT | {"stop_token_ids": ["x"] * 50})

    loop_thread, r = run(Router(), go)
    assert r.status_code == 400 and strict(r.text)["error"]["param"] == "stop_token_ids.0"
    assert threads and threads[0] != loop_thread


class EchoRouter(Router):
    """Router whose first event carries the prompt's logprobs (prompt tokens 1..), when asked."""

    async def generate(self, ids, params, rid, cache_salt=None, deadline_s=None):
        first = True
        async for ev in super().generate(ids, params, rid, cache_salt, deadline_s):
            if first and params.prompt_logprobs is not None:
                ev.prompt_logprobs = tuple(TokenLogprobs(t, -1.0, tuple(self.top[:params.logprobs])) for t in ids[1:])
            first = False
            yield ev


def test_a_streamed_echo_with_prompt_logprobs_is_built_off_the_event_loop(monkeypatch):
    """The echoed prompt's logprobs (every prompt token x its top alternatives) were decoded and encoded on
    the loop: 1.5 s of stall for n=4 over an 8k prompt (review repro). The chunk that carries them is built
    on the tokenizing thread; the per-token chunks after it stay on the loop."""
    calls = []
    line = app_mod.Stream._line

    def recorded(self, k, ev, started, tools):
        calls.append((bool(ev.prompt_logprobs), threading.get_ident()))
        return line(self, k, ev, started, tools)
    monkeypatch.setattr(app_mod.Stream, "_line", recorded)

    async def go(c):
        loop_thread = threading.get_ident()
        body = {"model": "m", "prompt": "abc", "max_tokens": 2, "echo": True, "logprobs": 1, "stream": True, "n": 2}
        r = await c.post("/completions", json=body)
        return loop_thread, r

    loop_thread, r = run(EchoRouter(text="hi"), go)
    chunks = [strict(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
    firsts = [c["choices"][0] for c in chunks if c["choices"][0]["text"].startswith("abc")]
    assert r.status_code == 200 and len(firsts) == 2 and all(f["logprobs"]["tokens"][:3] == list("abc") for f in firsts)
    assert {t != loop_thread for echo, t in calls if echo} == {True}
    assert {t == loop_thread for echo, t in calls if not echo} == {True}


def test_json_text_encodes_choices_apart_into_the_same_text():
    from pdcluster.router.openai.app import json_text
    obj = {"id": "x", "choices": [{"text": "\udc00\u00e9", "n": 1.5}, {"text": "b"}], "usage": {"total_tokens": 3}}
    assert json_text(obj) == json.dumps(obj)
    with pytest.raises(ValueError):
        json_text({"id": "x", "choices": [{"lp": float("nan")}, {}]})


def test_tokenize_builds_its_whole_reply_off_the_event_loop(monkeypatch):
    """/tokenize turned its ids into token strings and JSON on the loop: a prompt of ~context x the longest
    token's bytes is ~166k ids on a 3k context, a second of stall per request (review repro)."""
    threads = []

    def to_tokens(self, ids):
        threads.append(threading.get_ident())
        return [chr(i) for i in ids]
    monkeypatch.setattr(Tok, "convert_ids_to_tokens", to_tokens, raising=False)

    async def go(c):
        url = str(c.base_url.copy_with(path="/tokenize"))    # (at the root, as vLLM serves it)
        return threading.get_ident(), await c.post(url, json={"prompt": "abc", "return_token_strs": True})

    loop_thread, r = run(Router(), go)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert strict(r.text) == {"count": 3, "max_model_len": CONTEXT, "tokens": [97, 98, 99], "token_strs": list("abc")}
    assert threads and threads[0] != loop_thread
