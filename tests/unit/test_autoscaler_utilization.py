"""The autoscaler's rate signals (router/autoscaler.py): prefill_utilization (sent prompt tokens/s
over a window against the pool's learned prefill rate) and decode_step_ms (the decode workers'
measured step time of their last poll), their inputs (WorkerRegistry.sent_tokens, Telemetry,
pool_metrics) and their pools.yaml knobs. No Ray, no sleeping: a fake clock."""
from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from pdcluster.deploy.pools import PoolsConfigError, parse_pools_config
from pdcluster.messages import EngineFigures, WorkerStatus
from pdcluster.router.autoscaler import PoolMetrics, PoolPolicy, ScalingRule, pool_metrics, signal_value
from pdcluster.router.config import RouterConfig
from pdcluster.router.metrics import RouterMetrics
from pdcluster.router.placement import WorkerLoad
from pdcluster.router.prefix_index import PrefixIndex
from pdcluster.router.registry import WorkerRegistry
from pdcluster.router.telemetry import Telemetry
from tests.unit.test_pools_config import edited

DT = 5.0                # tick, seconds
TPS = 40_000.0          # learned prefill tokens/s of one replica
QUEUE = ScalingRule("queued_prompt_tokens_per_replica", 4096.0, min_replicas=1, max_replicas=8,
                    upscale_delay_s=5, downscale_delay_s=120, max_step=2, cooldown_s=30)
UTIL = ScalingRule("prefill_utilization", 0.5, min_replicas=1, max_replicas=8, upscale_delay_s=5,
                   downscale_delay_s=120, max_step=2, cooldown_s=30, window_s=60)


def run(rule: ScalingRule, replicas: int, t_end: float, sent_tps, queued=lambda t: 0, apply: bool = True):
    """Tick a prefill PoolPolicy every DT s: sent_tps(t) prompt tokens/s arrive (integrated into the
    cumulative counter), queued(t) tokens sit in the pool's queue. Returns [(t, decision)]."""
    pol, n, sent, out = PoolPolicy("prefill", rule), replicas, 0.0, []
    for i in range(int(t_end / DT) + 1):
        t = i * DT
        if i:
            sent += sent_tps(t) * DT
        m = PoolMetrics(replicas=n, queued_prompt_tokens=int(queued(t)), prompt_tokens_sent=int(sent),
                        replica_prefill_tps=TPS)
        d = pol.decide(m, t)
        out.append((t, d))
        if apply:
            n = d.target_replicas
    return out


def ups(log):
    return [(t, d.delta) for t, d in log if d.delta]


def test_one_long_prompt_reads_as_overload_on_the_queue_but_not_on_utilization():
    # 2 replicas, 16k tok/s of ordinary prompts (0.2 of capacity); at t=100 one 120k-token prompt
    # arrives and sits 10 s in one replica's queue (ticks at 100, 105, 110)
    sent = lambda t: 16_000 + (120_000 / DT if t == 100 else 0)     # noqa: E731
    queued = lambda t: 120_000 if 100 <= t <= 110 else 2_000        # noqa: E731
    old = run(QUEUE, 2, 300, sent, queued)
    assert ups(old) and ups(old)[0][0] == 105                       # 60k tokens/replica = 14.6x target
    new = run(UTIL, 2, 300, sent, queued, apply=False)
    peak = max(d.load for _, d in new if d.load is not None)
    # the prompt is 2k tok/s of the 60 s window: (16k + 2k) / (2 x 40k) = 0.225 = 0.45x target
    assert peak == pytest.approx(0.45, rel=0.02)
    assert not [t for t, k in ups(new) if k > 0]


def test_utilization_sizes_the_pool_to_the_sent_rate():
    # 8 x 40k tok/s of capacity wanted at 0.5: 160k tok/s -> 4 replicas would sit at 1.0x, the policy
    # aims at the band's middle (0.75x target): ceil(160k / (40k x 0.375)) = 11 > max 8 -> 8, 2 at a time
    log = run(UTIL, 2, 900, lambda t: 160_000 if t >= 60 else 10_000)
    final = log[-1][1]
    assert final.replicas == 8 and final.delta == 0
    assert all(d <= 2 for _, d in ups(log)) and ups(log)[0][0] > 60
    # and back down once the rate falls: 10k tok/s on 8 replicas is 0.06x target
    log = run(UTIL, 8, 900, lambda t: 10_000)
    assert log[-1][1].replicas == 1 and all(d < 0 for _, d in ups(log))


def test_utilization_tracks_a_ramp_within_the_band():
    # the rate ramps 20k -> 100k tok/s over 600 s; the pool must follow it up (never more than
    # the delay + cooldown behind) and stay under 1.0x target once settled
    rate = lambda t: 20_000 + 80_000 * min(max(t - 100, 0) / 600, 1)   # noqa: E731
    log = run(UTIL, 1, 1500, rate)
    end = log[-1][1]
    assert end.replicas >= 5 and UTIL.down_ratio <= end.load <= UTIL.up_ratio


def test_window_rate_first_tick_reset_and_window():
    pol = PoolPolicy("prefill", UTIL)
    m = lambda sent, n=1: PoolMetrics(replicas=n, prompt_tokens_sent=sent, replica_prefill_tps=TPS)  # noqa: E731
    d = pol.decide(m(0), 0.0)
    assert d.cause == "no_data" and d.delta == 0 and "two ticks" in d.reason
    assert pol.sent_tps(m(50_000), 5.0) == pytest.approx(10_000)
    # a counter that goes back (router restart) starts over: no rate until the next tick
    assert pol.sent_tps(m(10), 10.0) is None
    assert pol.sent_tps(m(40_010), 15.0) == pytest.approx(8_000)
    # only the last window_s counts: 0 tokens for 60 s after a burst reads 0
    for t in range(20, 90, 5):
        r = pol.sent_tps(m(40_010), float(t))
    assert r == 0.0
    # no learned rate: no data
    assert pol.decide(PoolMetrics(replicas=1, prompt_tokens_sent=1), 100.0).cause == "no_data"


def test_pool_metrics_carries_the_sent_counter_and_the_mean_learned_rate():
    loads = [WorkerLoad("prefill-0", "prefill"), WorkerLoad("prefill-1", "prefill"),
             WorkerLoad("prefill-2", "prefill", draining=True), WorkerLoad("decode-0", "decode")]
    rates = {"prefill-0": 30_000.0, "prefill-1": 50_000.0, "prefill-2": 1.0}
    p = pool_metrics("prefill", loads, starting=1, prompt_tokens_sent=7, prefill_tps=lambda w: rates[w.worker_id])
    assert p.replicas == 3 and p.prompt_tokens_sent == 7 and p.replica_prefill_tps == 40_000.0
    d = pool_metrics("decode", loads, prompt_tokens_sent=7, prefill_tps=lambda w: rates[w.worker_id])
    assert d.prompt_tokens_sent == 0 and d.replica_prefill_tps is None
    assert pool_metrics("prefill", loads[3:], prefill_tps=lambda w: 1.0).replica_prefill_tps is None


class _Client:
    def __init__(self, wid):
        self.worker_id = wid


def test_registry_counts_prompt_tokens_sent_per_pool():
    reg = WorkerRegistry(RouterConfig(), RouterMetrics(CollectorRegistry()), PrefixIndex(), Telemetry())
    reg.add("prefill", _Client("prefill-0"))
    reg.add("decode", _Client("decode-0"))
    reg.charge("prefill-0", 1000, +1)
    reg.charge("decode-0", 0, +1)
    reg.charge("prefill-0", 1000, -1)           # the call returned: still sent once
    reg.charge("decode-0", 300, +1)             # a local prefill's tokens count on the decode pool
    reg.charge("gone", 5000, +1)                # an unknown worker counts nowhere
    assert reg.sent_tokens == {"prefill": 1000, "decode": 300}
    assert reg.loads["prefill-0"].queued_tokens == 0


def test_pools_yaml_prefill_utilization_knobs():
    text, _ = edited("signal: queued_prompt_tokens_per_replica ", "signal: prefill_utilization ")
    text, _ = edited("target: 8192 ", "target: 0.3 ", text)
    text, _ = edited("window_s: 60 ", "window_s: 180 ", text)
    r = parse_pools_config(text).pools.scaling_rules()["prefill"]
    assert (r.signal, r.target, r.window_s) == ("prefill_utilization", 0.3, 180.0)
    # a fraction: the queue's token target left in place is an error naming the key
    text, line = edited("signal: queued_prompt_tokens_per_replica ", "signal: prefill_utilization ")
    with pytest.raises(PoolsConfigError) as e:
        parse_pools_config(text)
    assert [i.key for i in e.value.issues] == ["prefill.autoscale.target"] and "(0, 1]" in str(e.value)
    text, _ = edited("window_s: 60 ", "window_s: 0 ")
    with pytest.raises(PoolsConfigError) as e:
        parse_pools_config(text)
    assert [i.key for i in e.value.issues] == ["prefill.autoscale.window_s"]
    with pytest.raises(ValueError, match="window_s"):
        ScalingRule("prefill_utilization", 0.5, window_s=0)


# decode_step_ms

def test_telemetry_keeps_the_last_polls_measured_step_time():
    t, w = Telemetry(), WorkerLoad("decode-0", "decode")
    poll = lambda **f: WorkerStatus("decode-0", "decode", "inc", 1, EngineFigures(**f), running=4)  # noqa: E731
    assert t.last_step_s(w) is None                                     # never polled
    t.ingest_status(w, poll(decode_steps=10, decode_seqs=40, decode_s=0.2))
    assert t.last_step_s(w) == pytest.approx(0.02)
    t.ingest_status(w, poll(decode_steps=30, decode_seqs=120, decode_s=1.0))     # 20 steps in 0.8 s
    assert t.last_step_s(w) == pytest.approx(0.04)
    t.ingest_status(w, poll(decode_steps=30, decode_seqs=120, decode_s=1.0))     # no step since
    assert t.last_step_s(w) is None


def test_pool_metrics_averages_the_step_time_of_decode_workers_that_stepped():
    loads = [WorkerLoad("decode-0", "decode"), WorkerLoad("decode-1", "decode"), WorkerLoad("decode-2", "decode"),
             WorkerLoad("decode-3", "decode", draining=True), WorkerLoad("prefill-0", "prefill")]
    steps = {"decode-0": 0.020, "decode-1": 0.040, "decode-2": None, "decode-3": 0.5, "prefill-0": 0.5}
    d = pool_metrics("decode", loads, decode_step_s=lambda w: steps[w.worker_id])
    assert d.replicas == 3 and d.decode_step_ms == pytest.approx(30.0)
    assert pool_metrics("prefill", loads, decode_step_s=lambda w: steps[w.worker_id]).decode_step_ms is None
    # no worker stepped: nothing running decodes slowly, the pool reads 0 and may shrink
    idle = pool_metrics("decode", loads[2:3], decode_step_s=lambda w: None)
    assert idle.idle and signal_value("decode_step_ms", idle) == 0.0
    # a busy pool with no decode-only step (every step carried a prefill chunk) has no data: before, it
    # read 0 and shrank while its KV was 90% full
    busy = [WorkerLoad(f"decode-{i}", "decode", running=4, free_blocks=10, num_blocks=100) for i in range(3)]
    m = pool_metrics("decode", busy, decode_step_s=lambda w: None)
    assert not m.idle and m.decode_step_ms is None and signal_value("decode_step_ms", m) is None


def test_decode_step_signal_acts_a_request_length_before_p90_tpot():
    # the batch grows from t=100: the step time rises 15 -> 45 ms over 300 s; a request's TPOT is
    # known when it ends, so the window's p90 TPOT shows the steps of ~60 s before
    step = lambda t: 15 + 30 * min(max(t - 100, 0) / 300, 1)                # noqa: E731
    rules = {s: ScalingRule(s, 25.0, min_replicas=1, max_replicas=4, upscale_delay_s=5, downscale_delay_s=120,
                            cooldown_s=30) for s in ("decode_step_ms", "p90_tpot")}
    first = {}
    for sig, rule in rules.items():
        pol = PoolPolicy("decode", rule)
        for i in range(100):
            t = i * DT
            m = PoolMetrics(replicas=1, kv_utilization=0.3, decode_step_ms=step(t), p90_tpot_ms=step(t - 60))
            if pol.decide(m, t).delta > 0:
                first[sig] = t
                break
    # above 25 ms from t=205: the step signal acts after its 5 s delay, p90 TPOT 60 s later
    assert first == {"decode_step_ms": 210.0, "p90_tpot": 270.0}


def test_pools_yaml_decode_step_signal_takes_the_tpot_slo():
    text, _ = edited("signal: kv_utilization ", "signal: decode_step_ms ")
    r = parse_pools_config(text).pools.scaling_rules()["decode"]
    assert (r.signal, r.target) == ("decode_step_ms", 50.0)


def test_serves_pool_metrics_reads_both_signals_from_the_routers_view():
    """deploy/scaling.py's Scaling.pool_metrics on a real Router (no Ray): the sent counter, the
    learned prefill rate and the decode step time come through."""
    from pdcluster.deploy.scaling import Scaling
    from tests.unit.test_autoscaler_wiring import make_router

    class Cluster(Scaling):
        def __init__(self, router):
            self.router, self.starting = router, {}
    r = make_router()
    reg = r.workers
    reg.charge("prefill-0", 5000, +1)
    reg.loads["prefill-0"].prefill_tps = 30_000.0       # an override wins over the learned rate
    reg.loads["prefill-1"].prefill_tps = 50_000.0
    reg.telemetry.ingest_status(reg.loads["decode-0"], WorkerStatus(
        "decode-0", "decode", "inc", 1, EngineFigures(decode_steps=4, decode_seqs=8, decode_s=0.1), running=2))
    snap = Cluster(r).pool_metrics()
    p, d = snap["prefill"], snap["decode"]
    assert (p.replicas, p.prompt_tokens_sent, p.replica_prefill_tps) == (2, 5000, 40_000.0)
    assert d.decode_step_ms == pytest.approx(25.0) and d.prompt_tokens_sent == 0


def test_an_unhealthy_replica_is_not_counted_nor_its_stale_figures_averaged():
    """A worker that stopped answering (dead past its restarts, or hung) keeps its registration and its
    last figures; counted, it hid a busy pool (95% KV used read as 52%) and a pool below min_replicas."""
    busy = WorkerLoad("decode-0", "decode", free_blocks=5, num_blocks=100)
    gone = WorkerLoad("decode-1", "decode", free_blocks=90, num_blocks=100, healthy=False)
    m = pool_metrics("decode", [busy, gone])
    assert m.replicas == 1 and m.kv_utilization == pytest.approx(0.95)
