"""The HTTP API's bearer-token gate, an ASGI middleware in front of the app: a request without a
valid `Authorization: Bearer <token>` (the gRPC endpoint's tokens, router/auth.py) gets 401 with
OpenAI's error body before its body is read, sized or parsed. /health stays open for load balancers."""
from __future__ import annotations

from pdcluster.router.openai.errors import OpenAIError, send_error

OPEN_PATHS = ("/health",)
TENANT = "pdcluster.tenant"     # the scope key the caller's tenant travels under (the prefix-cache salt)


class BearerGate:
    def __init__(self, app, auth=None):
        self.app, self.auth = app, auth

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.auth is not None and scope.get("path") not in OPEN_PATHS:
            header = dict(scope.get("headers") or ()).get(b"authorization")
            tenant = self.auth.tenant(header.decode("latin-1") if header is not None else None)
            if tenant is None:
                return await send_error(send, OpenAIError(401, "missing or invalid authorization bearer token",
                                                          "authentication_error", code="invalid_api_key"))
            scope[TENANT] = tenant
        await self.app(scope, receive, send)

    @staticmethod
    def tenant(scope) -> str | None:
        """The tenant the gate let in (None: no auth configured)."""
        return scope.get(TENANT)
