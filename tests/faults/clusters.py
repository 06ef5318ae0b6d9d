"""Shared pieces of the fault tests: a cluster per test module and the offline greedy reference."""
import asyncio
from contextlib import contextmanager

from pdcluster.deploy.launch import Cluster, ClusterConfig
from pdcluster.engine import LLM, SamplingParams


@contextmanager
def running_cluster(**cfg):
    """A started Cluster (router + Ray actors) on its own event loop; drive it with c.run(coro)."""
    loop = asyncio.new_event_loop()
    cfg.setdefault("policy", "least-loaded")   # every prompt prefills remotely: the faults hit that path
    c = loop.run_until_complete(Cluster(ClusterConfig(port=0, **cfg)).start())
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
