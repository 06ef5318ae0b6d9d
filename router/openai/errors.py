"""OpenAI's error body {"error": {"message", "type", "param", "code"}}: the exception the app raises,
the router's exceptions mapped to it, and the same body sent from a raw ASGI middleware."""
from __future__ import annotations

import json

from pdcluster.router.errors import Overloaded, Unavailable
from pdcluster.router.validate import InvalidRequest

STATUS = {"INVALID_ARGUMENT": 400, "ALREADY_EXISTS": 409, "RESOURCE_EXHAUSTED": 429}


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


def as_openai(e: Exception) -> OpenAIError:
    if isinstance(e, OpenAIError):
        return e
    if isinstance(e, InvalidRequest):
        return OpenAIError(STATUS.get(e.code, 400), str(e), param=e.param)
    if isinstance(e, Overloaded):
        return OpenAIError(429, str(e), "rate_limit_exceeded")
    if isinstance(e, Unavailable):
        return OpenAIError(503, str(e), "service_unavailable")
    return OpenAIError(500, f"request failed: {type(e).__name__}", "internal_error")


async def send_error(send, e: OpenAIError) -> None:
    """The whole error response through an ASGI `send` (middlewares that answer before the app)."""
    body = json.dumps(e.body()).encode()
    await send({"type": "http.response.start", "status": e.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
