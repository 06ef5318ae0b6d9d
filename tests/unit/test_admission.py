"""router/admission.py: the expected wait before a prefill starts, and the limit it is held to."""
from pdcluster.router.admission import admission_limit, expected_wait_s
from pdcluster.router.placement import WorkerLoad

RATES = {"p0": 1000.0, "p1": 4000.0, "d0": 500.0}


def rate(w: WorkerLoad) -> float:
    return RATES[w.worker_id]


def test_the_least_backlogged_candidate_sets_the_wait():
    p0 = WorkerLoad("p0", "prefill", queued_tokens=3000)              # 3 s
    p1 = WorkerLoad("p1", "prefill", queued_tokens=1000, waiting_tokens=8000)   # reported 8000: 2 s
    assert expected_wait_s([p0, p1], rate) == 2.0
    d0 = WorkerLoad("d0", "decode", queued_tokens=500)                 # local prefill: 1 s
    assert expected_wait_s([p0, p1, d0], rate) == 1.0
    p1.healthy = False                                                 # not placeable: not a candidate
    assert expected_wait_s([p0, p1], rate) == 3.0
    assert expected_wait_s([], rate) is None and expected_wait_s([p1], rate) is None
    assert expected_wait_s([WorkerLoad("p0", "prefill")], rate) == 0.0   # idle: no wait


def test_the_tighter_limit_wins_and_says_which():
    assert admission_limit(30.0, None) == (30.0, "--max-queue-wait")
    assert admission_limit(30.0, 2.5) == (2.5, "the request's deadline")
    assert admission_limit(None, 40.0) == (40.0, "the request's deadline")
    assert admission_limit(None, None) is None
