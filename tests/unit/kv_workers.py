"""Real PrefillWorker / DecodeWorker pairs (no Ray, the embedded model) for the KV transfer tests:
build a pair for a transport, run one remote prefill through it and collect the decoded tokens."""
from __future__ import annotations

from pdcluster.decode_worker.worker import DecodeWorker
from pdcluster.engine.llm_engine import LLMEngine, build_config
from pdcluster.engine.sampling_params import SamplingParams
from pdcluster.prefill_worker.worker import PrefillWorker

GREEDY = SamplingParams(max_tokens=12, temperature=0)


def engine(kv_cache_memory: int = 48 * 2**20) -> LLMEngine:
    return LLMEngine(build_config(kv_cache_memory=kv_cache_memory, num_threads=1))


def pair(transport: str = "tcp", transfer_timeout_s: float = 20, **kw) -> tuple[PrefillWorker, DecodeWorker]:
    """(prefill, decode) workers of one transport; kw (e.g. secret) goes to both. The decode worker
    builds its engine on its engine thread (as a worker actor does), the prefill worker is handed one."""
    d = DecodeWorker(f"d-{transport}", engine, kv_transport=transport, **kw)
    p = PrefillWorker(f"p-{transport}", engine(), transport=transport, transfer_timeout_s=transfer_timeout_s, **kw)
    return p, d


def tokens(stream, timeout: float = 30) -> list[int]:
    """Every token of a TokenStream until it finishes."""
    toks = []
    while True:
        item = stream.get(timeout=timeout)
        toks += item.token_ids
        if item.finished:
            return toks


def remote(p: PrefillWorker, d: DecodeWorker, rid: str, ids: list[int], params: SamplingParams = GREEDY,
           salt: str | None = None, address: str | None = None, fresh: bool = False):
    """Prefill on p, KV to d (at `address` instead of d's own, e.g. a proxy), decode on d:
    (tokens, the PrefillResult). fresh: d must hold none of the prompt (every block crosses)."""
    r = d.reserve(rid, ids, params, cache_salt=salt)
    assert not fresh or r.skip_blocks == 0, r
    res = p.prefill(rid, ids, params, r.destination(address), cache_salt=salt)
    return [res.first_token] + tokens(d.start(rid, res.first_token)), res
