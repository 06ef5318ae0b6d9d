"""`pdcluster bench serve --backend openai|openai-chat`: the same workload through any
OpenAI-compatible server (pdcluster's HTTP API, vLLM, llama.cpp's llama-server), streamed, timed the
way the gRPC client times pdcluster: TTFT at the first chunk with text, one inter-token gap per
chunk after it.

openai: POST /v1/completions with the prompt as token ids (the same ids every server gets);
openai-chat: POST /v1/chat/completions with the prompt decoded to text as one user message.
Output tokens come from the final usage chunk (stream_options.include_usage) when the server sends
one, else one per chunk. Multi-turn datasets need token ids back and run on the gRPC backend only.
"""
from __future__ import annotations

import json
import re
import time

import httpx

from pdcluster.bench.datasets import BenchRequest
from pdcluster.bench.metrics import ABORTED, RequestOutput

BACKENDS = ("grpc", "openai", "openai-chat")


def body(req: BenchRequest, prompt_ids: list[int] | None, model: str, chat: bool, tokenizer=None) -> dict:
    b = {"model": model, "max_tokens": req.output_len, "temperature": 0.0, "stream": True,
         "stream_options": {"include_usage": True}}
    if req.ignore_eos:
        b["ignore_eos"] = True
    text = req.prompt_text if prompt_ids is None else None
    if chat:
        if text is None:
            text = tokenizer.decode(prompt_ids)
        return b | {"messages": [{"role": "user", "content": text}]}
    return b | {"prompt": text if text is not None else prompt_ids}


async def generate(client: httpx.AsyncClient, base_url: str, b: dict, prompt_len: int, chat: bool) -> RequestOutput:
    """One streamed request; its RequestOutput (error: the HTTP status, or the error chunk's type). A pooled
    connection the server closed before the request reached it (e.g. llama-server's HTTP library closes a
    keep-alive connection after 5 requests, racing the client's next one) is retried once on a new one, as
    the official OpenAI client retries connection errors; the timings then include the failed attempt."""
    start = time.perf_counter()
    out = await _generate(client, base_url, b, prompt_len, chat, start)
    if out.error in RETRIED and out.output_tokens == 0:
        out = await _generate(client, base_url, b, prompt_len, chat, start)
    return out


_EOL = re.compile(r"\r\n|\r|\n")    # SSE's line ends, and only those


async def sse_lines(r: httpx.Response):
    """r's body as SSE lines: ended by CRLF, LF or CR only. (httpx's aiter_lines also ends a line at U+2028, U+0085
    and str.splitlines' other boundaries, which a JSON string in raw UTF-8 may hold: llama-server's data lines do,
    so a chunk of generated text that has one was cut in two.) A CRLF split across two reads yields one empty
    line more: SSE's event separator, which the reader skips as it skips any line not starting with "data: "."""
    buf = ""
    async for text in r.aiter_text():
        *lines, buf = _EOL.split(buf + text)
        for line in lines:
            yield line
    if buf:
        yield buf


RETRIED = ("RemoteProtocolError", "ConnectError", "ReadError")    # connection errors, retried if no token came


async def _generate(client: httpx.AsyncClient, base_url: str, b: dict, prompt_len: int, chat: bool,
                    start: float) -> RequestOutput:
    out = RequestOutput(prompt_tokens=prompt_len)
    last, chunks, usage, reason = None, 0, None, None
    url = f"{base_url}/chat/completions" if chat else f"{base_url}/completions"
    try:
        async with client.stream("POST", url, json=b) as r:
            if r.status_code != 200:
                await r.aread()
                out.error, out.latency = f"HTTP_{r.status_code}", time.perf_counter() - start
                return out
            async for line in sse_lines(r):
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                msg = json.loads(line[6:])
                if "error" in msg:
                    out.error = str(msg["error"].get("type") or "ERROR")
                    break
                usage = msg.get("usage") or usage
                for c in msg.get("choices") or ():
                    text = (c.get("delta") or {}).get("content") if chat else c.get("text")
                    reason = c.get("finish_reason") or reason
                    if text:
                        t = time.perf_counter()
                        if last is None:
                            out.ttft = t - start
                        else:
                            out.itl.append(t - last)
                        last, chunks = t, chunks + 1
    except httpx.HTTPError as e:
        out.error = type(e).__name__
    out.latency = time.perf_counter() - start
    out.output_tokens = usage["completion_tokens"] if usage else chunks
    if usage:
        out.prompt_tokens = usage.get("prompt_tokens", prompt_len)
        out.cached_prompt_tokens = ((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    if not out.error and reason == "abort":
        out.error = ABORTED                 # the gRPC client's key for the same end
    if not out.error and not chunks:
        out.error = "NO_TOKENS"
    out.success = not out.error
    return out


async def model_of(base_url: str) -> tuple[str, int | None]:
    """The server's first model id and, when it says, its context length."""
    async with httpx.AsyncClient(timeout=30) as c:
        r = await c.get(f"{base_url}/models")
        r.raise_for_status()
        m = r.json()["data"][0]
    return m["id"], m.get("max_model_len")
