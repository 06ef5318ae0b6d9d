"""router/telemetry.py across worker membership and restarts: a removed worker's measured links leave
the table (and a prefill worker's meter re-sending them does not bring them back), and a restarted
worker's first counters are a sample of the new process, not a difference across two processes."""
import pytest

from pdcluster.messages import EngineFigures, LinkFigures, WorkerStatus
from pdcluster.router.cost_config import CostConfig
from pdcluster.router.placement import WorkerLoad
from pdcluster.router.telemetry import Telemetry


def link(src, dst, bps=1e9, count=3):
    return LinkFigures(src, dst, count=count, ewma_bytes_per_s=bps, last_sample_time=1.0)


def test_a_removed_workers_links_are_forgotten_and_not_taken_back():
    tel = Telemetry(CostConfig())
    zones = {"prefill-0": "", "decode-0": "", "decode-1": ""}
    tel.links.ingest([link("prefill-0", "decode-0"), link("prefill-0", "decode-1")], zones)
    assert set(tel.links.links) == {("prefill-0", "decode-0"), ("prefill-0", "decode-1")}
    tel.remove_worker("decode-0")
    assert set(tel.links.links) == {("prefill-0", "decode-1")}
    del zones["decode-0"]           # the registry's zones: registered workers only
    tel.links.ingest([link("prefill-0", "decode-0", count=4), link("prefill-0", "decode-1", count=4)], zones)
    assert set(tel.links.links) == {("prefill-0", "decode-1")}       # the meter's re-send is skipped
    assert tel.links.links[("prefill-0", "decode-1")].count == 4


def test_a_restarted_workers_first_counters_are_its_own_sample():
    tel = Telemetry(CostConfig())
    w = WorkerLoad("prefill-0", "prefill")
    a = EngineFigures(prefill_tokens=2000, prefill_s=2.0, steps=10, tokens=2000, busy_s=2.0)
    tel.ingest_status(w, WorkerStatus("prefill-0", "prefill", "inc-A", 1, a))
    assert tel.prefill_tps(w) == pytest.approx(1000)
    # a new process whose counters all happen to exceed the old one's: 6000 tokens in 2.1 s of its own
    b = EngineFigures(prefill_tokens=6000, prefill_s=2.1, steps=30, tokens=6000, busy_s=2.1)
    tel.ingest_status(w, WorkerStatus("prefill-0", "prefill", "inc-B", 2, b))
    # its sample is 6000 / 2.1 = 2857 tokens/s (EWMA'd with 1000), not (6000 - 2000) / 0.1 = 40,000
    assert 1000 < tel.prefill_tps(w) < 2857.2
