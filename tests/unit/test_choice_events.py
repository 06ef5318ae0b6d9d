"""router/lifecycle/choices.py choice_events: how n choices' streams merge when one fails."""
import asyncio

import pytest

from pdcluster.engine.sampling_params import SamplingParams
from pdcluster.router.errors import Unavailable
from pdcluster.router.lifecycle.choices import Choice, choice_events
from pdcluster.router.lifecycle.run import Event


class TwoChoices:
    """Router.generate's shape: choice "-0" streams two tokens; choice "-1" fails before its first
    event, `late` deciding whether that is after "-0"'s first token went out."""

    def __init__(self, late: bool):
        self.late = late

    async def generate(self, prompt_ids, params, request_id, cache_salt=None, deadline_s=None):
        if request_id.endswith("-1"):
            await asyncio.sleep(0.05 if self.late else 0)
            raise Unavailable("no worker could take it")
        await asyncio.sleep(0.01)
        yield Event([5], "a")
        await asyncio.sleep(0.1)
        yield Event([6], "b", "length", {"prompt_tokens": 2, "completion_tokens": 2, "cached_prompt_tokens": 0})


def run(router):
    choices = [Choice(f"r-{j}", [1, 2], SamplingParams(max_tokens=2)) for j in range(2)]

    async def go():
        return [(k, ev.finish_reason) async for k, ev in choice_events(router, choices, None)]
    return asyncio.run(go())


def test_a_choice_failing_after_others_streamed_ends_alone_with_abort():
    assert run(TwoChoices(late=True)) == [(0, None), (1, "abort"), (0, "length")]


def test_a_choice_failing_before_anything_went_out_fails_the_call():
    with pytest.raises(Unavailable):
        run(TwoChoices(late=False))


class Placing:
    """Router.generate's shape: each choice's placement runs synchronously (logged "place") before its
    first wait, as the real one's hashing, policy and worker call do."""

    def __init__(self, log):
        self.log = log

    async def generate(self, prompt_ids, params, request_id, cache_salt=None, deadline_s=None):
        self.log.append("place")
        await asyncio.sleep(0.01)
        yield Event([6], "b", "length", {"prompt_tokens": 2, "completion_tokens": 1, "cached_prompt_tokens": 0})


def test_many_choices_are_placed_one_per_loop_iteration():
    """64 prompts x n=16 started their 1,024 placements in one loop iteration (~1 s with no other client's
    I/O served, review estimate); a ticker task now runs between any two of them."""
    log = []
    choices = [Choice(f"r-{j}", [1, 2], SamplingParams(max_tokens=1)) for j in range(200)]

    async def go():
        async def tick():
            while True:
                log.append("tick")
                await asyncio.sleep(0)
        ticker = asyncio.ensure_future(tick())
        await asyncio.sleep(0)
        out = [k async for k, ev in choice_events(Placing(log), choices, None)]
        ticker.cancel()
        return out
    assert sorted(asyncio.run(go())) == list(range(200))
    runs = "".join("p" if x == "place" else "t" for x in log).split("t")
    assert log.count("place") == 200 and max(len(r) for r in runs) == 1
