"""What the router's prefix index expects while a placement runs (router/lifecycle/place.py, run.py):
the prompt's blocks count on the worker that computes them from the choice on, and a try that
fails, is cancelled or never finishes its prefill takes that back at once (PrefixIndex.unexpect).
Pure Python: the router's own registry, loads, cost model and RequestRun; workers are stand-ins."""
import asyncio

import pytest

from pdcluster.engine.hashing import block_hashes
from pdcluster.engine.sampling_params import SamplingParams
from pdcluster.messages import NoRoom, PrefillResult, Reservation, TokenItem
from pdcluster.router.errors import Unavailable, WorkerLost
from pdcluster.router.lifecycle.place import place
from tests.unit.test_place_wait import Client, router

pytestmark = pytest.mark.timeout(30)


class FullDecode(Client):
    """A decode worker whose reserve answers NoRoom (the message a full KV pool sends)."""
    async def reserve(self, *args, **kw):
        return NoRoom("KV pool full")


class Reserving(Client):
    """A decode worker that reserves (the destination is never used: the prefill worker below fails)."""
    async def reserve(self, *args, **kw):
        return Reservation("127.0.0.1:1", "d", 0, [0], 0)

    async def abort(self, rid):
        pass


class Refusing(Reserving):
    """A decode worker whose reserve raises what is not a lost worker (its pool is smaller than the prompt needs)."""
    async def reserve(self, *args, **kw):
        raise ValueError("prompt + max_tokens needs 129 KV blocks; the pool has 100")


class PrefillSeeing(Client):
    """A prefill worker that notes what the router's index expects while it is called, then fails."""
    def __init__(self, wid, r):
        super().__init__(wid)
        self.r, self.seen = r, None

    async def prefill(self, *args, **kw):
        self.seen = (self.r.index.pending("prefill-0"), self.r.index.pending("decode-0"))
        raise RuntimeError("transfer failed")

    async def abort(self, rid):
        pass


def test_a_remote_placement_expects_its_blocks_on_the_prefill_worker_only_until_it_fails():
    """place() counts the prompt's blocks tentatively on the worker that computes them, from the
    choice on. Before, the decode worker of a remote prefill counted too, though its blocks arrive
    only after the prefill and transfer: a follow-up priced a local prefill there as nearly free and
    recomputed the whole prompt on the decode worker (the cost model's collapse at 1.75x in the
    simulator, bench/RESULTS.md). A try that fails takes its expectation back at once: before, it
    steered same-prefix prompts to a worker that held none of it for expect_ttl_s (30 s)."""
    r = router(wait_s=None, max_attempts=1)         # one try: no local prefill on decode-0 after it
    r.workers.decode["decode-0"] = Reserving("decode-0")
    r.workers.prefill["prefill-0"] = p = PrefillSeeing("prefill-0", r)
    r.workers.loads["decode-0"].free_blocks = 1000      # room as last polled: the choice is remote
    ids = list(range(1, 2049))
    hashes = block_hashes(ids, 16)

    async def go():
        with pytest.raises(Unavailable):                # the prefill failed, and it was the one try
            await place(r, "a", ids, SamplingParams(max_tokens=2), None, set())
    asyncio.run(go())
    assert p.seen[0] >= set(hashes) and not p.seen[1]   # while it prefilled
    assert not r.index.pending("prefill-0") and r.index.match(hashes) == {"prefill-0": 0, "decode-0": 0}


def test_a_placement_refused_by_reserve_or_cancelled_expects_nothing_after():
    r = router(wait_s=None)
    r.workers.decode["decode-0"] = FullDecode("decode-0")
    r.workers.loads["decode-0"].free_blocks = 1000
    ids = list(range(1, 2049))

    async def refused():
        with pytest.raises(Unavailable):                # reserve said NoRoom: decode-0 excluded, none left
            await place(r, "a", ids, SamplingParams(max_tokens=2), None, set())
    asyncio.run(refused())
    assert not r.index.pending("prefill-0") and max(r.index.match(block_hashes(ids, 16)).values()) == 0

    class Stuck(Reserving):
        async def reserve(self, *args, **kw):
            await asyncio.sleep(60)
    r.workers.decode["decode-0"] = Stuck("decode-0")

    async def cancelled():
        task = asyncio.ensure_future(place(r, "b", ids, SamplingParams(max_tokens=2), None, set()))
        await asyncio.sleep(0.05)
        assert r.index.pending("prefill-0")             # expected while the reserve is out
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(cancelled())
    assert not r.index.pending("prefill-0")


def test_a_reserve_that_raises_is_placed_again_on_another_decode_worker():
    """A decode worker refusing the reserve with an error that is not a lost worker (here: its pool
    is smaller than the prompt needs, which its status does not show the policy) is excluded and the
    request goes to another. Before, the error left place() and the request failed (UNAVAILABLE)."""
    r = router(wait_s=None)
    r.workers.loads["decode-0"].free_blocks = 1000
    r.workers.decode["decode-0"] = Refusing("decode-0")
    r.add_worker("decode", Reserving("decode-1"))
    r.workers.loads["decode-1"].num_blocks = r.workers.loads["decode-1"].free_blocks = 1000
    r.workers.loads["decode-1"].prefill_tps = 2_000.0

    class Prefill(Client):
        async def prefill(self, rid, *args, **kw):
            return PrefillResult(7, 0, 0.0, 0, 0.0, 0.0, "none")
    r.workers.prefill["prefill-0"] = Prefill("prefill-0")
    ids = list(range(1, 2049))
    exclude = set()
    tried = []
    orig = r.policy.choose

    def choose(*a, **kw):
        c = orig(*a, **kw)
        tried.append(c.decode)
        return c
    r.policy.choose = choose
    attempt = asyncio.run(place(r, "a", ids, SamplingParams(max_tokens=2), None, exclude))
    assert attempt.decode_worker == "decode-1" and attempt.first_token == 7
    assert "decode-0" in tried and exclude == {"decode-0"}


class LostBeforeFirst(Reserving):
    """A decode worker whose local prefill stream is lost before its first token."""
    def __init__(self, wid):
        super().__init__(wid)
        self.started = asyncio.Event()

    async def stream(self, *args, **kw):
        self.started.set()
        await asyncio.sleep(0.05)
        raise WorkerLost(self.worker_id, "actor died")
        yield                                           # an async generator, as the real client's


def local_router(decode):
    r = router(wait_s=None)
    r.workers.prefill.clear()                          # no prefill pool: every choice is a local prefill
    r.workers.loads.pop("prefill-0")
    r.index.remove_worker("prefill-0")
    r.workers.decode["decode-0"] = decode
    r.workers.loads["decode-0"].free_blocks = 1000
    return r


def test_a_local_prefill_lost_or_cancelled_before_its_first_token_takes_its_expectation_back():
    ids = list(range(1, 2049))
    hashes = block_hashes(ids, 16)
    r = local_router(d := LostBeforeFirst("decode-0"))

    async def lost():
        run = r.generate(ids, SamplingParams(max_tokens=2), "a")
        with pytest.raises(Unavailable):               # lost, migrated, no worker left before any token
            async for _ in run:
                pass
    asyncio.run(lost())
    assert d.started.is_set() and not r.index.pending("decode-0")
    assert r.index.match(hashes)["decode-0"] == 0

    r = local_router(d := LostBeforeFirst("decode-0"))

    async def cancelled():
        task = asyncio.ensure_future(r.generate(ids, SamplingParams(max_tokens=2), "b").__anext__())
        await d.started.wait()
        assert r.index.pending("decode-0") >= set(hashes)     # expected while it prefills
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(cancelled())
    assert not r.index.pending("decode-0")


class AbortedStep(Reserving):
    """A decode worker whose step fails: the engine thread ends the batch with an empty, finished item."""
    async def stream(self, *args, **kw):
        await asyncio.sleep(0.01)
        yield TokenItem([], True, "abort", 0)


def test_a_local_prefill_whose_step_failed_takes_its_expectation_back():
    """The empty item a failed step ends with carries no token: the prompt was not computed. Before, any
    item cleared the expectation, so the blocks stayed counted there for expect_ttl_s."""
    ids = list(range(1, 2049))
    r = local_router(AbortedStep("decode-0"))

    async def go():
        return [ev.finish_reason async for ev in r.generate(ids, SamplingParams(max_tokens=2), "a")]
    assert asyncio.run(go()) == ["abort"]
    assert not r.index.pending("decode-0") and r.index.match(block_hashes(ids, 16))["decode-0"] == 0


class Finishing(Reserving):
    """A decode worker that prefills and finishes the request in one item."""
    async def stream(self, *args, **kw):
        yield TokenItem([5], True, "length", 0)


def test_a_scale_down_migrates_its_requests_without_spending_their_retries():
    """retire() stops a busy worker on purpose: its requests migrate. Before, each such migration counted
    against max_migrations (here 0), so a request on a scaled-down worker failed (UNAVAILABLE)."""
    from pdcluster.router.config import RouterConfig
    from pdcluster.router.lifecycle import Router

    def fleet():
        from types import SimpleNamespace
        tok = SimpleNamespace(decode=lambda ids, **kw: "x" * len(ids))     # what the relay's detokenizer calls
        r = Router(RouterConfig(policy="least-loaded", max_migrations=0, block_size=16), tok, (2,), 4096)
        r.add_worker("decode", LostBeforeFirst("decode-0"))
        r.add_worker("decode", Finishing("decode-1"))
        for w in r.workers.loads.values():
            w.num_blocks = w.free_blocks = 1000
        r.workers.loads["decode-1"].in_flight = 1           # least-loaded: decode-0 first
        return r

    async def go(r):
        return [ev.finish_reason async for ev in r.generate(list(range(1, 40)), SamplingParams(max_tokens=1), "a")]
    r = fleet()
    r.workers.retiring.add("decode-0")                      # being scaled down
    assert asyncio.run(go(r)) == ["length"]                 # migrated to decode-1, served
    r = fleet()                                             # the control: lost, not scaled down
    with pytest.raises(Unavailable, match="every retry spent"):
        asyncio.run(go(r))


def test_a_remote_prefill_charges_its_worker_only_the_tokens_it_computes():
    """A remote placement charged the prefill worker the whole prompt, its cached prefix too (a local one
    charged the uncached tokens): with two 4,000-token prompts in flight on the holder of their prefix, its
    queue read 8,000 tokens for 32 of work, and the next same-prefix prompt went to the other worker, which
    recomputed the whole prefix."""
    from pdcluster.router.config import RouterConfig
    from pdcluster.router.cost_config import CostConfig
    from pdcluster.router.lifecycle import Router
    from tests.unit.lifecycle_standins import D, P, Tok

    class Slow(P):
        def __init__(self, wid):
            super().__init__(wid)
            self.go = asyncio.Event()

        async def prefill(self, rid, ids, params, dest, salt, outputs=()):
            await self.go.wait()
            return PrefillResult(self.first, 0, 0.0, 0, 0.0, 0.0, "none")

    async def go():
        r = Router(RouterConfig(policy="cost-model", status_interval_s=0.01, max_queue_wait_s=None, block_size=16),
                   Tok(), (2,), 65536, cost_config=CostConfig(block_size=16, tpot_slo_s=None, allow_local=False))
        p0, p1 = Slow("p0"), Slow("p1")
        for w, role in ((p0, "prefill"), (p1, "prefill"), (D("d0"), "decode")):
            r.add_worker(role, w)
        for w in r.workers.loads.values():
            w.num_blocks, w.free_blocks, w.prefill_tps = 100000, 100000, 2000.0
        ids = list(range(1, 4001))                  # 250 blocks, all on p0
        hashes = block_hashes(ids, 16, None)
        r.index.apply("p0", "stored", hashes, seq=1, now=0.0)
        for w, seq in (("p0", 1), ("p1", 0), ("d0", 0)):
            r.index.heartbeat(w, seq=seq)
        tasks, seen = [], []
        for k in range(3):
            tasks.append(asyncio.ensure_future(place(r, f"r{k}", ids, SamplingParams(max_tokens=2), None, set(),
                                                     fresh=True)))
            await asyncio.sleep(0.01)
            ch = r.policy.choose(len(ids), r.workers.loads_of("prefill"), r.workers.loads_of("decode"), hashes=hashes)
            seen.append((r.workers.loads["p0"].queued_tokens, ch.prefill))
        p0.go.set()
        p1.go.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        return seen
    seen = asyncio.run(go())
    assert seen == [(16, "p0"), (32, "p0"), (48, "p0")], seen      # the last block's tokens each (its first token)
