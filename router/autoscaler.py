"""Pool autoscaler: per-pool replica decisions from load signals, and the loop that carries them out.

Pure Python: no Ray, no gRPC, no sockets. The loop gets its inputs and effects as callables
(`read_metrics`, `add_replica`, `drain_and_remove_replica`) and its time from an injected clock,
so `deploy/scaling.py` wires it to Ray actors (reading `pool_metrics` of the router's WorkerLoads,
the same view placement uses) and tests drive it with synthetic series.

Signals (one per pool, chosen in deploy/pools.yaml; `load` = value / target, dimensionless):
    prefill  queued_prompt_tokens_per_replica   tokens      target: tokens per replica
             p90_ttft                           ms          target: ttft_slo_ms
             prefill_utilization                fraction    target: a fraction in (0, 1]
    decode   kv_utilization                     fraction    target: a fraction in (0, 1]
             p90_tpot                           ms          target: tpot_slo_ms
             decode_step_ms                     ms          target: tpot_slo_ms

prefill_utilization = prompt tokens/s the router sent to the pool over the last `window_s`
(the policy differences PoolMetrics.prompt_tokens_sent, a cumulative counter) / (replicas x the
mean learned prefill tokens/s of a live replica): the pool's offered load as a share of its
capacity, as Dynamo's SLA planner sizes a prefill pool from the predicted prompt-token rate over
a replica's throughput. Unlike the queue, one long prompt moves it only by its share of the
window, so a pool with one long prompt in flight does not read as overloaded; unlike p90 TTFT it
does not wait for the queue's misses. Prompt tokens count whole (prefix-cache hits included), so
it reads high by the hit rate: the target absorbs that.

decode_step_ms = the mean over live decode workers of their measured decode step time over the
last status poll (Telemetry.last_step_s): the time per output token of the requests running now.
p90_tpot waits for requests to finish (a request's TPOT is known at its end) and then for the
window; this one moves with the batch at each poll. A pool where no worker stepped reads 0.
It counts decode-only steps (the engines' decode_s / decode_steps): steps that also carry a local
prefill chunk are not in it, and with speculative decoding a step may emit several tokens (it
then reads above the TPOT).

Hysteresis band, in multiples of the target:

      load  0 ......... down_ratio ............. up_ratio .........>
            | scale down |        hold           | scale up        |
              (held for downscale_delay_s)         (held for upscale_delay_s)

A direction's condition must hold on every tick for its delay (any tick outside it restarts the
timer); after each action the pool is in cooldown for `cooldown_s` and both timers restart, so a
pool never flaps. A step of k replicas moves the projected load to the middle of the band
(`replicas * load / mid`), at least 1, at most `max_step`, always inside [min, max]. Replica
counts outside [min, max] are corrected at once (still `max_step` at a time), whatever the load.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

log = logging.getLogger(__name__)

POOLS = ("prefill", "decode")
SIGNALS = {
    "prefill": ("queued_prompt_tokens_per_replica", "p90_ttft", "prefill_utilization"),  # [1]: the latency one
    "decode": ("kv_utilization", "p90_tpot", "decode_step_ms"),
}
# ScaleDecision.cause: why a tick decided what it did (a metrics label; the reason says it in words)
CAUSES = ("load",                                   # up/down: the signal held outside the band long enough
          "below_min", "above_max",                 # up/down: bounds, corrected at once
          "in_band", "delay", "cooldown",           # hold: inside the band / waiting out a delay / cooling down
          "at_min", "at_max", "would_overload",     # hold: at a bound, or one fewer replica would be too busy
          "no_data", "in_flight", "no_metrics")     # hold: no latency sample, an action running, no snapshot
SIGNAL_UNITS = {"queued_prompt_tokens_per_replica": " tok/replica", "p90_ttft": "ms",
                "kv_utilization": "", "p90_tpot": "ms", "prefill_utilization": "", "decode_step_ms": "ms"}
FRACTION_SIGNALS = ("kv_utilization", "prefill_utilization")    # targets in (0, 1]


@dataclass(frozen=True)
class ScalingRule:
    """One pool's autoscaling knobs (built from deploy/pools.yaml by `PoolConfig.scaling_rule`)."""
    signal: str                     # one of SIGNALS[pool]
    target: float                   # in the signal's units (tokens per replica, ms, or a fraction)
    min_replicas: int = 1
    max_replicas: int = 1
    up_ratio: float = 1.0           # scale up while load > up_ratio
    down_ratio: float = 0.5         # scale down while load < down_ratio  (0 < down < up)
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 300.0
    max_step: int = 1               # replicas added or removed per action
    cooldown_s: float = 60.0        # no load-driven action this long after the last one
    window_s: float = 60.0          # prefill_utilization: the prompt-token rate is over this many seconds

    def __post_init__(self):
        if not 0 < self.down_ratio < self.up_ratio:
            raise ValueError(f"need 0 < down_ratio < up_ratio, got {self.down_ratio}, {self.up_ratio}")
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 0 <= min_replicas <= max_replicas, got {self.min_replicas}, {self.max_replicas}")
        if self.target <= 0 or self.max_step < 1:
            raise ValueError("target must be > 0 and max_step >= 1")
        if self.upscale_delay_s < 0 or self.downscale_delay_s < 0 or self.cooldown_s < 0:
            raise ValueError("delays and cooldown must be >= 0")
        if self.window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {self.window_s}")
        if self.signal == "kv_utilization" and self.target * self.up_ratio >= 1:
            raise ValueError(f"kv_utilization never exceeds 1: target x up_ratio = {self.target * self.up_ratio:g} "
                             "means the pool never scales up (need < 1)")


@dataclass(frozen=True)
class PoolMetrics:
    """One pool at one instant, as `read_metrics` reports it.

    replicas counts every replica the pool has, starting ones included (so load a starting
    replica will absorb is not answered with yet another replica). held also counts the registered
    replicas that missed their last status poll (hung, or restarting under Ray): each still holds its
    pool unit, so max_replicas bounds held (None: replicas), while the load and min_replicas count
    the replicas that serve."""
    replicas: int
    queued_prompt_tokens: int = 0           # prefill: prompt tokens sent to the pool, not yet prefilled
    p90_ttft_ms: float | None = None        # over the recent window; None = no first token in it
    kv_utilization: float = 0.0             # decode: blocks held by running/reserved requests / all, pool mean
    p90_tpot_ms: float | None = None        # over the recent window; None = no finished request in it
    prompt_tokens_sent: int = 0             # prefill: cumulative prompt tokens the router sent to the pool
    replica_prefill_tps: float | None = None    # prefill: mean learned tokens/s of a live replica (None: none)
    decode_step_ms: float | None = None     # decode: mean measured step ms of live workers that stepped (None: none)
    held: int | None = None                 # replicas + those not answering their polls (None: replicas)

    @property
    def idle(self) -> bool:
        return self.queued_prompt_tokens == 0 and self.kv_utilization == 0.0


MetricsSnapshot = Mapping[str, PoolMetrics]     # pool name -> its metrics


def signal_value(signal: str, m: PoolMetrics, sent_tps: float | None = None) -> float | None:
    """The signal in its units; None = no data (a latency with no sample while the pool is busy;
    prefill_utilization without a rate yet, `sent_tps`: prompt tokens/s sent over the window, or
    without a learned replica rate). A latency (decode_step_ms too) with no sample on an idle pool
    reads 0: an idle pool may shrink."""
    if signal == "prefill_utilization":
        if sent_tps is None or not m.replica_prefill_tps:
            return None
        return sent_tps / (max(m.replicas, 1) * m.replica_prefill_tps)
    if signal == "queued_prompt_tokens_per_replica":
        return m.queued_prompt_tokens / max(m.replicas, 1)
    if signal == "decode_step_ms":      # no decode-only step on a busy pool (each step carried prefill
        if m.decode_step_ms is None:    # chunks, say) is no data, not an idle pool that may shrink
            return 0.0 if m.idle else None
        return m.decode_step_ms
    if signal == "kv_utilization":
        return m.kv_utilization
    v = {"p90_ttft": m.p90_ttft_ms, "p90_tpot": m.p90_tpot_ms}[signal]
    if v is None:
        return 0.0 if m.idle else None
    return v


def pool_metrics(pool: str, loads: Iterable[Any], starting: int = 0, p90_ttft_ms: float | None = None,
                 p90_tpot_ms: float | None = None, prompt_tokens_sent: int = 0,
                 prefill_tps: Callable[[Any], float] | None = None,
                 decode_step_s: Callable[[Any], float | None] | None = None) -> PoolMetrics:
    """One pool's PoolMetrics from the router's own view (the WorkerLoads placement reads).

    Draining workers are leaving: they count neither as replicas nor towards the queue or the KV
    mean (their remaining work finishes there). `starting`: replicas spawned, not yet registered.
    prefill: queued_prompt_tokens = prompt tokens the router has sent to the pool's prefill calls and
    not yet seen finish. decode: kv_utilization = mean over workers whose KV size is known of
    used / all blocks (cached free blocks count as free). Each pool reports only its own figures,
    so `idle` means no queue (prefill) or no KV held (decode). prefill: `prompt_tokens_sent`, the
    registry's cumulative count (WorkerRegistry.sent_tokens), and `prefill_tps(load)` -> a worker's
    learned prefill tokens/s (Telemetry.prefill_tps), averaged over the live workers. decode:
    `decode_step_s(load)` -> a worker's measured step seconds of its last poll or None
    (Telemetry.last_step_s), averaged over the live workers that stepped."""
    mine = [w for w in loads if w.role == pool and not w.draining]
    live = [w for w in mine if w.healthy]                   # a dead or hung one serves nothing
    kv = [1.0 - w.free_blocks / w.num_blocks for w in live if w.capacity_known] if pool == "decode" else []
    queued = sum(w.queued_tokens for w in live) if pool == "prefill" else 0
    tps = [prefill_tps(w) for w in live] if pool == "prefill" and prefill_tps is not None else []
    steps = [s for s in (decode_step_s(w) for w in live) if s is not None] \
        if pool == "decode" and decode_step_s is not None else []
    return PoolMetrics(replicas=len(live) + starting, held=len(mine) + starting, queued_prompt_tokens=queued,
                       p90_ttft_ms=p90_ttft_ms,
                       kv_utilization=sum(kv) / len(kv) if kv else 0.0, p90_tpot_ms=p90_tpot_ms,
                       prompt_tokens_sent=prompt_tokens_sent if pool == "prefill" else 0,
                       replica_prefill_tps=sum(tps) / len(tps) if tps else None,
                       decode_step_ms=1e3 * sum(steps) / len(steps) if steps else None)


@dataclass(frozen=True)
class ScaleDecision:
    pool: str
    delta: int                      # +k add, -k drain and remove, 0 hold
    replicas: int                   # the pool's replicas when decided
    reason: str
    signal: str = ""
    value: float | None = None      # signal value, its units
    load: float | None = None       # value / target
    cause: str = ""                 # a short keyword for metrics labels (one of CAUSES), the reason in words

    @property
    def direction(self) -> str:
        return "up" if self.delta > 0 else "down" if self.delta < 0 else "hold"

    @property
    def target_replicas(self) -> int:
        return self.replicas + self.delta


class PoolPolicy:
    """The decision state machine of one pool: condition timers and the cooldown clock."""

    def __init__(self, pool: str, rule: ScalingRule):
        if pool in SIGNALS and rule.signal not in SIGNALS[pool]:
            raise ValueError(f"{pool}: signal {rule.signal!r} is not one of {SIGNALS[pool]}")
        self.pool = pool
        self.rule = rule
        self.up_since: float | None = None      # first tick of the current run of load > up_ratio
        self.down_since: float | None = None    # first tick of the current run of load < down_ratio
        self.last_action: float | None = None   # when the last action was decided or completed
        self.sent: deque[tuple[float, int]] = deque()   # (tick time, prompt_tokens_sent), last window_s

    def action_done(self, now: float) -> None:
        """An action was decided or finished at `now`: cooldown and both delays start over."""
        self.last_action = now
        self.up_since = self.down_since = None

    def sent_tps(self, m: PoolMetrics, now: float) -> float | None:
        """Prompt tokens/s sent over the last window_s of ticks (the oldest tick kept is the last one
        at or before the window's start); None until a second tick. A counter that went back (a
        router restart) starts over."""
        s = self.sent
        if s and m.prompt_tokens_sent < s[-1][1]:
            s.clear()
        s.append((now, m.prompt_tokens_sent))
        while len(s) > 2 and s[1][0] <= now - self.rule.window_s:
            s.popleft()
        (t0, c0) = s[0]
        return (m.prompt_tokens_sent - c0) / (now - t0) if now > t0 else None

    def decide(self, m: PoolMetrics, now: float) -> ScaleDecision:
        r, n = self.rule, m.replicas
        units = n if m.held is None else max(m.held, n)    # what max_replicas bounds (PoolMetrics.held)
        value = signal_value(r.signal, m, self.sent_tps(m, now) if r.signal == "prefill_utilization" else None)
        load = None if value is None else value / r.target
        d = lambda delta, cause, why: self._act(  # noqa: E731
            ScaleDecision(self.pool, delta, n, why, r.signal, value, load, cause), now)
        # bounds first: a hard invariant, no delay or cooldown
        if n < r.min_replicas:     # replicas not answering hold their units: none spawned past max (retired later)
            room = r.max_replicas - units
            return d(max(0, min(r.min_replicas - n, r.max_step, room)), "below_min",
                     f"below min_replicas={r.min_replicas}" + ("" if room > 0 else
                     f", but {units - n} not answering hold max_replicas={r.max_replicas}"))
        if units > r.max_replicas:
            return d(-min(units - r.max_replicas, r.max_step), "above_max", f"above max_replicas={r.max_replicas}")
        if load is None:
            self.up_since = self.down_since = None
            return d(0, "no_data", f"no data: {r.signal} has no sample while the pool is busy"
                                   if r.signal != "prefill_utilization" else
                                   "no data: prefill_utilization needs two ticks and a learned prefill rate")
        desc = f"{r.signal}={value:.4g}{SIGNAL_UNITS.get(r.signal, '')} load={load:.2f}x target"
        mid = (r.up_ratio + r.down_ratio) / 2
        if load > r.up_ratio:
            self.down_since = None
            self.up_since = now if self.up_since is None else self.up_since
            held = now - self.up_since
            if units >= r.max_replicas:
                return d(0, "at_max", f"{desc} > {r.up_ratio}: at max_replicas={r.max_replicas}"
                                      + (f" ({units - n} not answering)" if units > n else ""))
            if held < r.upscale_delay_s:
                return d(0, "delay", f"{desc} > {r.up_ratio} for {held:.0f}s of upscale_delay_s={r.upscale_delay_s:g}")
            if self._cooling(now):
                return d(0, "cooldown", f"{desc} > {r.up_ratio}: cooldown, {self._cooldown_left(now):.0f}s left")
            want = math.ceil(n * load / mid)
            k = max(1, min(want - n, r.max_step, r.max_replicas - units))
            return d(k, "load", f"{desc} > {r.up_ratio} for {held:.0f}s: {n} -> {n + k} (wants {want})")
        if load < r.down_ratio:
            self.up_since = None
            self.down_since = now if self.down_since is None else self.down_since
            held = now - self.down_since
            if n <= r.min_replicas:
                return d(0, "at_min", f"{desc} < {r.down_ratio}: at min_replicas={r.min_replicas}")
            if held < r.downscale_delay_s:
                return d(0, "delay", f"{desc} < {r.down_ratio} for {held:.0f}s of "
                                     f"downscale_delay_s={r.downscale_delay_s:g}")
            if self._cooling(now):
                return d(0, "cooldown", f"{desc} < {r.down_ratio}: cooldown, {self._cooldown_left(now):.0f}s left")
            want = max(math.ceil(n * load / mid), r.min_replicas)
            k = min(n - want, r.max_step)
            if k < 1:       # one fewer replica may still be fine if it keeps the load under up_ratio
                after = math.inf if n == 1 else n * load / (n - 1)
                if not (load == 0 or after < r.up_ratio):
                    return d(0, "would_overload",
                             f"{desc} < {r.down_ratio}, but {n - 1} replicas would be at {after:.2f}x")
                k = 1
            return d(-k, "load", f"{desc} < {r.down_ratio} for {held:.0f}s: {n} -> {n - k} (wants {want})")
        self.up_since = self.down_since = None
        return d(0, "in_band", f"{desc} within [{r.down_ratio}, {r.up_ratio}]")

    def _act(self, dec: ScaleDecision, now: float) -> ScaleDecision:
        if dec.delta:
            self.action_done(now)
        return dec

    def _cooling(self, now: float) -> bool:
        return self.last_action is not None and now - self.last_action < self.rule.cooldown_s

    def _cooldown_left(self, now: float) -> float:
        return self.rule.cooldown_s - (now - self.last_action)


async def _maybe_await(x: Any) -> Any:
    return await x if inspect.isawaitable(x) else x


class PoolAutoscaler:
    """The control loop: every `interval_s`, read metrics, decide per pool, add or drain replicas.

    read_metrics() -> MetricsSnapshot               sync or async
    add_replica(pool) -> Any                        sync or async; returns once the replica is placed
    drain_and_remove_replica(pool) -> Any           sync or async; stops routing to one replica, waits
                                                    for its requests to finish, then removes it
    An action runs in the background; while one is in flight for a pool that pool holds, and the
    cooldown restarts when it completes. Failed calls are logged and counted, never retried early.
    Counters for metrics: `decisions[(pool, "up"|"down"|"hold")]`, `replicas_added[pool]`,
    `replicas_removed[pool]`, `action_errors[pool]`; `observer` (e.g. RouterMetrics), if given, gets
    `autoscale_decision(decision)` every tick and `autoscale_action(pool, "add"|"remove", ok)` per replica.
    Logging: actions and changes of a pool's hold cause at INFO, repeated holds at DEBUG.
    """

    def __init__(self, rules: Mapping[str, ScalingRule], read_metrics: Callable[[], Any],
                 add_replica: Callable[[str], Any], drain_and_remove_replica: Callable[[str], Any],
                 clock: Callable[[], float] = time.monotonic, interval_s: float = 5.0, observer: Any = None):
        self.policies = {pool: PoolPolicy(pool, rule) for pool, rule in rules.items()}
        self.read_metrics = read_metrics
        self.add_replica = add_replica
        self.drain_and_remove_replica = drain_and_remove_replica
        self.clock = clock
        self.interval_s = interval_s
        self.observer = observer
        self.decisions: Counter = Counter()
        self.replicas_added: Counter = Counter()
        self.replicas_removed: Counter = Counter()
        self.action_errors: Counter = Counter()
        self.last: dict[str, ScaleDecision] = {}
        self._inflight: dict[str, asyncio.Task] = {}

    async def step(self) -> dict[str, ScaleDecision]:
        """One tick: decide every pool and start its action (if any); returns the decisions."""
        snap = await _maybe_await(self.read_metrics())
        now = self.clock()
        out = {}
        for pool, pol in self.policies.items():
            m = snap.get(pool)
            task = self._inflight.get(pool)
            if task is not None and not task.done():
                dec = ScaleDecision(pool, 0, m.replicas if m else 0, "previous action still in flight",
                                    cause="in_flight")
            elif m is None:
                dec = ScaleDecision(pool, 0, 0, "no metrics for this pool", cause="no_metrics")
            else:
                dec = pol.decide(m, now)
            self.decisions[(pool, dec.direction)] += 1
            prev = self.last.get(pool)
            self.last[pool] = out[pool] = dec
            if self.observer is not None:
                self.observer.autoscale_decision(dec)
            if dec.delta:
                log.info("autoscale %s %+d (%d -> %d): %s", pool, dec.delta, dec.replicas, dec.target_replicas,
                         dec.reason)
                task = self._inflight[pool] = asyncio.ensure_future(self._carry_out(dec))
                task.add_done_callback(lambda t, p=pool: self._inflight.pop(p) if self._inflight.get(p) is t else None)
            else:
                changed = prev is None or prev.delta or prev.cause != dec.cause
                log.log(logging.INFO if changed else logging.DEBUG, "autoscale %s hold at %d: %s", pool,
                        dec.replicas, dec.reason)
        return out

    async def _carry_out(self, dec: ScaleDecision) -> None:
        fn = self.add_replica if dec.delta > 0 else self.drain_and_remove_replica
        done = self.replicas_added if dec.delta > 0 else self.replicas_removed
        res = await asyncio.gather(*(_maybe_await_call(fn, dec.pool) for _ in range(abs(dec.delta))),
                                   return_exceptions=True)
        for r in res:
            ok = not isinstance(r, BaseException)
            if ok:
                done[dec.pool] += 1
            else:
                self.action_errors[dec.pool] += 1
                log.warning("autoscale %s %s failed: %r", dec.pool, dec.direction, r)
            if self.observer is not None:
                self.observer.autoscale_action(dec.pool, "add" if dec.delta > 0 else "remove", ok)
        self.policies[dec.pool].action_done(self.clock())

    async def join(self) -> None:
        """Wait for every action in flight."""
        await asyncio.gather(*list(self._inflight.values()), return_exceptions=True)

    async def cancel_actions(self) -> None:
        """Cancel every action in flight (shutdown) and wait for them to unwind."""
        for t in list(self._inflight.values()):
            t.cancel()
        await self.join()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Tick until `stop` is set (or the task is cancelled); a failing tick is logged, not fatal."""
        stop = stop or asyncio.Event()
        while not stop.is_set():
            try:
                await self.step()
            except Exception:
                log.exception("autoscaler tick failed")
            try:
                await asyncio.wait_for(stop.wait(), self.interval_s)
            except asyncio.TimeoutError:
                pass
        await self.join()

    def counters(self) -> dict[str, dict]:
        """Plain dicts for a metrics exporter."""
        return {"decisions": {f"{p}/{d}": n for (p, d), n in sorted(self.decisions.items())},
                "replicas_added": dict(self.replicas_added), "replicas_removed": dict(self.replicas_removed),
                "action_errors": dict(self.action_errors)}


async def _maybe_await_call(fn: Callable[[str], Any], pool: str) -> Any:
    return await _maybe_await(fn(pool))


__all__ = ["POOLS", "SIGNALS", "FRACTION_SIGNALS", "CAUSES", "ScalingRule", "PoolMetrics", "MetricsSnapshot", "signal_value",
           "pool_metrics", "ScaleDecision", "PoolPolicy", "PoolAutoscaler"]
