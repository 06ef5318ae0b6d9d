"""The runtime_env every pdcluster Ray job gets (the driver's own and joined clusters alike).

Workers find the repository root on their sys.path (Ray adds the driver's cwd); importing
`pdcluster`, which every actor's module does first, takes it off again (pdcluster/__init__.py).
"""
from __future__ import annotations

import contextlib
import os

# Ray reads this at import (ray_constants.ENABLE_RAY_CLUSTER): when false, a node's address is
# 127.0.0.1 and every Ray process (GCS, raylet, agents, workers, metrics ports) binds loopback only.
# It is Ray's documented single-host mode (its default on macOS and Windows).
_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def runtime_env() -> dict:
    """runtime_env for ray.init: the environment every worker needs to load the model offline."""
    return {"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
                         "TOKENIZERS_PARALLELISM": "false"}}


@contextlib.contextmanager
def loopback_only():
    """Around `ray.init(address="local", **kw)`: the Ray instance it starts listens on 127.0.0.1 alone.

    Yields extra ray.init kwargs.  Never for joining a cluster: a node on loopback cannot be
    reached by others.  Ray's processes spawned inside inherit the variable; afterwards the
    driver's environment and Ray's constant (read at import, so set directly too) are restored,
    so a later `ray.init(address=...)` in this process behaves as before.
    """
    from ray._private import ray_constants     # the copy services.get_node_ip_address consults
    old_env, old_const = os.environ.get(_LOCAL_ONLY_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_LOCAL_ONLY_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield {"_node_ip_address": "127.0.0.1"}
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old_const
        if old_env is None:
            os.environ.pop(_LOCAL_ONLY_ENV, None)
        else:
            os.environ[_LOCAL_ONLY_ENV] = old_env
