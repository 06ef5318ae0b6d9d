"""Shared pieces of the fault tests: a cluster per test module and the offline greedy reference."""
import asyncio
from contextlib import contextmanager

from pdcluster.deploy.config import ClusterConfig
from pdcluster.deploy.flags import dotted, override
from pdcluster.deploy.launch import Cluster
from pdcluster.engine import LLM, SamplingParams

# the short names the fault tests size their clusters with -> paths in the config tree
SHORT = {"prefill_workers": "pools__prefill__initial_replicas", "decode_workers": "pools__decode__initial_replicas",
         "kv_cache_memory": "engine__cache__kv_cache_memory", "max_model_len": "engine__max_model_len",
         "max_num_batched_tokens": "engine__sched__max_num_batched_tokens", "remote_prefill": "router__remote_prefill",
         "policy": "router__policy", "max_restarts": "pools__max_restarts",
         "worker_timeout_s": "timeouts__stream_gap_s",
         "health_timeout_s": "timeouts__health_s", "prefill_timeout_s": "timeouts__prefill_s",
         "slow_reader_timeout_s": "server__slow_reader_timeout_s"}


@contextmanager
def running_cluster(**cfg):
    """A started Cluster (router + Ray actors) on its own event loop; drive it with c.run(coro).
    Keywords: SHORT's names or tree paths with "__" (kv__transport="grpc")."""
    loop = asyncio.new_event_loop()
    cfg.setdefault("policy", "least-loaded")   # every prompt prefills remotely: the faults hit that path
    tree = override(ClusterConfig(), dotted(server__port=0, server__metrics_port=0, server__http_port=0,
                                            **{SHORT.get(k, k): v for k, v in cfg.items()}))
    c = loop.run_until_complete(Cluster(tree).start())
    c.run = loop.run_until_complete
    try:
        yield c
    finally:
        loop.run_until_complete(c.stop())
        loop.close()


def greedy_reference(prompts: list[str], max_new: int) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt token ids, greedy output tokens) from the offline engine: what every stream must equal."""
    llm = LLM(kv_cache_memory=64 * 2**20)
    ids = [llm.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    outs = llm.generate(ids, SamplingParams(max_tokens=max_new, temperature=0))
    return ids, [o.token_ids for o in outs]
