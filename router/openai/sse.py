"""A streamed (SSE) response, bounded against a client that stops reading.

The HTTP twin of the gRPC endpoint's `server.slow_reader_timeout_s` (router/server.py).
uvicorn's flow control stalls a write once the client's TCP window and the server's buffers are
full. A write stalled for the bound ends the response: its body generator is closed, which cancels
the request's choices on every worker (their KV blocks freed), and the client's connection is reset
(router/conn_reset.py), since no status can reach a client that takes no bytes. A client that
disconnects ends it the same way, and so does the server's drain bound (`pdcluster serve`'s graceful
stop), which tells the client in the stream. However the response ends, its body generator is closed
before this returns.
"""
from __future__ import annotations

import asyncio
import json
import logging

from starlette.responses import StreamingResponse

from pdcluster.router.conn_reset import reset_client
from pdcluster.router.openai.errors import send_error

log = logging.getLogger(__name__)


class SlowReader(Exception):
    """A response write stalled past the bound."""


class SSEResponse(StreamingResponse):
    """Starlette's StreamingResponse, run on plain asyncio tasks this class owns (Starlette's own runs
    the body in an anyio task group): the body, a watch for the client's disconnect and, with `cut`,
    the server's drain bound. Whichever ends first ends the response; the body generator is closed
    (its choices cancelled on the workers). At the drain bound the client gets `cut_error()` (an
    OpenAI error event) and `data: [DONE]` as the stream's last bytes."""
    media_type = "text/event-stream"

    def __init__(self, content, slow_reader_timeout_s: float, cut: asyncio.Event | None = None, cut_error=None):
        """cut: set at the server's drain bound; cut_error(): the OpenAIError the client is told then."""
        super().__init__(content)
        self.slow_reader_timeout_s = slow_reader_timeout_s
        self.cut, self.cut_error = cut, cut_error

    async def __call__(self, scope, receive, send) -> None:
        bound = self.slow_reader_timeout_s
        started = False

        async def bounded(msg) -> None:
            nonlocal started
            try:
                async with asyncio.timeout(bound):
                    await send(msg)
            except TimeoutError:
                raise SlowReader from None
            started = True
        body = asyncio.ensure_future(self.stream_response(bounded))
        watches = [asyncio.ensure_future(_disconnected(receive))]
        if self.cut is not None:
            watches.append(asyncio.ensure_future(self.cut.wait()))
        try:
            await asyncio.wait([body, *watches], return_when=asyncio.FIRST_COMPLETED)
            if body.done():
                body.result()                   # SlowReader: below
            elif self.cut is not None and self.cut.is_set() and not watches[0].done():
                await _stop(body)
                err = self.cut_error()
                if started:                     # the 200 went out: the bound is told in the stream
                    tail = f"data: {json.dumps(err.body(), separators=(',', ':'))}\n\ndata: [DONE]\n\n"
                    await bounded({"type": "http.response.body", "body": tail.encode(), "more_body": False})
                else:
                    await send_error(bounded, err)
        except SlowReader:
            await self.body_iterator.aclose()
            reset = reset_client(scope.get("client") or ("", 0), (scope.get("server") or ("", 0))[1])
            log.warning("HTTP client stopped reading: no chunk accepted for %gs; its stream is cancelled%s",
                        bound, " and its connection reset" if reset else " (its connection could not be reset)")
            if reset:                           # wait for the server to see the reset connection (then it
                await asyncio.wait(watches[:1], timeout=bound)     # logs no incomplete response)
        finally:
            for t in (body, *watches):
                t.cancel()
            await asyncio.gather(body, *watches, return_exceptions=True)
            await self.body_iterator.aclose()


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _stop(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
