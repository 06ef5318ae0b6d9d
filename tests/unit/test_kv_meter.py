"""kv_transfer.meter and kv_transfer.throttle: pure-Python figures for the router and slow links."""
import threading

import pytest

from pdcluster.kv_transfer.meter import BandwidthMeter
from pdcluster.kv_transfer.throttle import TokenBucket

pytestmark = pytest.mark.timeout(60)


def test_meter_math():
    m = BandwidthMeter(alpha=0.5)
    assert m.bandwidth("p0", "d0") is None and m.snapshot() == []
    m.record("p0", "d0", 1000, 1.0, now=10.0)  # 1000 B/s: the first sample sets the EWMA
    m.record("p0", "d0", 3000, 1.0, now=11.0)  # 3000 B/s: 0.5 * 3000 + 0.5 * 1000
    m.record("p0", "d1", 500, 0.25, now=12.0)
    assert m.bandwidth("p0", "d0") == pytest.approx(2000.0)
    assert m.bandwidth("p0", "d1") == pytest.approx(2000.0)
    assert m.bandwidth("d0", "p0") is None  # links are directed
    snap = {(s["src_id"], s["dst_id"]): s for s in m.snapshot()}
    assert snap[("p0", "d0")] == {
        "src_id": "p0", "dst_id": "d0", "total_bytes": 4000, "total_seconds": 2.0, "count": 2,
        "ewma_bytes_per_s": 2000.0, "last_sample_time": 11.0, "mean_bytes_per_s": 2000.0}
    assert snap[("p0", "d1")]["count"] == 1


def test_meter_zero_second_sample_counts_bytes_only():
    m = BandwidthMeter()
    m.record("a", "b", 100, 0.0, now=1.0)
    assert m.bandwidth("a", "b") is None
    (s,) = m.snapshot()
    assert (s["total_bytes"], s["count"], s["mean_bytes_per_s"]) == (100, 1, 0.0)
    m.record("a", "b", 100, 0.5)
    assert m.bandwidth("a", "b") == pytest.approx(200.0)


def test_meter_alpha_bounds():
    with pytest.raises(ValueError):
        BandwidthMeter(alpha=0.0)
    with pytest.raises(ValueError):
        BandwidthMeter(alpha=1.5)


def test_meter_is_thread_safe():
    m = BandwidthMeter()

    def work():
        for _ in range(1000):
            m.record("a", "b", 10, 0.001)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (s,) = m.snapshot()
    assert s["count"] == 4000 and s["total_bytes"] == 40000
    assert s["total_seconds"] == pytest.approx(4.0)


def test_token_bucket_paces_to_the_rate():
    now = [0.0]
    b = TokenBucket(rate=1000.0, burst=100.0, clock=lambda: now[0])
    assert b.reserve(100) == 0.0  # the burst is free
    assert b.reserve(500) == pytest.approx(0.5)  # 500 B in debt at 1000 B/s
    now[0] = 0.5
    assert b.reserve(250) == pytest.approx(0.25)
    now[0] = 10.0  # a long idle refills only up to the burst
    assert b.reserve(100) == 0.0
    assert b.reserve(1) == pytest.approx(0.001)


def test_token_bucket_long_run_rate():
    now = [0.0]
    b = TokenBucket(rate=2000.0, burst=500.0, clock=lambda: now[0])
    sent = 0
    for _ in range(100):  # a sender that sleeps exactly as told
        now[0] += b.reserve(300)
        sent += 300
    assert sent <= 2000.0 * now[0] + 500.0
    assert sent / now[0] == pytest.approx(2000.0, rel=0.05)


def test_token_bucket_rejects_bad_params():
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1)
