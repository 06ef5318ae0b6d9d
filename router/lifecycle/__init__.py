"""The router's request side: admission (router.py), one request's steps (run.py), placing one
attempt (place.py), a request's n choices (choices.py), the per-request log line (log.py)."""
from pdcluster.router.errors import Overloaded, Unavailable
from pdcluster.router.lifecycle.router import Router
from pdcluster.router.lifecycle.run import Event

__all__ = ["Event", "Overloaded", "Router", "Unavailable"]
