"""Per-request stream recording and the benchmark's aggregate metrics, vLLM `bench serve` style.

Definitions (times are measured from the moment the request is sent):
  TTFT  time to the first message carrying >= 1 token.
  TPOT  (e2e - ttft) / (output_tokens - 1): mean time per output token after the first;
        undefined (left out of the TPOT stats) for 1-token outputs, and counted as 0 for goodput,
        as vLLM does.
  ITL   every gap between consecutive token-carrying messages. As in vLLM, a message carrying k
        tokens adds ONE gap (the whole gap), not k gaps of gap/k; so with multi-token messages the
        mean ITL exceeds TPOT.
  E2EL  time to the end of the stream.
Goodput (DistServe): a successful request is good only if it meets every given target
(ttft, tpot, e2el, in ms); request_goodput = good requests / duration (req/s).
Stats follow vLLM: mean/median/percentiles by numpy (linear interpolation), std is the population
std, and an empty list reports 0. Our own ratios report None (JSON null) when their denominator is 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pdcluster.router.proto import generation_pb2 as pb

GOODPUT_METRICS = ("ttft", "tpot", "e2el")
PERCENTILES = (90, 99)
ABORTED = "FINISH_REASON_ABORT"  # error key of a stream that ended with finish_reason ABORT
NO_TOKENS = "NO_TOKENS"  # error key of an OK stream that carried no token


@dataclass
class RequestOutput:
    success: bool = False
    error: str = ""  # gRPC status code name (e.g. "UNAVAILABLE") or one of the keys above
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_prompt_tokens: int = 0
    ttft: float = 0.0  # s
    itl: list[float] = field(default_factory=list)  # s, one per token-carrying message after the first
    latency: float = 0.0  # s, end to end
    remote_prefill: bool = False
    prefill_worker: str = ""  # placement: who prefilled ("" with remote_prefill False: the decode worker)
    decode_worker: str = ""
    kv_bytes: int = 0  # bytes moved prefill -> decode
    kv_transfer_ms: float = 0.0  # ms the transfer added beyond the prefill
    token_ids: list[int] = field(default_factory=list)  # the reply, for multi-turn histories


class StreamRecorder:
    """Turns one Generate stream into a RequestOutput. Times are seconds on any one clock."""

    def __init__(self, start: float, prompt_len: int):
        self.out = RequestOutput(prompt_tokens=prompt_len)
        self.start = start
        self.last_token_time: float | None = None
        self.usage: pb.Usage | None = None
        self.finish_reason = pb.FINISH_REASON_UNSPECIFIED

    def on_message(self, msg: pb.GenerateResponse, t: float) -> None:
        if msg.HasField("placement"):
            p = msg.placement
            self.out.remote_prefill = p.remote_prefill
            self.out.prefill_worker, self.out.decode_worker = p.prefill_worker, p.decode_worker
            self.out.kv_bytes = p.kv_bytes_transferred
            self.out.kv_transfer_ms = p.kv_transfer_ms
        if msg.HasField("usage"):
            self.usage = msg.usage
        if msg.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            self.finish_reason = msg.finish_reason
        if msg.token_ids:
            if self.last_token_time is None:
                self.out.ttft = t - self.start
            else:
                self.out.itl.append(t - self.last_token_time)
            self.last_token_time = t
            self.out.token_ids.extend(msg.token_ids)

    def finish(self, t: float) -> RequestOutput:
        """The stream ended with status OK at time t."""
        out = self.out
        out.latency = t - self.start
        out.output_tokens = len(out.token_ids)
        if self.usage is not None:
            out.prompt_tokens = self.usage.prompt_tokens
            out.output_tokens = self.usage.completion_tokens
            out.cached_prompt_tokens = self.usage.cached_prompt_tokens
        if self.finish_reason == pb.FINISH_REASON_ABORT:
            out.error = ABORTED
        elif not out.token_ids:
            out.error = NO_TOKENS
        out.success = not out.error
        return out

    def fail(self, code_name: str, t: float) -> RequestOutput:
        """The stream ended with a non-OK gRPC status at time t."""
        self.out.latency = t - self.start
        self.out.error = code_name
        return self.out


def parse_goodput(items: list[str]) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (ms)."""
    targets: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or name not in GOODPUT_METRICS:
            raise ValueError(f"goodput target {item!r} is not NAME:MS with NAME in {GOODPUT_METRICS}")
        if float(value) < 0:
            raise ValueError(f"goodput target {item!r} must be >= 0 ms")
        targets[name] = float(value)
    return targets


def _tpot(o: RequestOutput) -> float | None:
    """s per output token after the first; None for a 1-token output."""
    return (o.latency - o.ttft) / (o.output_tokens - 1) if o.output_tokens > 1 else None


def _stats(name: str, values_ms: list[float]) -> dict[str, float]:
    v = values_ms or [0.0]
    stats = {
        f"mean_{name}_ms": float(np.mean(v)),
        f"median_{name}_ms": float(np.median(v)),
        f"std_{name}_ms": float(np.std(v)),
    }
    stats.update({f"p{p}_{name}_ms": float(np.percentile(v, p)) for p in PERCENTILES})
    return stats


def _is_good(o: RequestOutput, targets_ms: dict[str, float]) -> bool:
    measured_ms = {"ttft": o.ttft * 1e3, "tpot": (_tpot(o) or 0.0) * 1e3, "e2el": o.latency * 1e3}
    return all(measured_ms[k] <= target for k, target in targets_ms.items())


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def calculate_metrics(
    outputs: list[RequestOutput], duration_s: float, goodput: dict[str, float] | None
) -> dict[str, Any]:
    """The result dict (vLLM result-file key names plus ours). Latencies in ms, throughputs per s."""
    ok = [o for o in outputs if o.success]
    errors: dict[str, int] = {}
    for o in outputs:
        if not o.success:
            errors[o.error] = errors.get(o.error, 0) + 1
    total_in = sum(o.prompt_tokens for o in ok)
    total_out = sum(o.output_tokens for o in ok)
    ttfts = [o.ttft * 1e3 for o in ok]
    tpots = [t * 1e3 for o in ok if (t := _tpot(o)) is not None]
    itls = [gap * 1e3 for o in ok for gap in o.itl]
    e2els = [o.latency * 1e3 for o in ok]
    remote = [o for o in ok if o.remote_prefill]
    kv_bytes = sum(o.kv_bytes for o in ok)
    kv_ms = sum(o.kv_transfer_ms for o in remote)
    good = sum(_is_good(o, goodput) for o in ok) if goodput else 0
    result: dict[str, Any] = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(outputs) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration_s,
        "request_goodput": good / duration_s if goodput else None,
        "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
    }
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        result.update(_stats(name, values))
    result.update(
        {
            "prefix_cache_hit_rate": _ratio(sum(o.cached_prompt_tokens for o in ok), total_in),
            "kv_bytes_transferred": kv_bytes,
            "mean_kv_transfer_ms": _ratio(kv_ms, len(remote)),
            # Gbit/s = bytes * 8 / (ms * 1e-3) / 1e9, over the transfer time exposed beyond prefill.
            "kv_transfer_bandwidth_gbps": _ratio(kv_bytes * 8e-6, kv_ms),
            "remote_prefill_fraction": _ratio(len(remote), len(ok)),
            "errors": errors,
            "input_lens": [o.prompt_tokens for o in ok],
            "output_lens": [o.output_tokens for o in ok],
            # per completed request, in the order of input_lens (ours): what placement and the cache did
            "cached_lens": [o.cached_prompt_tokens for o in ok],
            "decode_workers": [o.decode_worker for o in ok],
            "prefill_workers": [o.prefill_worker if o.remote_prefill else "" for o in ok],
            "ttfts": ttfts,
            "tpots": tpots,
            "itls": itls,
            "e2els": e2els,
        }
    )
    return result


_SECTIONS = (
    ("ttft", "TTFT", "Time to First Token"),
    ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
    ("itl", "ITL", "Inter-token Latency"),
    ("e2el", "E2EL", "End-to-end Latency"),
)


def _line(label: str, value: Any, fmt: str = "") -> str:
    text = "n/a" if value is None else format(value, fmt)
    return "{:<40} {:<10}".format(label, text)


def format_table(result: dict[str, Any]) -> str:
    """The result as `vllm bench serve` prints it, plus a disaggregation section."""
    lines = [
        "{:=^50}".format(" Serving Benchmark Result "),
        _line("Successful requests:", result["completed"]),
        _line("Failed requests:", result["failed"]),
    ]
    lines += [_line(f"  {code}:", n) for code, n in sorted(result["errors"].items())]
    lines += [
        _line("Benchmark duration (s):", result["duration"], ".2f"),
        _line("Total input tokens:", result["total_input_tokens"]),
        _line("Total generated tokens:", result["total_output_tokens"]),
        _line("Request throughput (req/s):", result["request_throughput"], ".2f"),
    ]
    if result["request_goodput"] is not None:
        lines.append(_line("Request goodput (req/s):", result["request_goodput"], ".2f"))
    lines += [
        _line("Output token throughput (tok/s):", result["output_throughput"], ".2f"),
        _line("Total Token throughput (tok/s):", result["total_token_throughput"], ".2f"),
    ]
    for key, short, header in _SECTIONS:
        lines.append("{:-^50}".format(header))
        lines.append(_line(f"Mean {short} (ms):", result[f"mean_{key}_ms"], ".2f"))
        lines.append(_line(f"Median {short} (ms):", result[f"median_{key}_ms"], ".2f"))
        lines.append(_line(f"Std {short} (ms):", result[f"std_{key}_ms"], ".2f"))
        lines += [_line(f"P{p} {short} (ms):", result[f"p{p}_{key}_ms"], ".2f") for p in PERCENTILES]
    lines += [
        "{:-^50}".format("Prefix Cache and KV Transfer"),
        _line("Prefix cache hit rate:", result["prefix_cache_hit_rate"], ".3f"),
        _line("Remote prefill fraction:", result["remote_prefill_fraction"], ".3f"),
        _line("KV bytes transferred:", result["kv_bytes_transferred"]),
        _line("Mean KV transfer (ms):", result["mean_kv_transfer_ms"], ".2f"),
        _line("KV transfer bandwidth (Gbit/s):", result["kv_transfer_bandwidth_gbps"], ".3f"),
        "=" * 50,
    ]
    return "\n".join(lines)
