"""A streamed (SSE) response, bounded against a client that stops reading.

The HTTP twin of the gRPC endpoint's `server.slow_reader_timeout_s` (router/server.py).
uvicorn's flow control stalls a write once the client's TCP window and the server's buffers are
full. A write stalled for the bound ends the response: its body generator is closed, which cancels
the request's choices on every worker (their KV blocks freed), and the client's connection is reset
(router/conn_reset.py), since no status can reach a client that takes no bytes. However the response
ends, its body generator is closed before this returns.
"""
from __future__ import annotations

import asyncio
import logging

from starlette.responses import StreamingResponse

from pdcluster.router.conn_reset import reset_client

log = logging.getLogger(__name__)


class SlowReader(Exception):
    """A response write stalled past the bound."""


class SSEResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, content, slow_reader_timeout_s: float):
        super().__init__(content)
        self.slow_reader_timeout_s = slow_reader_timeout_s

    async def __call__(self, scope, receive, send) -> None:
        bound = self.slow_reader_timeout_s

        async def bounded(msg) -> None:
            try:
                async with asyncio.timeout(bound):
                    await send(msg)
            except TimeoutError:
                raise SlowReader from None
        try:
            await super().__call__(scope, receive, bounded)
        except SlowReader:
            await self.body_iterator.aclose()
            reset = reset_client(scope.get("client") or ("", 0), (scope.get("server") or ("", 0))[1])
            log.warning("HTTP client stopped reading: no chunk accepted for %gs; its stream is cancelled%s",
                        bound, " and its connection reset" if reset else " (its connection could not be reset)")
            if reset:
                await _until_disconnect(receive, bound)
        finally:
            await self.body_iterator.aclose()


async def _until_disconnect(receive, timeout_s: float) -> None:
    """Wait for the server to see the reset connection (then it logs no incomplete response)."""
    try:
        async with asyncio.timeout(timeout_s):
            while (await receive())["type"] != "http.disconnect":
                pass
    except TimeoutError:
        pass
