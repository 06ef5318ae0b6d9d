"""Step times of one instance (a model on `tp` devices of one hardware profile) from a roofline.

    prefill step (chunks of new tokens n_i after c_i context tokens):
        linear = 2 * layer params * sum n_i + 2 * head params * chunks     (the head samples one token each)
        attn   = 4 * layers * q_dim * sum (n_i * c_i + n_i^2 / 2)          (causal attention)
        time   = max(linear / (tp * peak * mfu * tp_eff) + attn / (tp * attn rate * tp_eff),
                     weight bytes / (tp * bw * bw_eff)) + overhead + prefill overhead
                 (attn rate: hw.attn_flops, or peak * mfu where unset)
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
    def attn_rate(self) -> float:
        """FLOP/s of a prompt's causal attention (hw.attn_flops; the linears' rate where unset)."""
        if self.hw.attn_flops is None:
            return self.flops_rate
        return self.tp * self.hw.attn_flops * (1.0 if self.tp == 1 else TP_EFF)

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

    def prefill_split(self, new: float, ctx: float = 0.0) -> tuple[float, float]:
        """(linear FLOPs, causal attention FLOPs) of a chunk of `new` tokens after `ctx`."""
        m = self.model
        return (2.0 * m.layer_params * new + 2.0 * m.head_params,
                4.0 * m.layers * m.q_dim * (new * ctx + new * new / 2.0))

    def prefill_flops(self, new: float, ctx: float = 0.0) -> float:
        return sum(self.prefill_split(new, ctx))

    def _prefill_compute_s(self, chunks) -> float:
        lin = att = 0.0
        for n, c in chunks:
            a, b = self.prefill_split(n, c)
            lin, att = lin + a, att + b
        return lin / self.flops_rate + att / self.attn_rate

    def prefill_s(self, chunks) -> float:
        """One prefill step over chunks [(new tokens, context tokens before them), ...]."""
        return (max(self._prefill_compute_s(chunks), self.weight_bytes / self.bytes_rate) + self.hw.step_overhead_s
                + self.hw.prefill_overhead_s)

    def decode_s(self, batch: int, ctx_tokens: float, chunk=None) -> float:
        """One decode step of `batch` sequences with ctx_tokens of KV in all, plus a prefill chunk
        (new, context), or a list of them, computed in the same step (chunked local prefill)."""
        m = self.model
        flops = 2.0 * (m.layer_params + m.head_params) * batch + 4.0 * m.layers * m.q_dim * ctx_tokens
        compute, extra = flops / self.flops_rate, 0.0
        if chunk:
            compute += self._prefill_compute_s([chunk] if isinstance(chunk, tuple) else chunk)
            extra = self.hw.prefill_overhead_s
        nbytes = self.weight_bytes + ctx_tokens * self.kv_bytes_per_token
        return (max(compute, nbytes / self.bytes_rate) + self.hw.step_overhead_s + extra
                + batch * self.hw.per_seq_overhead_s)

    def prefill_tps(self, tokens: int = 4096) -> float:
        """Tokens/s of prefilling uncached prompts of `tokens` tokens one step each (a prior)."""
        return tokens / self.prefill_s([(tokens, 0)])
