"""The fault modules' clusters share one Ray instance (tests/faults/clusters.py session_ray);
it goes down with the session. So do the clusters and worker pairs that several modules share."""
import pytest

from tests.faults.clusters import ONE_PREFILL_TWO_DECODE, SharedCluster
from tests.procs import free_port


@pytest.fixture(scope="session", autouse=True)
def _ray_down_at_the_end():
    yield
    import ray
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session")
def one_prefill_two_decode():
    """The SharedCluster of test_restart_hang.py and test_worker_faults.py (clusters.ONE_PREFILL_TWO_DECODE,
    with an HTTP port): .get() the cluster; .spend() after killing workers for good."""
    shared = SharedCluster(**ONE_PREFILL_TWO_DECODE, http_port=free_port())
    yield shared
    shared.spend()


@pytest.fixture(scope="session")
def tcp_pair():
    """A real prefill + decode worker pair over TCP (no Ray; tests/unit/kv_workers.py) for
    test_kv_compression.py and test_transfer_corruption.py; a module that changes a worker's
    settings puts them back."""
    from tests.unit.kv_workers import pair
    p, d = pair("tcp", transfer_timeout_s=10)
    yield p, d
    p.close()
    d.close()
