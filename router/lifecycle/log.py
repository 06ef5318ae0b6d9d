"""One logfmt line per request at its end, from a Trace filled in as the request goes."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass

log = logging.getLogger(__package__)   # "pdcluster.router.lifecycle": the request side's own logger


@dataclass
class Trace:
    """What the per-request log line and the metrics need, filled in as the request goes."""
    t0: float                               # perf_counter() at admission
    t_first: float | None = None            # perf_counter() of the first event carrying a token
    placement: dict | None = None           # the first attempt's Event.placement fields
    decode: str | None = None               # the decode worker of the last attempt (after migrations)
    migrations: int = 0
    n_out: int = 0
    cached: int = 0
    status: str | None = None               # a finish reason, "cancelled", "unavailable" or "error"
    pull: str | None = None                 # the first attempt's peer pull: "holder:blocks" (kv_transfer/pull.py)


def log_request(request_id: str, trace: Trace, n_in: int, ttft_s: float | None, e2e_s: float) -> None:
    """The request's line (also attached as `record.request` for JSON handlers)."""
    p = trace.placement or {}
    rec = dict(id=request_id, status=trace.status, prefill=p.get("prefill_worker", "-"),
               decode=trace.decode or p.get("decode_worker", "-"), migrations=trace.migrations,
               kind=("remote" if p.get("remote_prefill") else "local") if p else "-",
               prompt=n_in, completion=trace.n_out, cached=trace.cached, pull=trace.pull,
               ttft_ms=round(ttft_s * 1e3, 1) if ttft_s is not None else None, e2e_ms=round(e2e_s * 1e3, 1))
    log.info("request done %s", " ".join(f"{k}={_value(v)}" for k, v in rec.items()), extra={"request": rec})


def _value(v) -> str:
    """A logfmt value: quoted (JSON) where it holds a space, '=', a quote or nothing, so that a
    client's request id cannot add fields of its own to the line."""
    if v is None:
        return "-"
    s = str(v)
    return json.dumps(s) if not s or any(c in s for c in ' ="\\') else s
