"""Bearer-token authentication for the public endpoint, and the tenant it maps to.

Token file: one token per line, optionally `tenant:token`; blank lines and `#` comments skipped.
The tenant (default: a digest of the token) becomes the request's prefix-cache salt on the server
side, so tenants never share cached KV, and a client cannot choose its salt.
"""
from __future__ import annotations

import hashlib
import hmac
from pathlib import Path


class TokenAuth:
    def __init__(self, tokens: dict[str, str]):
        if not tokens:
            raise ValueError("auth token file has no tokens")
        self._tokens = [(t.encode(), tenant) for t, tenant in tokens.items()]

    @classmethod
    def from_file(cls, path: str) -> "TokenAuth":
        tokens = {}
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            tenant, sep, token = line.partition(":")
            if not sep:
                tenant, token = "tenant-" + hashlib.sha256(line.encode()).hexdigest()[:12], line
            if len(token) < 16:
                raise ValueError(f"{path}:{n}: token shorter than 16 characters")
            tokens[token] = tenant
        return cls(tokens)

    def tenant(self, authorization: str | None) -> str | None:
        """The tenant for an `authorization: Bearer <token>` value (the scheme's name in any case, as HTTP
        has it: RFC 9110 11.1), or None. Constant time per token."""
        scheme, _, given = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer":
            return None
        given = given.strip().encode()
        found = None
        for token, tenant in self._tokens:
            if hmac.compare_digest(given, token):
                found = tenant
        return found
