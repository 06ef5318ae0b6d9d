"""Idle-link probes from the router (no Ray): which links get probed, when, and how often."""
import asyncio

from pdcluster.messages import LinkFigures

from pdcluster.router.cost_config import CostConfig
from pdcluster.router.config import RouterConfig
from pdcluster.router.lifecycle import Router


class Prefill:
    def __init__(self, wid, calls):
        self.worker_id, self.calls = wid, calls

    async def probe(self, address, dst_id):
        self.calls.append((self.worker_id, dst_id, address))
        return 1e8


class Decode:
    def __init__(self, wid):
        self.worker_id = wid


def make_router(calls):
    r = Router(RouterConfig(policy="least-loaded"), None, (2,), 2048,
               cost_config=CostConfig(probe_after_s=30.0))
    for p in ("prefill-0", "prefill-1"):
        r.add_worker("prefill", Prefill(p, calls))
    for d in ("decode-0", "decode-1"):
        r.add_worker("decode", Decode(d))
        r.workers.loads[d].kv_address = f"127.0.0.1:{9000 + int(d[-1])}"
    return r


def run_probes(r, now):
    async def go():
        r.workers.prober.probe_idle_links(now)
        await asyncio.gather(*list(r.workers.background))
    asyncio.run(go())


def test_unmeasured_links_are_probed_once_per_period_by_idle_workers():
    calls = []
    r = make_router(calls)
    run_probes(r, 1000.0)
    # one probe per idle prefill worker at a time, to a link never measured
    assert sorted(calls) == [("prefill-0", "decode-0", "127.0.0.1:9000"), ("prefill-1", "decode-0", "127.0.0.1:9000")]
    calls.clear()
    run_probes(r, 1001.0)          # the next poll: the other decode worker's links
    assert sorted(c[:2] for c in calls) == [("prefill-0", "decode-1"), ("prefill-1", "decode-1")]
    calls.clear()
    run_probes(r, 1002.0)          # every link probed within the period: nothing (no meter sample came back here)
    assert calls == []
    run_probes(r, 1040.0)          # a period later, still unmeasured: again
    assert len(calls) == 2


def test_busy_unhealthy_or_measured_links_are_not_probed():
    calls = []
    r = make_router(calls)
    r.workers.loads["prefill-0"].in_flight = 1          # busy: its transfers measure the link
    r.workers.loads["decode-1"].healthy = False
    r.telemetry.links.ingest([LinkFigures("prefill-1", "decode-0", ewma_bytes_per_s=5e8, count=1,
                                         last_sample_time=995.0)])
    run_probes(r, 1000.0)
    assert calls == []                                # prefill-1 -> decode-0 is fresh, decode-1 is down
    run_probes(r, 1026.0)                             # the sample is now 31 s old
    assert calls == [("prefill-1", "decode-0", "127.0.0.1:9000")]
