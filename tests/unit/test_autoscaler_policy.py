"""Autoscaler policy and control loop over synthetic metric series (no Ray, no sleeping: a fake clock)."""
from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import replace
from pathlib import Path

import pytest

from pdcluster.deploy.pools import load_pools_config
from pdcluster.router.autoscaler import (PoolAutoscaler, PoolMetrics, PoolPolicy, ScaleDecision, ScalingRule,
                                         signal_value)

TARGET = 1000.0         # queued prompt tokens per replica
RULE = ScalingRule(signal="queued_prompt_tokens_per_replica", target=TARGET, min_replicas=1, max_replicas=8,
                   up_ratio=1.0, down_ratio=0.5, upscale_delay_s=30, downscale_delay_s=120, max_step=2,
                   cooldown_s=60)
DT = 5.0                # tick, seconds


def simulate(rule: ScalingRule, load_per_replica_at_start, replicas: int, t_end: float, *, demand=None):
    """Tick a prefill PoolPolicy every DT seconds until t_end, applying each decision at once.

    Load comes from a total demand (queued tokens), so adding replicas lowers the per-replica
    signal: demand(t) if given, else load_per_replica_at_start(t) x target x starting replicas."""
    pol = PoolPolicy("prefill", rule)
    n0, n, out = replicas, replicas, []
    for i in range(int(t_end / DT) + 1):
        t = i * DT
        total = demand(t) if demand else load_per_replica_at_start(t) * rule.target * n0
        d = pol.decide(PoolMetrics(replicas=n, queued_prompt_tokens=int(total)), t)
        assert d.reason and d.pool == "prefill" and d.replicas == n
        assert rule.min_replicas <= d.target_replicas <= rule.max_replicas or d.delta == 0
        out.append((t, d))
        n = d.target_replicas
    return out


def actions(log):
    return [(t, d.delta) for t, d in log if d.delta]


# scale up

def test_scale_up_on_sustained_load():
    log = simulate(RULE, lambda t: 4.0, replicas=1, t_end=600)
    # held from t=0: acts at upscale_delay_s; k capped by max_step; the next step waits for a fresh
    # delay (from t=35) and for the cooldown (t=30+60)
    assert actions(log) == [(30, 2), (90, 2)]
    t, d = next((t, d) for t, d in log if d.delta)
    assert d.direction == "up" and d.target_replicas == 3
    assert "queued_prompt_tokens_per_replica=4000" in d.reason and "1 -> 3" in d.reason
    assert "upscale_delay_s" in dict(log)[25].reason                  # waiting is explained too
    assert "within" in log[-1][1].reason and log[-1][1].replicas == 5  # 4000 tok / 5 = 0.8x target


def test_no_upscale_before_the_delay():
    log = simulate(RULE, lambda t: 3.0 if t >= 100 else 0.7, replicas=2, t_end=125)
    assert actions(log) == []
    assert "for 25s of upscale_delay_s=30" in log[-1][1].reason


def test_kv_utilization_signal_scales_decode():
    rule = replace(RULE, signal="kv_utilization", target=0.8, upscale_delay_s=0)
    d = PoolPolicy("decode", rule).decide(PoolMetrics(replicas=2, kv_utilization=0.96), 0.0)
    assert d.delta == 2 and d.load == pytest.approx(1.2) and "kv_utilization=0.96" in d.reason   # ceil(2*1.2/.75)=4


def test_p90_tpot_signal_scales_decode():
    rule = replace(RULE, signal="p90_tpot", target=50.0, upscale_delay_s=0, max_step=1)
    d = PoolPolicy("decode", rule).decide(PoolMetrics(replicas=1, kv_utilization=0.3, p90_tpot_ms=80.0), 0.0)
    assert d.delta == 1 and d.value == 80.0 and "ms" in d.reason


# no flapping

def test_no_action_on_noise_inside_the_band():
    rng = random.Random(0)
    assert actions(simulate(RULE, lambda t: rng.uniform(0.55, 0.95), replicas=4, t_end=7200)) == []


def test_no_action_when_crossings_are_shorter_than_the_delays():
    # alternating every tick between far above and far below: neither condition ever holds
    assert actions(simulate(RULE, lambda t: 1.8 if int(t / DT) % 2 else 0.2, replicas=4, t_end=7200)) == []
    # 25 s bursts above every minute, below the band otherwise for 35 s (< downscale delay)
    assert actions(simulate(RULE, lambda t: 1.5 if t % 60 < 25 else 0.3, replicas=4, t_end=7200)) == []


def test_wide_noise_actions_are_spaced_by_the_cooldown():
    rng = random.Random(1)
    rule = replace(RULE, upscale_delay_s=10, downscale_delay_s=10)
    acts = actions(simulate(rule, lambda t: rng.uniform(0.1, 1.9), replicas=4, t_end=7200))
    gaps = [b[0] - a[0] for a, b in zip(acts, acts[1:])]
    assert acts and min(gaps) >= rule.cooldown_s


def test_downscale_lands_inside_the_band():
    # 8 replicas at 0.3x: the step aims at the band's middle, so it never overshoots into upscale
    log = simulate(replace(RULE, max_step=8), lambda t: 0.3, replicas=8, t_end=1200)
    assert actions(log) == [(120, -4)]             # ceil(8 * 0.3 / 0.75) = 4 replicas left, at 0.6x
    assert all(d.delta <= 0 for _, d in log)


def test_downscale_refused_when_one_fewer_would_overload():
    rule = replace(RULE, down_ratio=0.8, downscale_delay_s=0)
    d = PoolPolicy("prefill", rule).decide(PoolMetrics(replicas=2, queued_prompt_tokens=1400), 0.0)
    assert d.delta == 0 and "1 replicas would be at 1.40x" in d.reason


# bounds

def test_respects_max_under_extreme_load():
    log = simulate(RULE, lambda t: 100.0, replicas=1, t_end=3600)
    assert max(d.target_replicas for _, d in log) == RULE.max_replicas
    assert log[-1][1].replicas == RULE.max_replicas and "at max_replicas=8" in log[-1][1].reason


def test_respects_min_when_idle():
    log = simulate(RULE, lambda t: 0.0, replicas=8, t_end=3600)
    assert min(d.target_replicas for _, d in log) == RULE.min_replicas
    assert log[-1][1].replicas == RULE.min_replicas and "at min_replicas=1" in log[-1][1].reason


def test_out_of_bounds_is_corrected_at_once_even_in_cooldown():
    rule = replace(RULE, min_replicas=3, max_replicas=6)
    pol = PoolPolicy("prefill", rule)
    pol.action_done(0.0)                                                  # in cooldown
    d = pol.decide(PoolMetrics(replicas=0), 1.0)                          # e.g. replicas died
    assert d.delta == 2 and "below min_replicas=3" in d.reason           # max_step still applies
    d = pol.decide(PoolMetrics(replicas=10, queued_prompt_tokens=10**6), 2.0)
    assert d.delta == -2 and "above max_replicas=6" in d.reason


# delays

def test_downscale_only_after_the_delay():
    log = simulate(RULE, lambda t: 0.2, replicas=4, t_end=300)
    assert actions(log)[0] == (120, -2)
    assert all(d.delta == 0 for t, d in log if t < 120)


def test_downscale_timer_restarts_when_the_condition_breaks():
    # one tick inside the band at t=60 restarts the timer: first drain at 65 + 120
    log = simulate(RULE, lambda t: 0.7 if t == 60 else 0.2, replicas=4, t_end=400)
    assert actions(log)[0] == (185, -2)


# max_step, cooldown

@pytest.mark.parametrize("max_step", [1, 2, 3])
def test_max_step_honored(max_step):
    rule = replace(RULE, max_step=max_step, upscale_delay_s=0, downscale_delay_s=0)
    square = lambda t: 50_000 if (t // 600) % 2 == 0 else 0         # 10 min at 50x target, 10 min idle
    acts = actions(simulate(rule, None, replicas=1, t_end=7200, demand=square))
    assert all(abs(k) <= max_step for _, k in acts)
    assert max(k for _, k in acts) == max_step and min(k for _, k in acts) == -max_step   # the cap binds
    if max_step == 1:
        assert [k for _, k in acts[:7]] == [1] * 7                      # 1 -> 8 one at a time


def test_cooldown_spaces_actions():
    rule = replace(RULE, upscale_delay_s=0, max_step=1)
    log = simulate(rule, None, replicas=1, t_end=600, demand=lambda t: 10**6)
    assert [t for t, _ in actions(log)] == [0, 60, 120, 180, 240, 300, 360]     # 1 -> 8
    assert "cooldown, 55s left" in dict(log)[5].reason


# signals without data

def test_latency_signal_without_samples():
    rule = replace(RULE, signal="p90_ttft", target=500.0, downscale_delay_s=0)
    pol = PoolPolicy("prefill", rule)
    busy = pol.decide(PoolMetrics(replicas=2, queued_prompt_tokens=10, p90_ttft_ms=None), 0.0)
    assert busy.delta == 0 and busy.value is None and "no data" in busy.reason
    idle = pol.decide(PoolMetrics(replicas=2, p90_ttft_ms=None), 5.0)       # nothing queued: idle, may shrink
    assert idle.delta == -1 and idle.value == 0.0
    assert signal_value("p90_ttft", PoolMetrics(replicas=1, p90_ttft_ms=700.0)) == 700.0


def test_rule_and_pool_validation():
    with pytest.raises(ValueError):
        replace(RULE, down_ratio=1.0)
    with pytest.raises(ValueError):
        replace(RULE, min_replicas=5, max_replicas=4)
    with pytest.raises(ValueError):
        replace(RULE, max_step=0)
    with pytest.raises(ValueError, match="not one of"):
        PoolPolicy("decode", RULE)                      # a prefill signal on the decode pool


def test_decision_properties():
    d = ScaleDecision("decode", -2, 5, "x")
    assert (d.direction, d.target_replicas) == ("down", 3)
    assert ScaleDecision("decode", 0, 5, "x").direction == "hold"


# the control loop

class FakeCluster:
    """Replicas per pool; demand per pool in signal units x target (total, spread over replicas)."""

    def __init__(self, prefill=1, decode=1):
        self.replicas = {"prefill": prefill, "decode": decode}
        self.queued = 0.0            # total prefill queued tokens
        self.kv = 0.0                # decode KV held, in units of one replica's pool
        self.calls = []

    def read_metrics(self):
        n = self.replicas
        return {"prefill": PoolMetrics(n["prefill"], queued_prompt_tokens=int(self.queued)),
                "decode": PoolMetrics(n["decode"], kv_utilization=min(1.0, self.kv / n["decode"]))}

    def add(self, pool):
        self.calls.append(("add", pool))
        self.replicas[pool] += 1

    def drain(self, pool):
        self.calls.append(("drain", pool))
        self.replicas[pool] -= 1


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


RULES = {"prefill": RULE, "decode": replace(RULE, signal="kv_utilization", target=0.8, max_step=1)}


async def drive(a: PoolAutoscaler, clock: Clock, until: float, on_tick=None):
    while clock.t <= until:
        if on_tick:
            on_tick(clock.t)
        await a.step()
        await a.join()
        clock.t += DT


def test_loop_scales_both_pools_and_counts(caplog):
    c, clock = FakeCluster(), Clock()
    a = PoolAutoscaler(RULES, c.read_metrics, c.add, c.drain, clock=clock)
    c.queued, c.kv = 3500, 2.0        # prefill 3.5x target on 1 replica; decode wants ~2.5 replicas
    caplog.set_level(logging.INFO, logger="pdcluster.router.autoscaler")
    asyncio.run(drive(a, clock, 300))
    assert c.replicas == {"prefill": 5, "decode": 3}
    assert a.replicas_added == {"prefill": 4, "decode": 2} and not a.replicas_removed and not a.action_errors
    assert a.decisions[("prefill", "up")] == 2 and a.decisions[("decode", "up")] == 2
    assert sum(a.decisions.values()) == 2 * len(range(0, 301, 5))
    msgs = [r.getMessage() for r in caplog.records]
    first = "autoscale prefill +2 (1 -> 3): queued_prompt_tokens_per_replica=3500 tok/replica load=3.50x"
    assert any(m.startswith(first) for m in msgs)
    counters = a.counters()
    assert counters["decisions"]["prefill/up"] == 2 and counters["replicas_added"]["decode"] == 2

    c.queued, c.kv = 0, 0.0           # load gone: drain after the downscale delay, down to min
    asyncio.run(drive(a, clock, clock.t + 1200))
    assert c.replicas == {"prefill": 1, "decode": 1}
    assert a.replicas_removed == {"prefill": 4, "decode": 2}
    assert a.last["prefill"].reason.endswith("at min_replicas=1")


def test_loop_holds_while_an_action_is_in_flight_and_cools_down_from_completion():
    c, clock = FakeCluster(), Clock()
    gate = None

    async def slow_add(pool):
        await gate.wait()
        c.add(pool)

    rules = {"prefill": replace(RULE, upscale_delay_s=0, max_step=1, max_replicas=3)}
    a = PoolAutoscaler(rules, c.read_metrics, slow_add, c.drain, clock=clock)
    c.queued = 10**6

    async def go():
        nonlocal gate
        gate = asyncio.Event()
        d = await a.step()
        assert d["prefill"].delta == 1
        for clock.t in (100.0, 200.0):                  # long past the cooldown, still loading
            d = await a.step()
            assert d["prefill"].delta == 0 and d["prefill"].reason == "previous action still in flight"
        gate.set()
        await a.join()                                  # completes at t=200: cooldown restarts there
        clock.t = 250.0
        d = await a.step()
        assert d["prefill"].delta == 0 and "cooldown" in d["prefill"].reason
        clock.t = 260.0
        d = await a.step()
        assert d["prefill"].delta == 1
        await a.join()

    asyncio.run(go())
    assert c.replicas["prefill"] == 3


def test_loop_counts_failed_actions_and_does_not_hammer(caplog):
    c, clock = FakeCluster(), Clock()

    def broken_add(pool):
        raise RuntimeError("no GPU left")

    a = PoolAutoscaler({"prefill": replace(RULE, upscale_delay_s=0, max_step=2)}, c.read_metrics, broken_add,
                       c.drain, clock=clock)
    c.queued = 10**6
    caplog.set_level(logging.WARNING, logger="pdcluster.router.autoscaler")
    asyncio.run(drive(a, clock, 100))
    assert a.action_errors["prefill"] == 4 and not a.replicas_added     # two actions (t=0, t=60), 2 calls each
    assert c.replicas["prefill"] == 1
    assert any("no GPU left" in r.getMessage() for r in caplog.records)


def test_missing_pool_metrics_hold():
    c, clock = FakeCluster(), Clock()
    a = PoolAutoscaler(RULES, lambda: {"decode": c.read_metrics()["decode"]}, c.add, c.drain, clock=clock)
    d = asyncio.run(a.step())
    assert d["prefill"].delta == 0 and d["prefill"].reason == "no metrics for this pool"


def test_run_ticks_until_stopped():
    c = FakeCluster()
    c.queued = 10**6
    a = PoolAutoscaler({"prefill": replace(RULE, upscale_delay_s=0, cooldown_s=0, max_step=1)}, c.read_metrics,
                       c.add, c.drain, interval_s=0.001)

    async def go():
        stop = asyncio.Event()
        task = asyncio.ensure_future(a.run(stop))
        while c.replicas["prefill"] < RULE.max_replicas:
            await asyncio.sleep(0.001)
        stop.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(go())
    assert c.replicas["prefill"] == RULE.max_replicas and a.decisions[("prefill", "up")] == 7


def test_rules_from_the_shipped_pools_config():
    cfg = load_pools_config(Path(__file__).resolve().parents[2] / "deploy" / "pools.yaml").pools
    c, clock = FakeCluster(cfg.prefill.initial_replicas, cfg.decode.initial_replicas), Clock()
    a = PoolAutoscaler(cfg.scaling_rules(), c.read_metrics, c.add, c.drain, clock=clock,
                       interval_s=cfg.autoscaler.interval_s)
    c.queued = 3 * cfg.prefill.autoscale.target
    asyncio.run(drive(a, clock, cfg.prefill.autoscale.upscale_delay_s))
    assert c.replicas["prefill"] == 1 + cfg.prefill.autoscale.max_step
