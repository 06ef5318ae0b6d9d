"""bench/openai_client.py retries a request once when the server closed its connection before answering
(llama-server's HTTP library closes a keep-alive connection after 5 requests, racing the client's next one),
and only then: a second failure, or a failure after tokens came, is the request's error."""
import asyncio
import json

import httpx
import pytest

from pdcluster.bench import openai_client

SSE = "".join(f"data: {json.dumps(m)}\n\n" for m in (
    {"choices": [{"text": "a", "finish_reason": None}]},
    {"choices": [{"text": "b", "finish_reason": "length"}]},
    {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}})) + "data: [DONE]\n\n"


async def _serve(drops: int, sse: str = SSE):
    """A server that drops its first `drops` connections after reading the request, then streams `sse`."""
    seen = []

    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        seen.append(1)
        if len(seen) <= drops:
            writer.close()
            return
        body = sse.encode()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1", seen


@pytest.mark.parametrize("drops,ok", [(0, True), (1, True), (2, False)])
def test_a_dropped_connection_is_retried_once(drops, ok):
    async def go():
        server, url, seen = await _serve(drops)
        async with server, httpx.AsyncClient(timeout=10) as c:
            out = await openai_client.generate(c, url, {"prompt": [1, 2, 3]}, 3, chat=False)
        return out, len(seen)

    out, requests = asyncio.run(go())
    assert out.success is ok
    assert requests == min(drops, 1) + 1                    # one retry at most
    if ok:
        assert out.output_tokens == 2 and out.ttft > 0
    else:
        assert out.error == "RemoteProtocolError" and out.output_tokens == 0


def test_raw_utf8_line_separators_inside_a_json_string_do_not_cut_its_line():
    """llama-server sends JSON in raw UTF-8: generated text may hold U+2028 or U+0085, which httpx's aiter_lines
    takes for line ends (the peers run of 12-07 03:25 died on such a chunk with a JSONDecodeError). Only CR / LF
    end an SSE line; CRLF and lone CR are line ends too."""
    texts = ["a\u2028b", "c\x85d\u2029", "e"]
    sse = "".join(f"data: {json.dumps({'choices': [{'text': t, 'finish_reason': None}]}, ensure_ascii=False)}{end}{end}"
                  for t, end in zip(texts, ("\n", "\r\n", "\r")))
    usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 3}}
    sse += f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n"
    assert "\u2028" in sse and "\\u2028" not in sse                      # raw, as llama-server sends it

    async def go():
        server, url, _ = await _serve(0, sse)
        async with server, httpx.AsyncClient(timeout=10) as c:
            return await openai_client.generate(c, url, {"prompt": [1, 2, 3]}, 3, chat=False)

    out = asyncio.run(go())
    assert out.success and out.output_tokens == 3 and len(out.itl) == 2       # three chunks with text, none cut


def test_a_stream_ended_with_abort_is_a_failure_under_the_abort_key():
    """Before, it failed with an empty error key: the table printed a row named ''."""
    from pdcluster.bench.metrics import ABORTED, calculate_metrics
    sse = "".join(f"data: {json.dumps(m)}\n\n" for m in (
        {"choices": [{"text": "a", "finish_reason": None}]},
        {"choices": [{"text": "b", "finish_reason": "abort"}]},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}})) + "data: [DONE]\n\n"

    async def go():
        server, url, _ = await _serve(0, sse)
        async with server, httpx.AsyncClient(timeout=10) as c:
            return await openai_client.generate(c, url, {"prompt": [1, 2, 3]}, 3, chat=False)

    out = asyncio.run(go())
    assert not out.success and out.error == ABORTED
    assert calculate_metrics([out], 1.0, None)["errors"] == {ABORTED: 1}
