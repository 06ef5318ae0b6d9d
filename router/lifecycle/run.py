"""One request's steps at the router, top to bottom:

    place an attempt  ->  relay its tokens (a remote prefill's first token, then the decode stream)
    ->  finish, or on a lost decode worker migrate: place again with prompt + tokens sent
A migration re-prefills elsewhere and continues, so the client sees no gap and no repeat. The new
attempt carries the tokens sent as outputs, not prompt: its grammar replays them, its penalties
count them and they count in max_tokens, so it samples on as the lost one would have. On any
exit that is not a normal finish every worker that holds state for the attempt is told to abort.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from dataclasses import dataclass, field, replace

from pdcluster.engine.detokenizer import Detokenizer
from pdcluster.engine.rules import finish_reason, stops_by_token
from pdcluster.engine.sampling_params import SamplingParams, TokenLogprobs
from pdcluster.router.errors import Overloaded, Unavailable, WorkerLost
from pdcluster.router.lifecycle.log import Trace
from pdcluster.router.lifecycle.place import Attempt, place

log = logging.getLogger(__name__)


@dataclass
class Event:
    """One message for the client."""
    token_ids: list[int]
    text: str = ""
    finish_reason: str | None = None        # "stop" | "length" | "abort"
    usage: dict | None = None
    placement: dict | None = None           # the first message's: where the request went
    logprobs: list[TokenLogprobs] = field(default_factory=list)     # one per token, when asked
    prompt_logprobs: tuple[TokenLogprobs, ...] | None = None    # the first message's: prompt tokens 1.., when asked


class RequestRun:
    def __init__(self, router, request_id: str, ids: list[int], params: SamplingParams, salt: str | None,
                 trace: Trace):
        self.router, self.request_id, self.ids, self.params, self.salt, self.trace = (
            router, request_id, ids, params, salt, trace)
        self.detok = Detokenizer(router.tokenizer, ids, params.stop, params.min_tokens)
        self.out: list[int] = []            # tokens already sent to the client
        self.exclude: set[str] = set()      # workers this request will not be placed on again
        self.holders: list = []             # clients that may hold state for the current attempt
        self.expected = None                # the current local attempt's index expectation, until its prefill ends
        self.cached = 0                     # prompt tokens served from a prefix cache (first attempt)
        self.migrations = 0
        self.spent = 0                      # migrations counted against max_migrations (not a scale-down's)
        self.attempt_id = request_id        # the workers' id of the current attempt
        self.announced = False              # the client has had its first message (with the placement)
        self.finished = False               # the client has had its last message

    async def events(self):
        """The client's Events. Raises Unavailable when no worker could take it before any token."""
        workers = self.router.workers
        try:
            while True:
                attempt = await self._place()
                if attempt is None:
                    yield self._abort_event()
                    return
                workers.charge(attempt.decode_worker, 0, +1)
                try:
                    async with aclosing(self._relay(attempt)) as relay:
                        async for ev in relay:
                            yield ev
                    if self.finished:
                        return
                    raise WorkerLost(attempt.decode_worker, "stream ended without a finish")
                except Exception as e:
                    if not await self._migrate(e):
                        yield self._abort_event()
                        return
                finally:
                    workers.charge(attempt.decode_worker, 0, -1)
        finally:
            self.trace.n_out, self.trace.cached = len(self.out), self.cached     # first: a cancellation
            self._unexpect()                                                    # may end the await below
            if not self.finished and self.holders:
                await asyncio.shield(workers.abort(self.attempt_id, self.holders))

    # steps
    async def _place(self) -> Attempt | None:
        """Place the current attempt for prompt + tokens sent. None: no worker, but tokens were sent."""
        m = self.migrations
        self.attempt_id = self.request_id if m == 0 else f"{self.request_id}#m{m}"
        try:
            # once the client has had its first message, the prompt logprobs went out with it
            params = replace(self.params, prompt_logprobs=None) if self.announced else self.params
            attempt = await place(self.router, self.attempt_id, self.ids, params, self.salt, self.exclude,
                                  list(self.out), fresh=m == 0)
        except (Unavailable, Overloaded):     # Overloaded: the policy shed it (no worker below its busy bounds)
            if not self.out:
                raise
            return None
        except Exception:                     # a policy's bug: after tokens went out, the stream ends as an abort
            if not self.out:                  # (with its usage), not as INTERNAL with no last message
                raise
            log.exception("placing %s again after %d tokens failed", self.attempt_id, len(self.out))
            return None
        self.holders, self.attempt_id, self.expected = attempt.holders, attempt.attempt_id, attempt.expected
        if m == 0:
            self.cached, self.trace.placement = attempt.cached_tokens, attempt.placement
            if attempt.pull is not None:
                self.trace.pull = f"{attempt.pull.holder}:{len(attempt.pull.hashes)}"
        self.router.metrics.placed("remote" if attempt.placement["remote_prefill"] else "local")
        self.trace.decode, self.trace.migrations = attempt.decode_worker, m
        return attempt

    async def _relay(self, attempt: Attempt):
        """The attempt's tokens to the client until a finish (self.finished) or the stream's end."""
        stream = attempt.stream
        if attempt.first_token is not None:     # remote prefill: the first token came from the prefill worker
            first = attempt.first_token
            text = self._push([first])
            reason = "stop" if self.detok.stopped else finish_reason(    # the engine's own rule
                first, len(self.out), len(self.ids) + len(self.out), self.params, self.router.eos,
                self.router.max_context)
            if reason:                          # the decode worker holds a reservation: free it (shielded:
                self.finished = True            # finished now, events() sends no abort of its own)
                await asyncio.shield(self.router.workers.abort(self.attempt_id, self.holders[:1]))
            yield self._event([first], text, reason, attempt.placement,
                              [attempt.first_logprobs] if attempt.first_logprobs else [], attempt.prompt_logprobs)
            if reason:
                return
            stream = self.router.workers.decode[attempt.decode_worker].stream(self.attempt_id, first)
        async for item in stream:
            if item.token_ids:                  # the local prefill is done: its blocks are the worker's (an empty
                self.expected = None            # item may end a failed step's batch: nothing was computed)
            if not self.cached and item.num_cached_tokens and self.migrations == 0:
                self.cached = item.num_cached_tokens
            toks, text = self._push_until_stop(item.token_ids)
            reason = item.finish_reason if item.finished else None
            if self.detok.stopped:              # a stop string (the worker does not know them): it wins
                if reason is None:              # finished now (shielded: a cancel meanwhile sends no second abort)
                    self.finished = True
                    await asyncio.shield(self.router.workers.abort(self.attempt_id, self.holders[:1]))
                reason = "stop"
            yield self._event(toks, text, reason, attempt.placement, list(item.logprobs)[:len(toks)],
                              item.prompt_logprobs)
            if reason:
                return

    async def _migrate(self, e: Exception) -> bool:
        """A lost decode worker (or a failed start, e.g. KV that never completed): free the attempt's
        state, exclude the lost worker. False when every migration is spent and tokens were sent."""
        self.migrations += 1
        lost = e.worker_id if isinstance(e, WorkerLost) else None
        if not (lost and lost in self.router.workers.retiring):     # a worker scaled down on purpose
            self.spent += 1                                           # costs the request no retry
        log.warning("request %s: %s; migrating with %d tokens sent (attempt %d)", self.request_id, e, len(self.out),
                    self.migrations)
        if lost:
            self.exclude.add(lost)
        self._unexpect()
        await self.router.workers.abort(self.attempt_id, self.holders, lost=lost)
        self.holders = []
        if self.spent > self.router.cfg.max_migrations:
            if not self.out:
                raise Unavailable(f"request {self.request_id}: every retry spent ({e})") from None
            return False
        return True

    def _unexpect(self) -> None:
        """A local attempt left before its prefill ended: the index stops expecting its blocks there
        (those it computed, the worker's events report)."""
        if self.expected is not None:
            self.router.index.unexpect(*self.expected)
            self.expected = None

    # messages
    def _push(self, toks: list[int]) -> str:
        self.out += toks
        if toks and stops_by_token(toks[-1], self.params, self.router.eos):    # only ever the last one:
            toks = toks[:-1]                    # in the token ids, not in the text (engine/rules.py)
        return self.detok.push(toks) if toks else ""

    def _push_until_stop(self, toks: list[int]) -> tuple[list[int], str]:
        """(the tokens up to the one that completes a stop string, all of them where none does; their
        text). A worker's item can carry several tokens (its queue merges them): those after the stop
        are neither sent nor counted, as the engine itself drops them."""
        if not self.params.stop or len(toks) < 2:
            return toks, self._push(toks)
        text = ""
        for i, t in enumerate(toks):
            text += self._push([t])
            if self.detok.stopped:
                return toks[:i + 1], text
        return toks, text

    def _event(self, toks: list[int], text: str, reason: str | None, placement: dict,
               logprobs: list[TokenLogprobs], prompt_logprobs: tuple[TokenLogprobs, ...] = ()) -> Event:
        if reason:
            self.finished = True
            text += self.detok.flush()
            if self.detok.stopped and reason == "length":   # a stop string only the flush completed: it is why
                reason = "stop"
        asked = self.params.prompt_logprobs is not None and not self.announced
        ev = Event(toks, text, reason, self._usage() if reason else None, None if self.announced else placement,
                   logprobs, tuple(prompt_logprobs) if asked else None)
        self.announced = True
        return ev

    def _abort_event(self) -> Event:
        self.finished = True
        return Event([], self.detok.flush(), "abort", self._usage())

    def _usage(self) -> dict:
        return dict(prompt_tokens=len(self.ids), completion_tokens=len(self.out), cached_prompt_tokens=self.cached)
