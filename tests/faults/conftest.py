"""The fault modules' clusters share one Ray instance (tests/faults/clusters.py session_ray);
it goes down with the session."""
import pytest


@pytest.fixture(scope="session", autouse=True)
def _ray_down_at_the_end():
    yield
    import ray
    if ray.is_initialized():
        ray.shutdown()
