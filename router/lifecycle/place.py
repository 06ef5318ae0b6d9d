"""One attempt's placement: ask the policy, then reserve + prefill remotely or start a local prefill,
trying other workers until one works (or max_attempts)."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from typing import AsyncIterator

from pdcluster.engine.hashing import block_hashes
from pdcluster.engine.sampling_params import SamplingParams, TokenLogprobs
from pdcluster.messages import NoRoom, PullPlan, TokenItem
from pdcluster.router.admission import slo_refusal
from pdcluster.router.errors import Overloaded, Unavailable, WorkerLost
from pdcluster.router.lifecycle.pull import charge, pull_plan, serving_charge
from pdcluster.router.placement import Placement

log = logging.getLogger(__name__)


@dataclass
class Attempt:
    """A placed attempt: where it runs, who holds state for it, and how its tokens start."""
    placement: dict                 # Event.placement fields: prefill_worker, decode_worker, remote_prefill, kv_*
    holders: list                   # clients that hold state for it, decode worker first (abort on failure)
    attempt_id: str                 # the workers' id for it
    stream: AsyncIterator[TokenItem] | None = None   # local prefill: the decode worker's stream, started
    first_token: int | None = None  # remote prefill: the prefill worker's first token
    cached_tokens: int = 0          # remote prefill: prompt tokens from the prefill worker's cache
    first_logprobs: TokenLogprobs | None = None     # remote prefill: the first token's, when asked
    prompt_logprobs: tuple[TokenLogprobs, ...] = ()  # remote prefill: prompt tokens 1.., when asked
    pull: PullPlan | None = None    # local prefill: the prefix blocks its decode worker pulls from a peer
    expected: tuple[str, dict[int, int]] | None = None  # local prefill: (worker, the index's claim on the
                                                        # blocks it computes there); withdrawn if it never does

    @property
    def decode_worker(self) -> str:
        return self.placement["decode_worker"]


async def place(router, attempt_id: str, ids: list[int], params: SamplingParams, salt: str | None,
                exclude: set[str], outputs: list[int] = (), fresh: bool = False) -> Attempt:
    """Place attempt `attempt_id` of prompt `ids` on a worker not in `exclude` (failed ones are added).
    outputs: tokens an earlier attempt sent; prefilled after the prompt, sampled on as outputs.
    fresh: a new request (not a migration), checked against the TTFT SLO on its first choice.
    Raises Overloaded (RESOURCE_EXHAUSTED) for a fresh request over that SLO (RouterConfig.admit_ttft_s,
    router/admission.py slo_refusal) or one the policy sheds (every worker busy: DynamoKV's busy
    thresholds); Unavailable when no worker could take it.
    Each try after the first goes to the workers as `attempt_id#tK` (the Attempt's id): a worker
    fences an id whose abort overtook its call (pdcluster/abort_fence.py), so a failed try's id,
    aborted everywhere, is never sent again."""
    workers, cfg = router.workers, router.cfg
    tokens = ids + list(outputs)                       # what the attempt prefills
    # once per placement, not per try; none for a prompt whose logprobs are asked: no cache serves it,
    # so no hit is priced and nothing is pulled for it
    hashes = block_hashes(tokens, cfg.block_size, salt) if params.prompt_logprobs is None else []
    t0 = time.monotonic()
    for k in range(cfg.max_attempts):
        choice = await _choose(router, len(tokens), exclude, hashes, t0)
        if choice is None:
            break
        if k == 0 and fresh and (why := slo_refusal(choice, workers.loads, router.telemetry.prefill_tps,
                                                    len(tokens), cfg.admit_ttft_s)):
            raise Overloaded(why)       # a new request only, before anything is held (counted as "overloaded")
        try_id = attempt_id if k == 0 else f"{attempt_id}#t{k}"
        # the worker that computes this prompt's blocks holds them from now on, tentatively: the
        # next prompts with this prefix queue behind it instead of racing elsewhere. Not the decode
        # worker of a remote prefill: its blocks arrive only after the prefill and transfer, and a
        # local prefill priced on them meanwhile recomputes the whole prompt there (bench/RESULTS.md,
        # "KV-full fallback": the cost model's collapse at 1.75x); its stored events count them
        holder = choice.prefill or choice.decode
        claim = router.index.expect(holder, hashes, time.time())
        if choice.kind == "local":
            return replace(_start_local(workers, try_id, ids, params, salt, choice, outputs,
                                        pull_plan(choice, hashes, workers)), expected=(holder, claim))
        attempt = None
        try:
            attempt = await _prefill_remote(workers, try_id, ids, params, salt, choice, exclude, outputs)
        finally:
            if attempt is None:     # failed or cancelled: what it computed before, events confirm
                router.index.unexpect(holder, claim)
        if attempt is not None:
            return attempt
    raise Unavailable(f"no worker could take request {attempt_id} (excluded: {sorted(exclude) or 'none ready'})")


async def _choose(router, n_tokens: int, exclude: set[str], hashes, t0: float) -> Placement | None:
    """The policy's choice. A deferred one (Placement.defer: no worker has room for the option the
    policy prefers, e.g. every decode pool's KV full) waits in the router: asked again after each
    status poll until cfg.place_wait_s has passed since t0 (time.monotonic()), then taken as it is
    (None: until the policy finds room). Nothing is held while it waits (a cancelled request just leaves)."""
    workers, cfg = router.workers, router.cfg
    while True:
        choice = router.policy.choose(n_tokens, workers.loads_of("prefill"), workers.loads_of("decode"), exclude,
                                      hashes=hashes, now=time.time())
        if choice is None or not choice.defer or (cfg.place_wait_s is not None
                                                  and time.monotonic() - t0 >= cfg.place_wait_s):
            return choice
        await asyncio.sleep(cfg.status_interval_s)


def _start_local(workers, attempt_id: str, ids: list[int], params: SamplingParams, salt: str | None,
                 choice: Placement, outputs: list[int], pull=None) -> Attempt:
    """pull: (PullPlan, holder client) when the decode worker pulls prefix blocks (router/lifecycle/pull.py)."""
    d = workers.decode[choice.decode]
    queued = max(0, len(ids) + len(outputs) - int((choice.estimate or {}).get("cached_tokens", 0)))
    kw = dict(pull=pull[0], holder=pull[1]) if pull else {}
    charges = [(choice.decode, queued, 0.0)]
    if pull and (serve := serving_charge(choice)) is not None:
        charges.append(serve)                  # the holder serves the pull meanwhile (router/lifecycle/pull.py)
    stream = _charged_until_first(workers, d.stream(attempt_id, None, ids, params, salt, outputs, **kw), charges)
    return Attempt(dict(prefill_worker=choice.decode, decode_worker=choice.decode, remote_prefill=False,
                        kv_bytes_transferred=0, kv_transfer_ms=0.0), [d], attempt_id, stream=stream,
                   pull=pull[0] if pull else None)


async def _prefill_remote(workers, attempt_id: str, ids: list[int], params: SamplingParams, salt: str | None,
                          choice: Placement, exclude: set[str], outputs: list[int]) -> Attempt | None:
    """Reserve KV on the decode worker, then prefill on the prefill worker (which streams the KV
    there). None: this pair failed, the failed worker is in `exclude` now."""
    d, p = workers.decode[choice.decode], workers.prefill[choice.prefill]
    # the tokens the prefill worker computes: the prompt less its cached prefix there, as a local prefill's
    # charge (the whole prompt priced its holder as if it recomputed the prefix, and sent the next to another)
    n = max(0, len(ids) + len(outputs) - int((choice.estimate or {}).get("cached_tokens", 0)))
    workers.charge(choice.decode, 0, +1)   # from the reserve on the request holds d: a drain waits for it
    # charged to the prefill worker from the choice on, before the first await: a burst's next
    # admission and placement see this prompt in its backlog (router/admission.py)
    workers.charge(choice.prefill, n, +1)
    try:
        try:
            # the decode worker only decodes: the prompt's logprobs are the prefill worker's to compute
            r = await d.reserve(attempt_id, ids, replace(params, prompt_logprobs=None), salt, outputs)
        except WorkerLost as e:
            log.warning("reserve of %s: %s; placing again", attempt_id, e)
            exclude.add(choice.decode)      # a slow worker may have reserved all the same: its abort, retried
            await workers.abort(attempt_id, [d], lost=choice.decode)     # in the background, frees that
            return None
        except Exception as e:      # the worker refused it (e.g. a pool smaller than the prompt needs): another may not
            log.warning("reserve of %s on %s failed (%s); placing again", attempt_id, choice.decode, e)
            exclude.add(choice.decode)
            await workers.abort(attempt_id, [d])
            return None
        if isinstance(r, NoRoom):
            exclude.add(choice.decode)
            return None
        try:
            # the transfer needs both ends: either worker missing its health poll (hung, dead)
            # ends the attempt now rather than at the prefill timeout
            pre = await workers.while_healthy(p.prefill(attempt_id, ids, params, r.destination(), salt, outputs),
                                              choice.decode, choice.prefill)
        except Exception as e:   # lost worker, failed or corrupted transfer: recompute elsewhere
            lost = e.worker_id if isinstance(e, WorkerLost) else None
            log.warning("prefill of %s on %s failed (%s); placing again", attempt_id, choice.prefill, e)
            await workers.abort(attempt_id, [d, p], lost=lost)
            exclude.add(lost or choice.prefill)
            return None
        return Attempt(dict(prefill_worker=choice.prefill, decode_worker=choice.decode, remote_prefill=True,
                            kv_bytes_transferred=pre.kv_bytes, kv_transfer_ms=pre.kv_transfer_ms),
                       [d, p], attempt_id, first_token=pre.first_token, cached_tokens=pre.cached_tokens,
                       first_logprobs=pre.first_logprobs, prompt_logprobs=pre.prompt_logprobs)
    except asyncio.CancelledError:      # the caller left mid-placement: no reservation or prefill stays behind
        await asyncio.shield(workers.abort(attempt_id, [d, p]))
        raise
    finally:
        workers.charge(choice.prefill, n, -1)
        workers.charge(choice.decode, 0, -1)


async def _charged_until_first(workers, stream, charges: list[tuple[str, int, float]]):
    """A local prefill's uncached prompt tokens count in its decode worker's queue (what the
    cost model reads as that worker's prefill backlog), and a pull's serving in its holder's,
    until the first item (prefill done) or the stream's end. charges: (worker id, tokens, serving s)."""
    held = [(workers.loads.get(wid), tokens, s) for wid, tokens, s in charges]   # the records charged, kept:
    for c in held:                                                              # a re-registered worker's
        charge(*c, +1)                                                          # new one is not uncharged
    try:
        async for item in stream:
            for c in held:
                charge(*c, -1)
            held = []
            yield item
    finally:
        for c in held:
            charge(*c, -1)
