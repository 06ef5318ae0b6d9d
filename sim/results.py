"""Per-request outcomes of a simulation and their summary at an SLO. Pure Python."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Record:
    rid: int
    arrival_s: float
    input_len: int
    output_len: int
    kind: str = ""                  # "remote" | "local" | "refused" (RESOURCE_EXHAUSTED) | "" (never placed)
    prefill: str = ""
    decode: str = ""
    first_s: float | None = None
    finish_s: float | None = None
    cached: int = 0                 # prompt tokens served by the prefilling instance's cache
    kv_bytes: float = 0.0

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_s is None else self.first_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """Mean seconds per output token after the first (None: unfinished or a single token)."""
        if self.finish_s is None or self.first_s is None or self.output_len < 2:
            return None
        return (self.finish_s - self.first_s) / (self.output_len - 1)

    def meets(self, ttft_s: float, tpot_s: float) -> bool:
        if self.finish_s is None or self.ttft_s > ttft_s:
            return False
        return self.tpot_s is None or self.tpot_s <= tpot_s


def quantile(xs: list[float], q: float) -> float:
    """Nearest-rank q-quantile (nan for none)."""
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


@dataclass
class SimResult:
    records: list[Record]
    end_s: float                    # simulated time of the last event
    gpu_hours: float                # device-hours of every instance (loading replicas included)
    cost: float                     # $ of those device-hours
    slo_ttft_s: float
    slo_tpot_s: float
    placements: int                 # policy choices made (retries included)
    scale_log: list                 # (time, pool, delta, replicas after) per autoscaler action
    link_bytes: dict                # (src zone, dst zone) -> bytes over the shared cross-zone links
    router_waits: int = 0           # requests that waited in the router for a worker with room

    def summary(self) -> dict:
        r = self.records
        span = max((x.arrival_s for x in r), default=0.0) or 1.0
        done = [x for x in r if x.finish_s is not None]
        ok = [x for x in r if x.meets(self.slo_ttft_s, self.slo_tpot_s)]
        ttft = [x.ttft_s for x in done]
        tpot = [x.tpot_s for x in done if x.tpot_s is not None]
        prompt = sum(x.input_len for x in done) or 1
        hours = self.end_s / 3600.0 or 1.0
        return dict(
            requests=len(r), finished=len(done), slo_met=len(ok), attainment=len(ok) / max(len(r), 1),
            goodput_rps=len(ok) / span, throughput_rps=len(done) / span,
            ttft_mean=sum(ttft) / len(ttft) if ttft else math.nan, ttft_p50=quantile(ttft, 0.5),
            ttft_p90=quantile(ttft, 0.9), tpot_mean=sum(tpot) / len(tpot) if tpot else math.nan,
            tpot_p50=quantile(tpot, 0.5), tpot_p90=quantile(tpot, 0.9),
            local_share=sum(1 for x in done if x.kind == "local") / max(len(done), 1),
            cache_hit=sum(x.cached for x in done) / prompt, gpu_hours=self.gpu_hours, cost=self.cost,
            dollars_per_h=self.cost / hours, end_s=self.end_s, placements=self.placements,
            router_waits=self.router_waits, refused=sum(1 for x in r if x.kind == "refused"))
