"""The OpenAI-compatible HTTP API on the router (FastAPI; served by uvicorn in the router's process,
router/openai/server.py): /v1/completions, /v1/chat/completions, /v1/models (and /v1/models/{id}),
/tokenize, /detokenize, /health.

Every completion goes through Router.generate, the path gRPC takes: placement, migration, admission,
metrics and the per-tenant prefix-cache salt are shared. Errors use OpenAI's body
{"error": {"message", "type", "param", "code"}}: 400 bad input (an unknown field included), 401 no
valid bearer token (bearer.py, before the body is read), 413 a body past 4 MiB (body_limit.py), 429
overloaded, 503 unavailable or shutting down. A stream whose client stops reading is cut off (sse.py).
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import aclosing

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from pdcluster.logs import clip
from pdcluster.router.errors import Overloaded
from pdcluster.router.lifecycle.choices import choice_events
from pdcluster.router.openai import convert
from pdcluster.router.openai.bearer import BearerGate
from pdcluster.router.openai.body_limit import BodyLimit
from pdcluster.router.openai.errors import OpenAIError, as_openai
from pdcluster.router.openai.schemas import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from pdcluster.router.openai.sse import SSEResponse
from pdcluster.router.openai.tool_stream import AnswerReader
from pdcluster.router.openai.tools import read_answer
from pdcluster.router.validate import InvalidRequest, check_token_ids, tokenize_executor

TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict"}    # union members' names in pydantic's error locations


def validation_error(exc: ValidationError) -> OpenAIError:
    """The first error of a body's validation (`parsed`), as OpenAI's body: param is the field's path (indices kept,
    pydantic's union tags dropped: "prompt", not "prompt.str")."""
    err = exc.errors()[0]
    kind, ctx, msg = err.get("type"), err.get("ctx") or {}, str(err.get("msg"))
    if kind == "json_invalid":
        return OpenAIError(400, f"the body is not valid JSON ({ctx.get('error', msg)})", code="invalid_json")
    loc = list(err.get("loc", ()))
    key = loc.pop() if kind == "extra_forbidden" and loc else None    # the unknown field's own name, as sent
    path = []
    for x in loc:
        if not isinstance(x, int) and (not x.isidentifier() or x in TYPE_TAGS):
            break
        path.append(str(x))
    if key is not None:
        path.append(str(key))
    param = ".".join(path) or None
    if kind == "extra_forbidden":
        return OpenAIError(400, f"unsupported parameter {clip(param)}", param=param, code="unsupported_parameter")
    if param is None and kind == "missing":
        return OpenAIError(400, "the request body must be a JSON object of the request's fields")
    return OpenAIError(400, f"{param}: {msg}" if param else msg, param=param)


class Api:
    """The app's state: the router, what the model is, who may call, whether it drains."""

    def __init__(self, router, model_name: str, vocab_size: int, auth=None, slow_reader_timeout_s: float = 30.0):
        self.router, self.model, self.vocab_size, self.auth = router, model_name, vocab_size, auth
        self.slow_reader_timeout_s = slow_reader_timeout_s   # a stream write stalled this long ends it (sse.py)
        self.draining = False
        self.cut = asyncio.Event()          # set at the drain bound: responses still running end with 503
        self.cut_reason = ""
        # tokenizing a long prompt is CPU work: the router's one tokenizing thread (the gRPC server's too: a fast
        # tokenizer must not be entered by two threads at once), never the event loop
        self.tokenize = tokenize_executor(router)

    def cut_error(self) -> OpenAIError:
        return OpenAIError(503, self.cut_reason or "the server is shutting down", "service_unavailable")

    @staticmethod
    def tenant(request: Request) -> str | None:
        """The caller's tenant, as the bearer gate found it (None: no auth configured)."""
        return BearerGate.tenant(request.scope)

    async def job(self, body) -> convert.Job:
        if self.draining:
            raise OpenAIError(503, "the server is shutting down: retry on another", "service_unavailable")
        r = self.router
        r.check_room()                      # a full queue is answered before the tokenizing
        job = await asyncio.get_running_loop().run_in_executor(
            self.tokenize, convert.parse, body, r.tokenizer, self.vocab_size, r.context_tokens)
        if len(job.prompts) * job.n > r.cfg.max_in_flight:     # never admitted, even idle: not a 429 to retry
            raise OpenAIError(400, f"{len(job.prompts)} prompt(s) x n={job.n} is {len(job.prompts) * job.n} "
                              f"choices; this server runs at most {r.cfg.max_in_flight} at once", param="n")
        return job


def asgi_app(api: Api):
    """What uvicorn serves: the bearer gate first (401 before a body is read), then the body bound
    (413), then the routes."""
    return BearerGate(BodyLimit(_routes(api)), api.auth)


def _routes(api: Api) -> FastAPI:
    app = FastAPI(title="pdcluster", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(OpenAIError)
    async def _openai(request, exc):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def _failed(request, exc):        # a bug's 500, in OpenAI's shape (the exception is logged by the server)
        e = as_openai(exc)
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc):          # unknown path, wrong method (a body's errors: `parsed`)
        e = OpenAIError(exc.status_code, str(exc.detail))
        return JSONResponse(e.body(), status_code=e.status)

    @app.get("/health")
    async def health():
        ok = api.router.ready() and not api.draining
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    def model_card() -> dict:
        return {"id": api.model, "object": "model", "created": 0, "owned_by": "pdcluster",
                "max_model_len": api.router.context_tokens}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):            # OpenAI's retrieve: the served model, else 404
        if model != api.model:
            raise OpenAIError(404, f"model {clip(model)} is not served here (GET /v1/models)", param="model",
                              code="model_not_found")
        return model_card()

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await parsed(api, TokenizeRequest, request)
        check_model(api, body)
        r = api.router

        def reply() -> bytes:   # the whole reply off the loop: a prompt may be ~context x longest token bytes
            ids = convert.tokenize(body, r.tokenizer, api.vocab_size, r.context_tokens)
            return json_text({"count": len(ids), "max_model_len": r.context_tokens, "tokens": ids,
                              "token_strs": r.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs
                              else None}).encode()
        try:
            out = await asyncio.get_running_loop().run_in_executor(api.tokenize, reply)
        except InvalidRequest as e:
            raise as_openai(e) from None
        return Response(out, media_type="application/json")

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await parsed(api, DetokenizeRequest, request)
        check_model(api, body)
        r = api.router
        try:
            ids = check_token_ids(body.tokens, api.vocab_size, r.context_tokens, field="tokens")
        except InvalidRequest as e:
            raise as_openai(e) from None
        return {"prompt": await asyncio.get_running_loop().run_in_executor(api.tokenize, r.tokenizer.decode, ids)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await respond(api, await parsed(api, CompletionRequest, request), request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await respond(api, await parsed(api, ChatCompletionRequest, request), request, chat=True)

    return app


async def parsed(api: Api, model: type[BaseModel], request: Request):
    """The request body as `model`: its JSON parsed and validated on the tokenizing thread, off the event loop (a
    4 MiB body's JSON and pydantic's checks took up to ~0.4 s of it there); a ValidationError is the OpenAI 400."""
    try:
        raw = await request.body()
    except ClientDisconnect:                # gone, or cut at the body bound (BodyLimit answered 413): no one reads this
        raise OpenAIError(400, "the client left before its body was read") from None
    body, err = await asyncio.get_running_loop().run_in_executor(api.tokenize, _validated, model, raw)
    if err is not None:
        raise err
    return body


def _validated(model: type[BaseModel], raw: bytes) -> tuple[BaseModel | None, OpenAIError | None]:
    """(body, None) or (None, its OpenAI 400): both built here, on the tokenizing thread (a body of 900,000
    bad items made pydantic's error list in ~2 s)."""
    try:
        return model.model_validate_json(raw), None
    except ValidationError as e:
        return None, validation_error(e)


def check_model(api: Api, body) -> None:
    if body.model and body.model != api.model:     # none named: the served one (vLLM's)
        raise OpenAIError(404, f"model {clip(body.model)} is not served here (GET /v1/models)", param="model",
                          code="model_not_found")


async def respond(api: Api, body, request: Request, chat: bool):
    tenant = api.tenant(request)
    check_model(api, body)
    try:
        job = await api.job(body)
    except (InvalidRequest, Overloaded) as e:
        raise as_openai(e) from None
    base = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    events = choice_events(api.router, job.choices(base), tenant)
    try:                                    # errors before any token are an HTTP status
        first = await unless_gone(request, _first(events), api)
    except ClientGone:                      # left during the prefill: its choices are cancelled
        await events.aclose()
        return Response(status_code=CLIENT_GONE)
    except Exception as e:                  # noqa: BLE001
        await events.aclose()
        raise as_openai(e) from None
    opts = body.stream_options if body.stream else None    # (set without stream: refused by convert.parse)
    stream = Stream(api, job, base, chat, bool(opts and opts.include_usage),
                    bool(opts and opts.include_usage and opts.continuous_usage_stats))
    if body.stream:                         # from here the response watches its client and the drain (sse.py)
        return SSEResponse(stream.sse(first, events), api.slow_reader_timeout_s, api.cut, api.cut_error)
    async with aclosing(events):
        try:
            await unless_gone(request, stream.collect(first, events), api)
        except ClientGone:
            return Response(status_code=CLIENT_GONE)
    # off the event loop: n choices x max_tokens x top_logprobs token texts are seconds of decoding, and the
    # encoding of what they make (megabytes with echo and prompt logprobs) a fraction of a second more
    body = await asyncio.get_running_loop().run_in_executor(api.tokenize, lambda: json_text(stream.whole()).encode())
    return Response(body, media_type="application/json")      # (bytes: Response does not encode them again)


def json_text(obj: dict) -> str:
    """obj as JSON text, every non-ASCII character escaped: lone surrogates too (a tool answer's "\\udc00"
    decodes to one), which JSONResponse's UTF-8 cannot encode. Strict JSON: a NaN or infinity raises.
    Its choices are encoded one call each: one C call holds the GIL, and megabytes of echoed prompt
    logprobs in one took the event loop's thread a quarter of a second."""
    choices = obj.get("choices")
    if not isinstance(choices, list) or len(choices) < 2:
        return json.dumps(obj, allow_nan=False)
    head = json.dumps({**obj, "choices": _CHOICES}, allow_nan=False)
    return head.replace(json.dumps(_CHOICES), "[" + ", ".join(json.dumps(c, allow_nan=False) for c in choices) + "]", 1)


_CHOICES = "\0choices\0"      # json_text's placeholder (\\u0000 in the text; the envelope holds no client string)

CLIENT_GONE = 499           # nginx's "client closed request": never seen by the client, which has left


class ClientGone(Exception):
    """The HTTP client disconnected before its response was ready."""


async def _first(events):
    try:
        return await anext(events)
    except StopAsyncIteration:
        return None


async def unless_gone(request: Request, work, api: Api):
    """work's result, unless the client disconnects first (ClientGone) or the server's drain bound
    passes (api.cut: the 503 OpenAIError): then work is cancelled (a cancelled choice stream aborts
    its request on every worker, its KV blocks freed)."""
    task = asyncio.ensure_future(work)
    gone, cut = asyncio.ensure_future(_disconnect(request)), asyncio.ensure_future(api.cut.wait())
    try:
        await asyncio.wait((task, gone, cut), return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        if gone.done():
            raise ClientGone
        raise api.cut_error()
    finally:
        for t in (task, gone, cut):
            t.cancel()
        await asyncio.gather(task, gone, cut, return_exceptions=True)


async def _disconnect(request: Request) -> None:
    """Returns when the client has gone (the body is read by now: nothing else comes but that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Stream:
    """One response's choices as events arrive: SSE chunks, or the whole object at the end."""

    def __init__(self, api: Api, job: convert.Job, rid: str, chat: bool, include_usage: bool,
                 continuous_usage: bool = False):
        self.api, self.job, self.rid, self.chat, self.include_usage = api, job, rid, chat, include_usage
        self.continuous_usage = continuous_usage      # every chunk: its choice's usage so far (vLLM's)
        self.tokens_out = [0] * (len(job.prompts) * job.n)
        self.created = int(time.time())
        n = job.n
        self.choices = [convert.ChoiceState(k) for k in range(len(job.prompts) * n)]
        self.readers: dict[int, AnswerReader] = {}     # streamed tool answers: each choice's envelope so far
        self.raw_sent: dict[int, int] = {}

    def _record(self, k: int, ev) -> convert.ChoiceState:
        c = self.choices[k]
        c.text.append(ev.text)
        c.logprobs += ev.logprobs
        if ev.finish_reason:
            c.finish_reason = ev.finish_reason
        if ev.prompt_logprobs is not None:
            c.prompt_logprobs = ev.prompt_logprobs
        if ev.usage:
            c.prompt_tokens, c.completion_tokens = ev.usage["prompt_tokens"], ev.usage["completion_tokens"]
            c.cached_tokens = ev.usage["cached_prompt_tokens"]
        return c

    def _logprobs(self, lps, c: convert.ChoiceState | None = None, echo: int | None = None) -> dict | None:
        """The logprobs object of lps; streamed (c given), completions' text_offset continues c's. echo: the
        prompt (index) whose tokens come first: its first token, then lps (which start with its logprobs)."""
        if self.job.logprobs is None:
            return None
        tok = self.api.router.tokenizer
        if self.chat:
            return convert.chat_logprobs(tok, lps)
        lead = self.job.prompts[echo][:1] if echo is not None else []
        out = convert.completion_logprobs(tok, lps, c.text_offset if c else 0, lead)
        if c:
            c.text_offset += sum(len(t) for t in out["tokens"])
        return out

    async def collect(self, first, events) -> None:
        if first is not None:
            self._record(*first)
        async for k, ev in events:
            self._record(k, ev)

    def whole(self) -> dict:
        if any(c.finish_reason == "abort" for c in self.choices):
            raise OpenAIError(503, "the request failed after tokens were generated (workers lost)",
                              "service_unavailable")
        kind = "chat.completion" if self.chat else "text_completion"
        out = convert.envelope(kind, self.rid, self.api.model, self.created)
        out["choices"] = [self._choice_whole(c) for c in self.choices]
        out["usage"] = convert.usage(self.choices, self.job.n)
        return out

    def _choice_whole(self, c: convert.ChoiceState) -> dict:
        text = "".join(c.text)
        if self.chat and self.job.tools is not None:
            a = read_answer(text, c.finish_reason)
            return {"index": c.index, "message": self._tool_message(a), "logprobs": self._logprobs(c.logprobs),
                    "finish_reason": a.finish_reason}
        if self.chat:
            return {"index": c.index, "message": {"role": "assistant", "content": text},
                    "logprobs": self._logprobs(c.logprobs), "finish_reason": c.finish_reason}
        if self.job.echo is not None:
            p = c.index // self.job.n
            return {"index": c.index, "text": self.job.echo[p] + text, "finish_reason": c.finish_reason,
                    "logprobs": self._logprobs([*c.prompt_logprobs, *c.logprobs], echo=p)}
        return {"index": c.index, "text": text, "logprobs": self._logprobs(c.logprobs), "finish_reason": c.finish_reason}

    def _chunk(self, k: int, ev, started: bool) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        out = convert.envelope(kind, self.rid, self.api.model, self.created)
        reason = ev.finish_reason
        if self.chat:
            delta = {"content": ev.text} if started else {"role": "assistant", "content": ev.text}
            out["choices"] = [{"index": k, "delta": delta, "logprobs": self._logprobs(ev.logprobs, self.choices[k]),
                               "finish_reason": reason}]
        elif self.job.echo is not None and not started:     # the prompt comes first, in its choice's first chunk
            p = k // self.job.n
            lp = self._logprobs([*(ev.prompt_logprobs or ()), *ev.logprobs], self.choices[k], echo=p)
            out["choices"] = [{"index": k, "text": self.job.echo[p] + ev.text, "logprobs": lp, "finish_reason": reason}]
        else:
            out["choices"] = [{"index": k, "text": ev.text, "logprobs": self._logprobs(ev.logprobs, self.choices[k]),
                               "finish_reason": reason}]
        return out

    @staticmethod
    def _tool_message(a) -> dict:
        """A tool answer's message: content, or tool calls."""
        out = {"role": "assistant", "content": a.content}
        if a.tool_calls is not None:
            out["tool_calls"] = a.tool_calls
        return out

    def _tool_chunk(self, k: int, ev, started: bool) -> dict | None:
        """A tool answer's chunk: what the event makes certain of its envelope (tool_stream.py), each call's name
        once whole and its arguments as they come; None when the event adds nothing yet."""
        r = self.readers.setdefault(k, AnswerReader())
        delta = r.feed(ev.text)
        if r.state == "raw":                 # not an envelope (the grammar's text always is): shown as it is
            delta, self.raw_sent[k] = {"content": r.buf[self.raw_sent.get(k, 0):]}, len(r.buf)
        reason = ev.finish_reason
        if reason == "stop" and r.calls and r.state == "done":     # a stop that cut the envelope: "stop" (read_answer's)
            reason = "tool_calls"
        if started and not (reason or delta.get("content") or delta.get("tool_calls") or ev.logprobs):
            return None
        out = convert.envelope("chat.completion.chunk", self.rid, self.api.model, self.created)
        head = {} if started else {"role": "assistant", "content": None}
        out["choices"] = [{"index": k, "delta": head | delta, "logprobs": self._logprobs(ev.logprobs, self.choices[k]),
                           "finish_reason": reason}]
        return out

    async def sse(self, first, events):
        started: set[int] = set()
        tools = self.chat and self.job.tools is not None
        try:
            async with aclosing(events):
                async for k, ev in _after(first, events):
                    if ev.prompt_logprobs:      # a whole prompt's logprobs (echo): decoded and encoded off the loop
                        line = await asyncio.get_running_loop().run_in_executor(
                            self.api.tokenize, self._line, k, ev, k in started, tools)
                    else:
                        line = self._line(k, ev, k in started, tools)
                    if line is not None:
                        yield line
                    started.add(k)
                    self._record(k, ev)
        except Exception as e:              # noqa: BLE001 - after the 200: the error goes in the stream
            yield self._data(as_openai(e).body())
        if self.include_usage:
            out = convert.envelope("chat.completion.chunk" if self.chat else "text_completion", self.rid,
                                   self.api.model, self.created)
            out["choices"], out["usage"] = [], convert.usage(self.choices, self.job.n)
            yield self._data(out)
        yield "data: [DONE]\n\n"

    def _line(self, k: int, ev, started: bool, tools: bool) -> str | None:
        """Choice k's event as an SSE data line (None: it adds nothing yet)."""
        chunk = self._tool_chunk(k, ev, started) if tools else self._chunk(k, ev, started)
        self.tokens_out[k] += len(ev.token_ids)
        if chunk is None:
            return None
        if self.continuous_usage:
            p, out = len(self.job.prompts[k // self.job.n]), self.tokens_out[k]
            chunk["usage"] = {"prompt_tokens": p, "completion_tokens": out, "total_tokens": p + out}
        return self._data(chunk)

    @staticmethod
    def _data(obj: dict) -> str:
        return f"data: {json.dumps(obj, separators=(',', ':'), allow_nan=False)}\n\n"


async def _after(first, events):
    """first (when there is one), then the rest of events."""
    if first is not None:
        yield first
    async for x in events:
        yield x
