"""How a worker actor is placed and sized: one device per actor, pools by custom Ray resource."""
from __future__ import annotations

POOL_RESOURCE = {"prefill": "prefill_pool", "decode": "decode_pool"}


def actor_options(role: str, name: str, num_cpus: int, use_gpu: bool, max_restarts: int = 0) -> dict:
    """Ray .options(): a GPU per actor on GPU nodes; on CPU hosts a fixed core share (and the worker
    sets torch.set_num_threads to the same number) so two actors on one host act like two devices."""
    res = {POOL_RESOURCE[role]: 1}
    # Anonymous actors (the router holds the handles), so several clusters can share one Ray instance.
    # A restarted actor is a fresh process (model reloaded, empty KV); calls in flight when it died
    # fail (max_task_retries=0) and the router re-places or migrates them.
    opts = dict(num_cpus=num_cpus, resources=res, max_concurrency=1024, max_restarts=max_restarts,
                max_task_retries=0)
    if use_gpu:
        opts["num_gpus"] = 1
    return opts


def leave_terminal_group() -> None:
    """Called in each worker actor's process: move it out of the terminal's foreground process
    group, so the Ctrl-C meant for `pdcluster serve` does not kill the workers under the drain
    (`serve` stops them itself, after the streams have ended). Ray's own daemons block SIGINT."""
    import os
    try:
        os.setpgid(0, 0)
    except OSError:     # already a group leader, or not permitted: nothing to move
        pass
