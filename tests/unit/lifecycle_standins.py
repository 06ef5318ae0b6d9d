"""Stand-in worker clients (no Ray) under the real Router, for the request lifecycle's failure paths:
a decode worker whose stream can be lost after k tokens, a prefill worker that answers at once."""
from pdcluster.engine.sampling_params import SamplingParams
from pdcluster.messages import PrefillResult, Reservation, TokenItem
from pdcluster.router.config import RouterConfig
from pdcluster.router.errors import WorkerLost
from pdcluster.router.lifecycle import Router


class Tok:
    def decode(self, ids, **kw):
        return "".join(chr(97 + (i % 26)) for i in ids)


class W:
    def __init__(self, wid):
        self.worker_id = wid
        self.aborts = []

    async def abort(self, rid):
        self.aborts.append(rid)

    async def status(self, drain_events=False):
        raise RuntimeError("no status in these tests")


class D(W):
    """A decode worker: reserves at once; its stream sends `tokens` one an item (the last with "length"),
    or, stream_mode "lost_after:k", is lost before the k-th."""
    def __init__(self, wid, tokens=(5, 6, 7, 8), stream_mode="ok"):
        super().__init__(wid)
        self.tokens, self.stream_mode = list(tokens), stream_mode

    async def reserve(self, rid, ids, params, salt, outputs=()):
        return Reservation("127.0.0.1:1", self.worker_id, 0, [0], 0)

    async def stream(self, rid, first, ids=None, params=None, salt=None, outputs=(), pull=None, holder=None):
        lost = int(self.stream_mode.split(":")[1]) if self.stream_mode.startswith("lost_after:") else None
        for i, t in enumerate(self.tokens):
            if i == lost:
                raise WorkerLost(self.worker_id, "stand-in lost")
            last = i == len(self.tokens) - 1
            yield TokenItem([t], last, "length" if last else None, 0)


class P(W):
    """A prefill worker whose first token is `first`."""
    def __init__(self, wid, first=4):
        super().__init__(wid)
        self.first = first

    async def prefill(self, rid, ids, params, dest, salt, outputs=()):
        return PrefillResult(self.first, 0, 0.0, 0, 0.0, 0.0, "none")


def make_router(decodes, prefills, policy="least-loaded", **cfg):
    r = Router(RouterConfig(**dict(policy=policy, status_interval_s=0.01, max_queue_wait_s=None, block_size=16) | cfg),
               Tok(), (2,), 4096)
    for p in prefills:
        r.add_worker("prefill", p)
    for d in decodes:
        r.add_worker("decode", d)
    for w in r.workers.loads.values():
        w.num_blocks, w.free_blocks = 1000, 1000
    return r


def leaks(r) -> dict:
    """What the router still charges once every request ended: worker loads, in-flight ids, gauges (its
    prefix-index claims are left out: a prefill that ran keeps its claim until events or TTL)."""
    out = {wid: (w.in_flight, w.queued_tokens, w.serving_s) for wid, w in r.workers.loads.items()
           if w.in_flight or w.queued_tokens or w.serving_s}
    if r.in_flight:
        out["router.in_flight"] = set(r.in_flight)
    gauges = dict(queue_depth=r.metrics.queue_depth._value.get(), running=r.metrics.running._value.get())
    if any(gauges.values()):
        out["gauges"] = gauges
    return out


async def collect(agen) -> list:
    return [ev async for ev in agen]


def params(**kw):
    return SamplingParams(**{"max_tokens": 16} | kw)
