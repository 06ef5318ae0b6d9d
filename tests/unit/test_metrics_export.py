"""The router's Prometheus metrics: names rendered, values move with observations (no cluster)."""
from dataclasses import replace

from prometheus_client.parser import text_string_to_metric_families

from pdcluster.engine.kv_cache_manager import KVCacheManager
from pdcluster.engine.request import Request
from pdcluster.engine.sampling_params import SamplingParams
from pdcluster.messages import EngineFigures, LinkFigures, WorkerStatus
from pdcluster.router.metrics import RouterMetrics


def samples(m: RouterMetrics) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} of one scrape."""
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_named_metrics_are_rendered():
    m = RouterMetrics()
    m.add_worker("prefill-0", "prefill")
    m.add_worker("decode-0", "decode")
    names = {name for name, _ in samples(m)}
    for n in ("pdcluster_ttft_seconds_count", "pdcluster_tpot_seconds_bucket", "pdcluster_e2e_seconds_sum",
              "pdcluster_queue_depth", "pdcluster_running_requests", "pdcluster_placement_decisions_total",
              "pdcluster_pool_replicas", "pdcluster_worker_up"):
        assert n in names, n
    s = samples(m)
    assert s[("pdcluster_pool_replicas", (("pool", "prefill"),))] == 1
    assert s[("pdcluster_placement_decisions_total", (("kind", "local"),))] == 0
    assert s[("pdcluster_worker_up", (("pool", "decode"), ("worker", "decode-0")))] == 0   # not polled yet


def test_request_hooks_move_histograms_and_gauges():
    m = RouterMetrics()
    m.admitted()
    m.admitted()
    s = samples(m)
    assert s[("pdcluster_queue_depth", ())] == 2 and s[("pdcluster_running_requests", ())] == 0
    m.placed("remote")
    m.first_token(0.3)
    s = samples(m)
    assert s[("pdcluster_queue_depth", ())] == 1 and s[("pdcluster_running_requests", ())] == 1
    assert s[("pdcluster_ttft_seconds_count", ())] == 1 and abs(s[("pdcluster_ttft_seconds_sum", ())] - 0.3) < 1e-9
    assert s[("pdcluster_ttft_seconds_bucket", (("le", "0.25"),))] == 0
    assert s[("pdcluster_ttft_seconds_bucket", (("le", "0.5"),))] == 1
    m.finished("length", 0.3, 1.3, 11)                 # TPOT = (1.3 - 0.3) / 10 = 0.1 s
    m.finished("cancelled", None, 0.5, 0)              # never streamed: leaves the queue, no latency
    s = samples(m)
    assert s[("pdcluster_queue_depth", ())] == 0 and s[("pdcluster_running_requests", ())] == 0
    assert abs(s[("pdcluster_tpot_seconds_sum", ())] - 0.1) < 1e-9
    assert s[("pdcluster_e2e_seconds_count", ())] == 1
    assert s[("pdcluster_requests_total", (("status", "length"),))] == 1
    assert s[("pdcluster_requests_total", (("status", "cancelled"),))] == 1
    assert s[("pdcluster_placement_decisions_total", (("kind", "remote"),))] == 1


def status(worker_id, role, figures, links=()) -> WorkerStatus:
    return WorkerStatus(worker_id, role, "inc", 1, figures, links=links)


def test_worker_status_becomes_labelled_series():
    m = RouterMetrics()
    m.add_worker("prefill-0", "prefill")
    m.add_worker("decode-0", "decode")
    link = LinkFigures("prefill-0", "decode-0", total_bytes=4096, total_seconds=0.25, count=2)
    m.worker_status("prefill-0", status("prefill-0", "prefill", EngineFigures(
        free_blocks=90, num_blocks=100, prefix_hits=32, prefix_queries=80, busy_s=1.5, steps=7), links=(link,)))
    m.worker_status("decode-0", status("decode-0", "decode",
                                       EngineFigures(free_blocks=60, num_blocks=100, busy_s=2.0, steps=40)))
    s = samples(m)
    w = lambda wid: (("worker", wid),)  # noqa: E731
    assert s[("pdcluster_kv_blocks_used", w("prefill-0"))] == 10
    assert s[("pdcluster_kv_blocks_free", w("decode-0"))] == 60
    assert s[("pdcluster_prefix_cache_hits_tokens_total", w("prefill-0"))] == 32
    assert s[("pdcluster_prefix_cache_queries_tokens_total", w("prefill-0"))] == 80
    assert s[("pdcluster_worker_busy_seconds_total", w("decode-0"))] == 2.0
    lk = (("dst", "decode-0"), ("src", "prefill-0"))
    assert s[("pdcluster_kv_transfer_bytes_total", lk)] == 4096
    assert s[("pdcluster_kv_transfer_seconds_total", lk)] == 0.25
    assert s[("pdcluster_worker_up", (("pool", "prefill"), ("worker", "prefill-0")))] == 1
    link = replace(link, total_bytes=8192)                # the next poll's running total
    m.worker_status("prefill-0", status("prefill-0", "prefill", EngineFigures(free_blocks=90, num_blocks=100),
                                        links=(link,)))
    m.worker_status("decode-0", None)                     # poll failed: down, no stale figures
    s = samples(m)
    assert s[("pdcluster_kv_transfer_bytes_total", lk)] == 8192
    assert s[("pdcluster_worker_up", (("pool", "decode"), ("worker", "decode-0")))] == 0
    assert ("pdcluster_kv_blocks_free", w("decode-0")) not in s


def test_http_exporter_serves_the_registry():
    import urllib.request
    m = RouterMetrics()
    m.admitted()
    port = m.serve_http("127.0.0.1", 0)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        m.stop_http()
    assert "pdcluster_queue_depth 1.0" in body


def test_prefix_lookups_count_tokens_in_the_pool():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = Request(list(range(10)), SamplingParams(max_tokens=2), block_size=4)
    kv.allocate(a, 10, kv.computed_blocks(a))
    assert (kv.pool.queries, kv.pool.hits) == (10, 0)
    a.num_computed_tokens = 10
    kv.cache_computed_blocks(a)
    b = Request(list(range(9)) + [99], SamplingParams(max_tokens=2), block_size=4)
    assert len(kv.computed_blocks(b)) == 2
    assert (kv.pool.queries, kv.pool.hits) == (20, 8)


def test_kv_tier_figures_become_per_tier_series_and_histograms():
    from pdcluster.kv_transfer.tiers.stats import TierStats
    from pdcluster.messages import TierFigures
    host, disk = TierStats("host", 100, 1000), TierStats("disk", 400, 1036)
    host.add(blocks=7, hits=3, loaded_bytes=3000, stored_bytes=7000)
    host.observe("load_s", 0.0003)
    host.observe("load_s", 0.002)
    disk.add(corrupt=1, evicted=2)
    disk.observe("store_s", 0.02)
    st = replace(status("decode-0", "decode", EngineFigures(num_blocks=10)),
                 tiers=tuple(TierFigures.of(t.as_dict()) for t in (host, disk)))
    st = WorkerStatus.from_bytes(st.to_bytes())                     # as it crosses from the worker
    m = RouterMetrics()
    m.add_worker("decode-0", "decode")
    m.worker_status("decode-0", st)
    s = samples(m)
    h, d = (("tier", "host"), ("worker", "decode-0")), (("tier", "disk"), ("worker", "decode-0"))
    assert s[("pdcluster_kv_tier_blocks", h)] == 7 and s[("pdcluster_kv_tier_capacity_blocks", d)] == 400
    assert s[("pdcluster_kv_tier_hits_blocks_total", h)] == 3 and s[("pdcluster_kv_tier_loaded_bytes_total", h)] == 3000
    assert s[("pdcluster_kv_tier_corrupt_blocks_total", d)] == 1 and s[("pdcluster_kv_tier_evicted_blocks_total", d)] == 2
    assert s[("pdcluster_kv_tier_load_seconds_count", h)] == 2
    assert s[("pdcluster_kv_tier_load_seconds_bucket", (("le", "0.0005"),) + h)] == 1
    assert s[("pdcluster_kv_tier_load_seconds_bucket", (("le", "+Inf"),) + h)] == 2
    assert abs(s[("pdcluster_kv_tier_store_seconds_sum", d)] - 0.02) < 1e-12


def test_peer_pull_figures_become_per_worker_series_and_the_tiers_served_ones():
    from pdcluster.kv_transfer.pull_stats import PullStats
    from pdcluster.kv_transfer.tiers.stats import TierStats
    from pdcluster.messages import PullFigures, TierFigures
    puller, holder, host = PullStats(), PullStats(), TierStats("host", 100, 1000)
    puller.pulled(True, 5, 5000, 0.02)
    puller.pulled(False, 3, 0, 0.3)
    holder.served_pull({"device": 2, "host": 3}, 5000, 0.004)
    holder.serve_failed()
    host.add(served=3, served_bytes=3000)
    host.observe("serve_s", 0.003)
    st = {w: WorkerStatus.from_bytes(replace(status(w, "decode", EngineFigures(num_blocks=10)),
                                             pulls=PullFigures.of(p.as_dict()), tiers=t).to_bytes())
          for w, p, t in (("decode-0", puller, ()), ("decode-1", holder, (TierFigures.of(host.as_dict()),)))}
    assert isinstance(st["decode-0"].pulls, PullFigures)
    m = RouterMetrics()
    for w in st:
        m.add_worker(w, "decode")
        m.worker_status(w, st[w])
    s = samples(m)
    p, h = (("worker", "decode-0"),), (("worker", "decode-1"),)
    assert s[("pdcluster_kv_pulls_total", p)] == 1 and s[("pdcluster_kv_pull_failures_total", p)] == 1
    assert s[("pdcluster_kv_pulled_blocks_total", p)] == 5 and s[("pdcluster_kv_pulled_bytes_total", p)] == 5000
    assert s[("pdcluster_kv_pull_seconds_count", p)] == 2
    assert s[("pdcluster_kv_pull_seconds_bucket", (("le", "0.025"),) + p)] == 1
    assert s[("pdcluster_kv_pulls_served_total", h)] == 1 and s[("pdcluster_kv_pull_serve_failures_total", h)] == 1
    assert s[("pdcluster_kv_pull_served_blocks_total", (("tier", "host"),) + h)] == 3
    assert s[("pdcluster_kv_pull_served_blocks_total", (("tier", "device"),) + h)] == 2
    assert s[("pdcluster_kv_pull_serve_seconds_count", h)] == 1
    ht = (("tier", "host"), ("worker", "decode-1"))
    assert s[("pdcluster_kv_tier_served_blocks_total", ht)] == 3 and s[("pdcluster_kv_tier_serve_seconds_count", ht)] == 1
