"""Errors the router's request lifecycle handles (kept free of Ray so lifecycle stays pure)."""


class WorkerLost(Exception):
    """The worker died, is restarting, or did not answer in time."""

    def __init__(self, worker_id: str, why: str):
        super().__init__(f"worker {worker_id} lost: {why}")
        self.worker_id = worker_id
