"""Step times of one instance (a model on `tp` devices of one hardware profile) from a roofline.

    prefill step (chunks of new tokens n_i after c_i context tokens):
        flops = 2 * layer params * sum n_i + 2 * head params * chunks      (the head samples one token each)
                + 4 * layers * q_dim * sum (n_i * c_i + n_i^2 / 2)          (causal attention)
        time  = max(flops / (tp * peak * mfu * tp_eff), weight bytes / (tp * bw * bw_eff)) + overhead
                + prefill overhead
    decode step (b sequences holding ctx KV tokens in all, plus an optional prefill chunk):
        flops = 2 * (layer + head params) * b + 4 * layers * q_dim * ctx  (+ the chunk's prefill flops)
        bytes = weight bytes + ctx * KV bytes per token
        time  = max(flops / (tp * peak * mfu * tp_eff), bytes / (tp * bw * bw_eff)) + overhead + b * per_seq
                (+ prefill overhead with a chunk)
tp_eff = 1 at tp 1, 0.9 above (all-reduces). Units: seconds, FLOPs, bytes. Weight bytes count every
parameter once (a step reads them all; the embedding rows it reads are few, left in as a margin).
"""
from __future__ import annotations

from dataclasses import dataclass

from pdcluster.sim.hardware import Hardware
from pdcluster.sim.models import Model

TP_EFF = 0.9


@dataclass(frozen=True)
class Roofline:
    model: Model
    hw: Hardware
    tp: int = 1

    def __post_init__(self):
        if self.tp < 1:
            raise ValueError(f"tp must be >= 1, got {self.tp}")
        if self.capacity_tokens <= 0:
            raise ValueError(f"{self.model.name} does not fit on {self.tp} x {self.hw.name}")

    @property
    def flops_rate(self) -> float:
        return self.tp * self.hw.peak_flops * self.hw.mfu * (1.0 if self.tp == 1 else TP_EFF)

    @property
    def bytes_rate(self) -> float:
        return self.tp * self.hw.mem_bw * self.hw.bw_eff

    @property
    def weight_bytes(self) -> float:
        return self.model.weight_bytes(self.hw.dtype_bytes)

    @property
    def kv_bytes_per_token(self) -> int:
        return self.model.kv_bytes_per_token(self.hw.dtype_bytes)

    @property
    def capacity_tokens(self) -> int:
        """KV tokens that fit beside the weights."""
        free = self.tp * self.hw.mem_bytes * self.hw.mem_util - self.weight_bytes
        return int(free // self.kv_bytes_per_token)

    def prefill_flops(self, new: float, ctx: float = 0.0) -> float:
        m = self.model
        return 2.0 * m.layer_params * new + 2.0 * m.head_params + 4.0 * m.layers * m.q_dim * (new * ctx + new * new / 2.0)

    def prefill_s(self, chunks) -> float:
        """One prefill step over chunks [(new tokens, context tokens before them), ...]."""
        flops = sum(self.prefill_flops(n, c) for n, c in chunks)
        return (max(flops / self.flops_rate, self.weight_bytes / self.bytes_rate) + self.hw.step_overhead_s
                + self.hw.prefill_overhead_s)

    def decode_s(self, batch: int, ctx_tokens: float, chunk=None) -> float:
        """One decode step of `batch` sequences with ctx_tokens of KV in all, plus a prefill chunk
        (new, context), or a list of them, computed in the same step (chunked local prefill)."""
        m = self.model
        flops = 2.0 * (m.layer_params + m.head_params) * batch + 4.0 * m.layers * m.q_dim * ctx_tokens
        extra = 0.0
        if chunk:
            for c in [chunk] if isinstance(chunk, tuple) else chunk:
                flops += self.prefill_flops(*c)
            extra = self.hw.prefill_overhead_s
        nbytes = self.weight_bytes + ctx_tokens * self.kv_bytes_per_token
        return (max(flops / self.flops_rate, nbytes / self.bytes_rate) + self.hw.step_overhead_s + extra
                + batch * self.hw.per_seq_overhead_s)

    def prefill_tps(self, tokens: int = 4096) -> float:
        """Tokens/s of prefilling uncached prompts of `tokens` tokens one step each (a prior)."""
        return tokens / self.prefill_s([(tokens, 0)])
