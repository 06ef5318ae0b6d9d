"""Errors of the router's request lifecycle (kept free of Ray so lifecycle stays pure)."""


class WorkerLost(Exception):
    """The worker died, is restarting, or did not answer in time."""

    def __init__(self, worker_id: str, why: str):
        super().__init__(f"worker {worker_id} lost: {why}")
        self.worker_id = worker_id


class WorkerGone(WorkerLost):
    """The worker is dead for good (its actor's restarts are spent or it was killed without restart):
    it will never answer again, so its pool slot is free for a replacement."""


class Unavailable(Exception):
    """No worker can take the request (maps to UNAVAILABLE)."""


class Overloaded(Exception):
    """The admission queue is full (maps to RESOURCE_EXHAUSTED)."""
