"""Placement: which (prefill, decode) pair serves a request. Pure Python.

One policy per module, each answering `choose(...) -> Placement | None` (base.py); `make_policy`,
`POLICY_NAMES` and `DEFAULT_POLICY` (registry.py) pick one by name. `WorkerLoad` (load.py) is what
every policy reads of a worker.
"""
from pdcluster.router.placement.base import Placement, Policy
from pdcluster.router.placement.load import WorkerLoad
from pdcluster.router.placement.registry import DEFAULT_POLICY, POLICY_NAMES, make_policy

__all__ = ["DEFAULT_POLICY", "POLICY_NAMES", "Placement", "Policy", "WorkerLoad", "make_policy"]
