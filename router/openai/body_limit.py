"""A bound on HTTP request bodies (the gRPC endpoint's 4 MiB): a larger one gets 413 with OpenAI's
error body before it is buffered, whether it declares its length or streams chunks."""
from __future__ import annotations

from pdcluster.router.openai.errors import OpenAIError, send_error

MAX_BODY_BYTES = 4 * 2**20


class BodyLimit:
    """ASGI middleware around the app."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._refuse(send)
        seen, refused = 0, False

        async def bounded():
            nonlocal seen, refused
            msg = await receive()
            if msg["type"] == "http.request" and not refused:
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:      # answer now; the app sees the client leave
                    refused = True
                    await self._refuse(send)
                    return {"type": "http.disconnect"}
            return msg

        async def guarded_send(msg):
            if not refused:                    # after our 413, whatever the app answers is dropped
                await send(msg)
        await self.app(scope, bounded, guarded_send)

    async def _refuse(self, send) -> None:
        await send_error(send, OpenAIError(413, f"request body larger than {self.max_bytes} bytes",
                                           code="request_too_large"))
