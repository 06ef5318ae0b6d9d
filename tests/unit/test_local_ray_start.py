"""deploy/launch.py init_local_ray: a local Ray head that times out at startup (ray-project/ray#62883) is started
afresh once; any other failure, or a second timeout, is raised."""
import pytest
import ray

from pdcluster.deploy import launch

TIMEOUT = Exception("The current node timed out during startup. This could happen because some of the raylet "
                    "failed to startup or the GCS has become overloaded.")


@pytest.fixture
def calls(monkeypatch):
    """ray.init / ray.shutdown recorded; ray.init raises the queued outcomes in turn (None: it starts)."""
    seen = {"init": [], "shutdown": 0, "outcomes": []}

    def init(**kw):
        seen["init"].append(kw)
        out = seen["outcomes"].pop(0)
        if out is not None:
            raise out
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: seen.__setitem__("shutdown", seen["shutdown"] + 1))
    return seen


def test_a_startup_timeout_is_retried_once_with_the_same_arguments(calls, caplog):
    calls["outcomes"] = [TIMEOUT, None]
    launch.init_local_ray(1, 1, 2)
    assert len(calls["init"]) == 2 and calls["init"][0] == calls["init"][1]
    assert calls["init"][0]["resources"] == {"prefill_pool": 1, "decode_pool": 2} and calls["init"][0]["num_cpus"] == 4
    assert calls["shutdown"] == 1 and any("starting a fresh one" in r.getMessage() for r in caplog.records)


def test_a_second_timeout_is_raised(calls):
    calls["outcomes"] = [TIMEOUT, TIMEOUT]
    with pytest.raises(Exception, match="timed out during startup"):
        launch.init_local_ray(1, 1, 1)
    assert len(calls["init"]) == launch.RAY_START_TRIES == 2


def test_other_failures_are_not_retried(calls):
    calls["outcomes"] = [ValueError("bad resources"), None]
    with pytest.raises(ValueError, match="bad resources"):
        launch.init_local_ray(1, 1, 1)
    assert len(calls["init"]) == 1 and calls["shutdown"] == 0
