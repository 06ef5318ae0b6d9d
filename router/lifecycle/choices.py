"""A request's n choices, for both APIs: one Router.generate per choice, their Events merged.

The choices start at once; their Events are yielded as they come. A prompt's choices share its
prefill: the first one's placement marks the prompt's blocks as expected on its workers (place.py)
before the others are placed, so a cache-aware policy sends them there, where the scheduler holds
a prompt whose next block another request is computing until that block is cached, then hits it.

Seeds: a seeded request's choice j draws with seed + j, so its choices differ and each is
reproducible.
"""
from __future__ import annotations

import asyncio
from contextlib import aclosing
from dataclasses import dataclass, replace

from pdcluster.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class Choice:
    """One sequence to generate: its request id at the router, prompt and sampling parameters."""
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """The n choices' parameters: choice j's seed is seed + j (mod 2^64)."""
    return [params if params.seed is None else replace(params, seed=(params.seed + j) % 2**64) for j in range(n)]


async def choice_events(router, choices: list[Choice], tenant: str | None, deadline_s: float | None = None):
    """(index into choices, Event) as each choice's stream yields them. An error before a choice's
    first event is raised here (the other choices are cancelled, their blocks freed); after it, that
    choice's own stream ends with finish_reason "abort" (Router.generate)."""
    if len(choices) == 1:           # one stream: relayed in this task, no queue between
        async with aclosing(_generate(router, choices[0], tenant, deadline_s)) as events:
            async for ev in events:
                yield 0, ev
        return
    q: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(k: int, c: Choice) -> None:
        try:
            async with aclosing(_generate(router, c, tenant, deadline_s)) as events:
                async for ev in events:
                    await q.put((k, ev))
        except Exception as e:      # noqa: BLE001 - handed to the consumer
            await q.put((k, e))
        finally:
            await q.put((k, done))

    tasks = [asyncio.ensure_future(pump(k, c)) for k, c in enumerate(choices)]
    left = len(tasks)
    try:
        while left:
            k, item = await q.get()
            if item is done:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield k, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _generate(router, c: Choice, tenant: str | None, deadline_s: float | None):
    return router.generate(c.prompt_ids, c.params, c.request_id, cache_salt=tenant, deadline_s=deadline_s)
