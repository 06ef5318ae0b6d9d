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
import logging
from contextlib import aclosing
from dataclasses import dataclass, replace

from pdcluster.engine.sampling_params import SamplingParams
from pdcluster.router.lifecycle.run import Event

log = logging.getLogger(__name__)


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
    """(index into choices, Event) as each choice's stream yields them. An error before any event
    went out is raised here (the other choices are cancelled, their blocks freed); one in a choice
    placed while others already streamed ends that choice alone, with finish_reason "abort" (as a
    choice's failure after its own first event does: Router.generate)."""
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

    tasks: list[asyncio.Task] = []
    left, sent = len(choices), False
    try:
        # one choice started per loop iteration: each placement (prefix hashes, the policy, the worker call)
        # runs synchronously up to its first wait, and 64 prompts x n=16 started at once ran ~1,000 of them in
        # one iteration, no other client's I/O served meanwhile
        for k, c in enumerate(choices):
            tasks.append(asyncio.ensure_future(pump(k, c)))
            await asyncio.sleep(0)
        while left:
            k, item = await q.get()
            if item is done:
                left -= 1
            elif isinstance(item, Exception) and not sent:
                raise item                  # nothing went out yet: the call's status says why
            elif isinstance(item, Exception):   # others' tokens went out: this choice alone ends, "abort"
                log.warning("choice %d of %s failed before its first token (%s: %s); it ends aborted",
                            k, choices[k].request_id, type(item).__name__, item)
                yield k, Event([], "", "abort", dict(prompt_tokens=len(choices[k].prompt_ids), completion_tokens=0,
                                                     cached_prompt_tokens=0))
            else:
                sent = True
                yield k, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _generate(router, c: Choice, tenant: str | None, deadline_s: float | None):
    return router.generate(c.prompt_ids, c.params, c.request_id, cache_salt=tenant, deadline_s=deadline_s)
