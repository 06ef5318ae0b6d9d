"""Stand-in worker clients (no Ray) under the real Router, for the request lifecycle's failure paths:
a decode worker whose stream can hang or be lost after k tokens, a prefill worker that answers at once."""
import asyncio

from pdcluster.engine.sampling_params import SamplingParams
from pdcluster.messages import NoRoom, PrefillResult, Reservation, TokenItem
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
        self.calls = []

    async def abort(self, rid):
        self.aborts.append(rid)

    async def status(self, drain_events=False):
        raise RuntimeError("no status in these tests")


class D(W):
    """decode: reserve_mode: ok|hang|lost|noroom; tokens: what its stream sends; stream_mode: ok|hang|lost_after:k"""
    def __init__(self, wid, tokens=(5, 6, 7, 8), stream_mode="ok", reserve_mode="ok", item_delay=0.0,
                 finish="length"):
        super().__init__(wid)
        self.tokens, self.stream_mode, self.reserve_mode, self.item_delay, self.finish = (
            list(tokens), stream_mode, reserve_mode, item_delay, finish)
        self.open_streams = 0

    async def reserve(self, rid, ids, params, salt, outputs=()):
        self.calls.append(("reserve", rid))
        if self.reserve_mode == "hang":
            await asyncio.sleep(3600)
        if self.reserve_mode == "lost":
            raise WorkerLost(self.worker_id, "stand-in")
        if self.reserve_mode == "noroom":
            return NoRoom("full")
        return Reservation("127.0.0.1:1", self.worker_id, 0, [0], 0)

    async def stream(self, rid, first, ids=None, params=None, salt=None, outputs=(), pull=None, holder=None):
        self.calls.append(("stream", rid, first))
        self.open_streams += 1
        try:
            if self.stream_mode == "hang":
                await asyncio.sleep(3600)
            n = len(self.tokens)
            for i, t in enumerate(self.tokens):
                if self.stream_mode.startswith("lost_after:") and i == int(self.stream_mode.split(":")[1]):
                    raise WorkerLost(self.worker_id, "stand-in lost")
                if self.item_delay:
                    await asyncio.sleep(self.item_delay)
                last = i == n - 1
                yield TokenItem([t], last, self.finish if last else None, 0)
        finally:
            self.open_streams -= 1


class P(W):
    def __init__(self, wid, mode="ok", first=4, delay=0.0):
        super().__init__(wid)
        self.mode, self.first, self.delay = mode, first, delay

    async def prefill(self, rid, ids, params, dest, salt, outputs=()):
        self.calls.append(("prefill", rid))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.mode == "hang":
            await asyncio.sleep(3600)
        if self.mode == "lost":
            raise WorkerLost(self.worker_id, "stand-in")
        return PrefillResult(self.first, 0, 0.0, 0, 0.0, 0.0, "none")


def make_router(decodes, prefills, policy="least-loaded", **cfg):
    kw = dict(policy=policy, status_interval_s=0.01, max_queue_wait_s=None, block_size=16)
    kw.update(cfg)
    r = Router(RouterConfig(**kw), Tok(), (2,), 4096)
    for p in prefills:
        r.add_worker("prefill", p)
    for d in decodes:
        r.add_worker("decode", d)
    for w in r.workers.loads.values():
        w.num_blocks, w.free_blocks = 1000, 1000
    return r


def gauges(r):
    m = r.metrics
    return dict(queue_depth=m.queue_depth._value.get(), running=m.running._value.get())


def leaks(r) -> dict:
    """What the router still charges once every request ended: worker loads, in-flight ids, gauges."""
    out = {}
    for wid, w in r.workers.loads.items():
        if w.in_flight or w.queued_tokens or w.serving_s:
            out[wid] = (w.in_flight, w.queued_tokens, w.serving_s)
    if r.in_flight:
        out["router.in_flight"] = set(r.in_flight)
    g = gauges(r)
    if any(g.values()):
        out["gauges"] = g
    return out              # (prefix-index claims are left out: a prefill that ran keeps its claim until events or TTL)


async def collect(agen, n=None):
    evs = []
    async for ev in agen:
        evs.append(ev)
        if n is not None and len(evs) >= n:
            break
    return evs


def params(**kw):
    kw.setdefault("max_tokens", 16)
    return SamplingParams(**kw)
