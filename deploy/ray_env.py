"""The runtime_env every pdcluster Ray job gets (the driver's own and joined clusters alike).

Workers find the repository root on their sys.path (Ray adds the driver's cwd); importing
`pdcluster`, which every actor's module does first, takes it off again (pdcluster/__init__.py).
"""
from __future__ import annotations

import os


def runtime_env() -> dict:
    """runtime_env for ray.init: the environment every worker needs to load the model offline."""
    return {"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
                         "TOKENIZERS_PARALLELISM": "false"}}
