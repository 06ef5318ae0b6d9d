"""router/lifecycle/run.py on failure paths, stand-in workers under the real Router: a placement policy that
raises while a migration places the request again, and a client that leaves while a stop string's abort is
out. Nothing leaks (tests/unit/lifecycle_standins.py `leaks`)."""
import asyncio

import pytest

from tests.unit.lifecycle_standins import D, P, collect, leaks, make_router, params

pytestmark = pytest.mark.timeout(30)
IDS = list(range(10, 74))


def test_a_policy_that_raises_while_placing_a_migration_ends_the_stream_as_an_abort():
    """After tokens went out, generate's failures end the stream with finish_reason "abort" (API.md ABORT);
    a policy's own exception while placing the migration escaped instead: gRPC answered INTERNAL with no
    last message and no usage."""
    async def go():
        lost, spare = D("d0", tokens=range(5, 15), stream_mode="lost_after:3"), D("d1")
        r = make_router([lost, spare], [P("p0")])
        choose, calls = r.policy.choose, []

        def flaky(*a, **k):
            calls.append(1)
            if len(calls) > 1:
                raise ZeroDivisionError("a policy bug")
            return choose(*a, **k)
        r.policy.choose = flaky
        evs = await collect(r.generate(IDS, params(), "b"))
        await asyncio.sleep(0.05)
        return r, evs, lost
    r, evs, lost = asyncio.run(go())
    assert [e.token_ids for e in evs[:-1]] == [[4], [5], [6], [7]]       # the first token, then 3 before the loss
    assert evs[-1].finish_reason == "abort" and evs[-1].usage["completion_tokens"] == 4
    assert lost.aborts == ["b"] and not leaks(r)


def test_a_client_leaving_while_a_stop_strings_abort_is_out_sends_no_second_abort():
    class SlowAbort(D):
        async def abort(self, rid):
            self.aborts.append(rid)
            await asyncio.sleep(0.2)

    async def go():
        d, p = SlowAbort("d0", tokens=[5, 6, 7, 8, 9, 10, 11, 12]), P("p0")
        r = make_router([d], [p])
        t = asyncio.ensure_future(collect(r.generate(IDS, params(stop=("gh",)), "a")))   # tokens 6, 7 read "gh"
        await asyncio.sleep(0.05)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        await asyncio.sleep(0.3)
        return r, d, p
    r, d, p = asyncio.run(go())
    assert d.aborts == ["a"] and p.aborts == [] and not leaks(r)
