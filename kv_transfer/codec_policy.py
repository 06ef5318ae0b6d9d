"""CompressionPolicy: which codec (codec.py) a prefill worker uses for one transfer. Pure Python.

    mode "off"            always "none"
    mode "int8" / "fp8"   always that codec
    mode "auto"           AUTO_CODEC when the link is the bottleneck, else "none":
                              transfer_bytes / bandwidth  >  compute_s
                          i.e. shipping the request's uncompressed KV over this link (the meter's
                          EWMA, wire bytes/s) would take longer than the prefill compute it
                          overlaps with (layer-wise streaming hides at most that much). Unknown
                          bandwidth (no sample yet on this link) or compute rate: "none", so a
                          link is first measured uncompressed.

AUTO_CODEC is int8: on the embedded model's KV its relative error is ~half of fp8's (1.3% vs 2.6%,
codec.py) at the same size on the wire.
"""
from __future__ import annotations

from dataclasses import dataclass

MODES = ("off", "int8", "fp8", "auto")
AUTO_CODEC = "int8"


@dataclass(frozen=True)
class CompressionPolicy:
    mode: str = "off"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"kv compression must be one of {MODES}, got {self.mode!r}")

    def choose(self, transfer_bytes: int, compute_s: float | None, bandwidth: float | None) -> str:
        """The codec for one transfer of `transfer_bytes` uncompressed K+V bytes over a link of
        `bandwidth` bytes/s (None: not measured yet), overlapping `compute_s` seconds of prefill
        compute (None: rate not learned yet)."""
        if self.mode == "off":
            return "none"
        if self.mode != "auto":
            return self.mode
        if not bandwidth or compute_s is None or transfer_bytes <= 0:
            return "none"
        return AUTO_CODEC if transfer_bytes / bandwidth > compute_s else "none"


def prefill_seconds(tokens: int, prefill_tokens: int, prefill_s: float) -> float | None:
    """Seconds to prefill `tokens` at the worker's learned rate (its step counters: prefill_tokens
    computed in prefill_s busy seconds); None before its first prefill step."""
    if prefill_tokens <= 0 or prefill_s <= 0:
        return None
    return tokens * prefill_s / prefill_tokens
