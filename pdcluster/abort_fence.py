"""Request ids aborted before their request arrived.

A worker actor runs each RPC on its own thread, so a request's abort (the router gave up on it
mid-placement: its client left, or a sibling choice was refused) can reach the engine thread
before the reserve, prefill or local-prefill call that it follows. Such an abort finds nothing
and leaves the id here; the late call is then refused (RequestAborted) instead of holding blocks
that nobody will start or free. Router request ids are unique per attempt, so a fenced id is
never reused. Pure bookkeeping; a worker touches it on its engine thread only.
"""
from __future__ import annotations

import time
from collections import OrderedDict


class RequestAborted(RuntimeError):
    """The request's abort arrived first: nothing was allocated for it."""


class AbortFence:
    def __init__(self, ttl_s: float = 600.0, max_ids: int = 65536):
        """ttl_s: how long an id stays fenced (far past any RPC's reordering). max_ids: the oldest
        go first past this many."""
        self.ttl_s, self.max_ids = ttl_s, max_ids
        self._ids: OrderedDict[str, float] = OrderedDict()     # id -> monotonic expiry, oldest first

    def add(self, request_id: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._ids.pop(request_id, None)
        self._ids[request_id] = now + self.ttl_s
        while self._ids and (len(self._ids) > self.max_ids or next(iter(self._ids.values())) < now):
            self._ids.popitem(last=False)

    def check(self, request_id: str, now: float | None = None) -> None:
        """Raise RequestAborted when request_id was aborted before it arrived (and is still fenced)."""
        expiry = self._ids.get(request_id)
        if expiry is not None and expiry >= (time.monotonic() if now is None else now):
            raise RequestAborted(f"request {request_id} was aborted before it arrived")

    def __len__(self) -> int:
        return len(self._ids)
