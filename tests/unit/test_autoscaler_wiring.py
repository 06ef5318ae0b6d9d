"""The autoscaler wired to the router (no Ray): the pool view it reads, draining workers skipped by
every placement policy, the drain-then-remove sequence, the latency windows and the exported metrics."""
from __future__ import annotations

import asyncio
import logging
import math

import pytest

from pdcluster.deploy.pools import load_pools_config, parse_pools_config
from pdcluster.router.autoscaler import ScaleDecision, PoolAutoscaler, PoolMetrics, ScalingRule, pool_metrics
from pdcluster.router.config import RouterConfig
from pdcluster.router.lifecycle import Router
from pdcluster.router.metrics import RecentWindow, RouterMetrics
from pdcluster.router.placement import WorkerLoad
from pdcluster.router.placement import POLICY_NAMES, make_policy
from tests.unit.test_pools_config import SHIPPED


def load(wid, role, **kw):
    return WorkerLoad(wid, role, **kw)


# the pool view

def test_pool_metrics_counts_live_and_starting_replicas_and_skips_draining():
    loads = [load("prefill-0", "prefill", queued_tokens=300), load("prefill-1", "prefill", queued_tokens=100),
             load("prefill-2", "prefill", queued_tokens=999, draining=True),
             load("decode-0", "decode", free_blocks=25, num_blocks=100),
             load("decode-1", "decode", free_blocks=75, num_blocks=100),
             load("decode-2", "decode")]                         # capacity not reported yet: not in the mean
    p = pool_metrics("prefill", loads, starting=1, p90_ttft_ms=120.0)
    assert p == PoolMetrics(replicas=3, queued_prompt_tokens=400, p90_ttft_ms=120.0, held=3)
    d = pool_metrics("decode", loads, p90_tpot_ms=30.0)
    assert d.replicas == 3 and d.queued_prompt_tokens == 0 and d.kv_utilization == pytest.approx(0.5)
    assert d.p90_tpot_ms == 30.0 and not d.idle
    # a prefill worker's cached blocks never make the prefill pool look busy
    assert pool_metrics("prefill", [load("p", "prefill", free_blocks=1, num_blocks=100)]).idle


# placement skips draining workers

@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_policy_skips_draining_workers(name):
    pol = make_policy(name)
    ps = [load("prefill-0", "prefill", draining=True), load("prefill-1", "prefill", queued_tokens=10**6)]
    ds = [load("decode-0", "decode", free_blocks=100, num_blocks=100, draining=True),
          load("decode-1", "decode", free_blocks=60, num_blocks=100, in_flight=20)]
    for _ in range(4):       # round-robin too
        dec = pol.choose(200, ps, ds)
        assert dec.decode == "decode-1" and dec.prefill in (None, "prefill-1")
    ds[1].draining = True
    assert pol.choose(200, ps, ds) is None


# drain, then remove

class FakeClient:
    def __init__(self, wid):
        self.worker_id = wid


def make_router():
    # least-loaded: every placement is remote, so a draining prefill worker's skip is visible
    r = Router(RouterConfig(policy="least-loaded"), None, (2,), 2048)
    for wid, role in (("prefill-0", "prefill"), ("prefill-1", "prefill"), ("decode-0", "decode")):
        r.add_worker(role, FakeClient(wid))
    return r


def forgotten(r, wid):
    return (wid not in r.workers.prefill and wid not in r.workers.loads and wid not in r.index.workers
            and wid not in r.metrics._pools)


def test_retire_waits_for_running_requests_then_removes_and_stops():
    r, events = make_router(), []

    async def go():
        w = r.workers.loads["prefill-1"]
        w.in_flight = 2

        async def finish_later():
            await asyncio.sleep(0.2)
            choice = r.policy.choose(100, r.workers.loads_of("prefill"), r.workers.loads_of("decode"))
            assert choice.prefill == "prefill-0"
            w.in_flight = 0
            events.append("finished")

        async def stop():
            events.append("stopped")
            assert forgotten(r, "prefill-1")           # out of every view before the process goes

        t = asyncio.ensure_future(finish_later())
        res = await r.retire_worker("prefill-1", stop, drain_timeout_s=5.0)
        await t
        return res

    res = asyncio.run(go())
    assert events == ["finished", "stopped"]
    assert not res["stopped_busy"] and res["left"] == 0 and 0.15 < res["waited_s"] < 2.0
    assert set(r.workers.prefill) == {"prefill-0"}


def test_retire_stops_a_busy_worker_after_the_bound_so_its_requests_migrate():
    r, events = make_router(), []

    async def go():
        w = r.workers.loads["prefill-1"]
        w.in_flight = 1

        async def stop():                              # stopping makes the stream fail: the request moves
            events.append(("stopped", w.in_flight, "prefill-1" in r.workers.prefill))
            await asyncio.sleep(0.05)
            w.in_flight = 0

        return await r.retire_worker("prefill-1", stop, drain_timeout_s=0.1, migrate_timeout_s=5.0)

    res = asyncio.run(go())
    assert events == [("stopped", 1, True)]           # stopped once, while still known (so streams fail over)
    assert res["stopped_busy"] and res["left"] == 0 and forgotten(r, "prefill-1")


def test_a_retired_workers_id_leaves_the_retiring_set_after_its_streams_had_time_to_move():
    """retire() added the id for good (ids never recur: one per scale-down ever, kept for the router's life)."""
    r = make_router()

    async def go():
        async def stop():
            pass
        await r.retire_worker("prefill-1", stop, drain_timeout_s=0.1, migrate_timeout_s=0.2)
        kept = "prefill-1" in r.workers.retiring       # still there for streams failing over from it (run.py)
        await asyncio.sleep(0.3)
        return kept, "prefill-1" in r.workers.retiring
    assert asyncio.run(go()) == (True, False)


# latency window and metrics

def test_recent_window_quantile_and_expiry():
    t = [0.0]
    w = RecentWindow(10.0, clock=lambda: t[0])
    assert w.quantile(0.9) is None
    for i in range(1, 11):
        w.add(float(i))
    assert w.quantile(0.9) == 9.0 and w.quantile(1.0) == 10.0 and w.quantile(0.0) == 1.0
    t[0] = 10.5
    w.add(100.0)
    assert w.quantile(0.9) == 100.0                    # the first ten fell out of the window


def test_router_metrics_feed_the_windows_and_export_autoscaler_decisions():
    m = RouterMetrics()
    m.admitted()
    m.first_token(0.25)
    m.finished("stop", 0.25, 1.25, 11)
    assert m.recent_ttft.quantile(0.9) == 0.25 and m.recent_tpot.quantile(0.9) == pytest.approx(0.1)
    m.autoscale_decision(ScaleDecision("prefill", 1, 1, "busy", "p90_ttft", 3000.0, 3.0, "load"))
    m.autoscale_decision(ScaleDecision("decode", 0, 1, "no data", cause="no_data"))
    m.autoscale_action("prefill", "add", True)
    text = m.render().decode()
    assert 'pdcluster_autoscaler_decisions_total{cause="load",direction="up",pool="prefill"} 1.0' in text
    assert 'pdcluster_autoscaler_decisions_total{cause="no_data",direction="hold",pool="decode"} 1.0' in text
    assert 'pdcluster_autoscaler_load{pool="prefill"} 3.0' in text
    assert 'pdcluster_autoscaler_load{pool="decode"} NaN' in text
    assert 'pdcluster_autoscaler_target_replicas{pool="prefill"} 2.0' in text
    assert 'pdcluster_autoscaler_actions_total{action="add",pool="prefill",result="ok"} 1.0' in text


def test_loop_reports_to_its_observer_and_logs_hold_causes_once(caplog):
    seen, n = [], {"prefill": 1}

    class Observer:
        def autoscale_decision(self, d):
            seen.append((d.pool, d.direction, d.cause))

        def autoscale_action(self, pool, action, ok):
            seen.append((pool, action, ok))

    rule = ScalingRule("queued_prompt_tokens_per_replica", 100.0, 1, 2, upscale_delay_s=0, cooldown_s=0)
    queued = [0]
    a = PoolAutoscaler({"prefill": rule}, lambda: {"prefill": PoolMetrics(n["prefill"], queued[0])},
                       lambda p: n.__setitem__(p, n[p] + 1), lambda p: None, clock=lambda: 0.0, observer=Observer())
    caplog.set_level(logging.INFO, logger="pdcluster.router.autoscaler")

    async def go():
        for q in (0, 0, 0, 500):
            queued[0] = q
            await a.step()
            await a.join()

    asyncio.run(go())
    assert seen == [("prefill", "hold", "at_min")] * 3 + [("prefill", "up", "load"), ("prefill", "add", True)]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len([m for m in infos if "hold" in m]) == 1 and any("+1 (1 -> 2)" in m for m in infos)
    assert math.isclose(a.last["prefill"].load, 5.0)


def test_every_decision_names_a_known_cause():
    from pdcluster.router.autoscaler import CAUSES, PoolPolicy
    rule = ScalingRule("queued_prompt_tokens_per_replica", 100.0, 1, 3, upscale_delay_s=10, downscale_delay_s=10,
                       cooldown_s=30)
    pol, causes = PoolPolicy("prefill", rule), set()
    for t, (n, q) in enumerate([(0, 0), (5, 0), (1, 500)] * 3 + [(1, 500)] * 20 + [(3, 0)] * 40 + [(3, 120)] * 5):
        causes.add(pol.decide(PoolMetrics(n, q), float(t)).cause)
    assert causes <= set(CAUSES) and {"below_min", "above_max", "load", "delay", "cooldown"} <= causes


# serve's choice of rules

def test_serve_autoscales_the_pools_with_room_to_scale():
    c = load_pools_config(SHIPPED).pools
    assert set(c.autoscaling_rules()) == {"prefill", "decode"}
    assert (c.prefill.hi, c.decode.hi) == (4, 4)     # the Ray pool units a serve-started Ray offers
    fixed = parse_pools_config("decode: {min_replicas: 2, max_replicas: 2}\nprefill: {max_replicas: 3}\n").pools
    assert set(fixed.autoscaling_rules()) == {"prefill"}
    off = parse_pools_config("autoscaler: {enabled: false}\nprefill: {max_replicas: 3}\n").pools
    assert off.autoscaling_rules() == {}
    from pdcluster.deploy.config import ClusterConfig
    assert ClusterConfig().pools.autoscaling_rules() == {}    # flags alone: fixed pools, no autoscaling


def test_a_replica_that_misses_its_polls_still_counts_against_max_replicas():
    """It still holds its pool unit (hung, or restarting under Ray). Counted as absent, a pool at max spawned
    one more actor (which local Ray could not even place), then retired one the moment the worker answered
    again. It does not serve, so the load and min_replicas count only the replicas that answer."""
    from pdcluster.router.autoscaler import PoolPolicy, ScalingRule
    rule = ScalingRule(signal="kv_utilization", target=0.8, min_replicas=1, max_replicas=2, upscale_delay_s=0,
                       cooldown_s=0)
    loads = [load("decode-0", "decode", free_blocks=5, num_blocks=100),
             load("decode-1", "decode", free_blocks=5, num_blocks=100, healthy=False)]
    m = pool_metrics("decode", loads)
    assert (m.replicas, m.held) == (1, 2)
    pol = PoolPolicy("decode", rule)
    d = pol.decide(m, 0.0)
    assert (d.delta, d.cause) == (0, "at_max") and "1 not answering" in d.reason
    loads[1].healthy = True
    assert pol.decide(pool_metrics("decode", loads), 1.0).cause == "at_max"       # and no above_max
    wide = ScalingRule(signal="kv_utilization", target=0.5, min_replicas=1, max_replicas=3, upscale_delay_s=0,
                       cooldown_s=0, max_step=4)
    loads[1].healthy = False
    assert PoolPolicy("decode", wide).decide(pool_metrics("decode", loads), 0.0).delta == 1    # up to max, not past
    # below min_replicas with every unit held by replicas not answering: it spawned one past max, then retired one
    loads[0].healthy = False
    d = PoolPolicy("decode", rule).decide(pool_metrics("decode", loads), 0.0)
    assert (d.delta, d.cause) == (0, "below_min") and "2 not answering hold max_replicas=2" in d.reason
    three = [*loads, load("decode-2", "decode", healthy=False)]
    assert PoolPolicy("decode", wide).decide(pool_metrics("decode", loads[:2]), 0.0).delta == 1     # room for one
    assert PoolPolicy("decode", wide).decide(pool_metrics("decode", three), 0.0).delta == 0


def test_a_kv_utilization_rule_that_could_never_scale_up_is_refused():
    """kv_utilization never exceeds 1, and scale-up needs load > up_ratio: target x up_ratio >= 1 never fires."""
    from pdcluster.router.autoscaler import ScalingRule
    with pytest.raises(ValueError, match="never scales up"):
        ScalingRule(signal="kv_utilization", target=1.0)
    ScalingRule(signal="kv_utilization", target=0.9)
