"""Shared pieces of the fault tests: clusters (on one Ray instance for the whole session; one
cluster may serve several modules, SharedCluster) and the offline greedy reference."""
import asyncio
import functools
from contextlib import contextmanager

from pdcluster.deploy.config import ClusterConfig
from pdcluster.deploy.flags import dotted, override
from pdcluster.deploy.launch import Cluster, init_local_ray
from pdcluster.engine import LLM, SamplingParams

# the short names the fault tests size their clusters with -> paths in the config tree
SHORT = {"prefill_workers": "pools__prefill__initial_replicas", "decode_workers": "pools__decode__initial_replicas",
         "kv_cache_memory": "engine__cache__kv_cache_memory", "max_model_len": "engine__max_model_len",
         "max_num_batched_tokens": "engine__sched__max_num_batched_tokens", "remote_prefill": "router__remote_prefill",
         "policy": "router__policy", "max_restarts": "pools__max_restarts",
         "worker_timeout_s": "timeouts__stream_gap_s",
         "health_timeout_s": "timeouts__health_s", "prefill_timeout_s": "timeouts__prefill_s",
         "slow_reader_timeout_s": "server__slow_reader_timeout_s", "http_port": "server__http_port"}


# Room for the largest fault cluster (1 prefill + 2 decode workers) and one more worker, 1 thread
# each. Started once: a Cluster finding Ray up uses it and leaves it up (tests/faults/conftest.py
# shuts it down at the session's end); each module's cluster still has its own actors and router.
SESSION_RAY = dict(threads_per_worker=1, n_prefill=2, n_decode=3)


@functools.cache
def session_ray() -> None:
    init_local_ray(**SESSION_RAY)


@contextmanager
def running_cluster(**cfg):
    """A started Cluster (router + Ray actors) on its own event loop; drive it with c.run(coro).
    Keywords: SHORT's names or tree paths with "__" (kv__transport="grpc")."""
    session_ray()
    loop = asyncio.new_event_loop()
    cfg.setdefault("policy", "least-loaded")   # every prompt prefills remotely: the faults hit that path
    ports = {"server__port": 0, "server__metrics_port": 0, "server__http_port": 0}   # HTTP off unless given
    tree = override(ClusterConfig(), dotted(**ports | {SHORT.get(k, k): v for k, v in cfg.items()}))
    c = loop.run_until_complete(Cluster(tree).start())
    c.run = loop.run_until_complete
    try:
        yield c
    finally:
        loop.run_until_complete(c.stop())
        loop.close()


class SharedCluster:
    """One running cluster for the modules whose tests agree on its configuration: started on first
    use, stopped at the session's end (tests/faults/conftest.py). A module that leaves it damaged
    (workers killed for good) hands it back with spend(): the next user gets a fresh one, whatever
    the order the modules run in."""

    def __init__(self, **cfg):
        self.cfg, self._cm, self.c = cfg, None, None

    def get(self):
        if self.c is None:
            self._cm = running_cluster(**self.cfg)
            self.c = self._cm.__enter__()
        return self.c

    def spend(self) -> None:
        cm, self._cm, self.c = self._cm, None, None
        if cm is not None:
            cm.__exit__(None, None, None)


# 1 prefill + 2 decode workers for tests/faults/test_restart_hang.py and test_worker_faults.py: tight
# bounds so a hang is seen within seconds (status poll 1 s, stream gap 3 s, a remote prefill 15 s, a
# stalled write 2 s); Ray restarts a crashed worker once; 64-token engine steps, so a prefill worker
# holding 16 prompts can be stopped after its first step with most still queued; no admission by
# expected wait (the rate a loaded host teaches the router put 16 prompts past the 30 s default).
ONE_PREFILL_TWO_DECODE = dict(prefill_workers=1, decode_workers=2, kv_cache_memory=96 * 2**20, max_restarts=1,
                              worker_timeout_s=3.0, health_timeout_s=1.0, prefill_timeout_s=15.0,
                              slow_reader_timeout_s=2.0, max_num_batched_tokens=64,
                              router__max_queue_wait_s=None)


@functools.cache
def offline_llm() -> LLM:
    """One offline engine for the session's references (loading the model is the cost; each
    reference is computed afresh)."""
    return LLM(kv_cache_memory=64 * 2**20)


def greedy_reference(prompts: list[str], max_new: int) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt token ids, greedy output tokens) from the offline engine: what every stream must equal."""
    llm = offline_llm()
    ids = [llm.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    outs = llm.generate(ids, SamplingParams(max_tokens=max_new, temperature=0))
    return ids, [o.token_ids for o in outs]
