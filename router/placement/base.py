"""The answer every placement policy gives, and the interface it gives it through."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from pdcluster.router.placement.load import WorkerLoad


@dataclass
class Placement:
    """Where one request goes: prefill on `prefill` (None: on the decode worker itself), decode on `decode`."""
    prefill: str | None
    decode: str
    kind: str                       # "remote" | "local"
    estimate: dict | None = None    # the policy's breakdown (cost model: TTFT terms in seconds)
    # a fallback the policy would rather not take now: no worker has room for the option it prefers
    # (the cost model's KV-full fallback). The router asks again after each status poll and takes
    # it once the request has waited RouterConfig.place_wait_s, if set (router/lifecycle/place.py).
    defer: bool = False


class Policy(Protocol):
    """prefills/decodes: every registered worker's load; exclude: worker ids not to use; hashes: the
    prompt's chain hashes (engine.hashing.block_hashes); now: time.time(). None: no decode worker."""

    def choose(self, prompt_len: int, prefills: list[WorkerLoad], decodes: list[WorkerLoad],
               exclude=frozenset(), *, hashes=None, now=None) -> Placement | None: ...


@dataclass
class LocalSwitch:
    """The simple policies' rule for prefilling on the decode worker: remote prefill off, no prefill
    worker up, or a prompt of at most `local_prefill_max_tokens` tokens."""
    local_prefill_max_tokens: int = 0
    remote_prefill: bool = True

    def local(self, prompt_len: int, prefills: list[WorkerLoad]) -> bool:
        return not self.remote_prefill or not prefills or prompt_len <= self.local_prefill_max_tokens
