"""Continuous-batching scheduler with chunked prefill and recompute preemption. Pure Python.

No prefill/decode phases: each step gives every running request `num_tokens -
num_computed_tokens` more tokens (capped by the step's token budget, and per request by
`long_prefill_token_threshold` when set), then admits waiting requests while budget, sequence
slots and KV blocks last. A request whose chunk reaches its last token is sampled. With the
per-request cap a long prompt's prefill takes a chunk per step and the prompts that arrive
behind it are admitted beside it (processor sharing) instead of waiting for its last chunk.
When the pool runs dry, the newest running request is preempted (blocks freed, recomputed
later; the prefix cache usually gives most of them back).

A waiting request whose next uncached prompt block a running request is still computing is
passed over (the rest of the queue goes on) until that block is published, then admitted with
the hit: two prompts that share a cold prefix compute it once (`wait_for_inflight_prefix`).

KV from outside goes through the engine's KV connector (engine/kv_connector.py): a waiting
request whose prompt continues past its local prefix hits in what the connector can supply gets
blocks for those tokens and waits in WAITING_FOR_REMOTE_KV (`loading`) until the load ends, or,
when the connector loads them layer by layer inside the forward pass (`load_in_step`), counts them
as computed and runs its tail in the same step; a remote prefill's reservation (add_remote) is the
case where every prompt token comes from outside.
A finished request whose blocks the connector still reads stays in `held` until it lets go.

Speculative decoding (engine/spec/): a running request with one token left to compute may get
draft tokens (`req.spec_token_ids`) and is scheduled for 1 + k tokens. Drafts are optional: a step
short of blocks drops them before it preempts anyone. After the step only the verified tokens count
as computed, and the blocks past them (the rejected drafts' slots) go back to the pool. Drafts never
reach past max_tokens or the context length, so the admission invariant below still holds.

Invariant that rules out deadlock: admission (`check_fits`) rejects any request whose whole
lifetime (prompt + max_tokens) could not fit the pool alone, so the oldest running request can
always progress once everything newer is preempted.
"""
from __future__ import annotations

import sys
from collections import deque
from dataclasses import dataclass, field

from pdcluster.engine.config import SchedulerConfig
from pdcluster.engine.kv_cache_manager import KVCacheManager
from pdcluster.engine.kv_connector import KVConnector, NoKVCapacity
from pdcluster.engine.request import Request, Status
from pdcluster.engine.rules import blocks_for_lifetime, finish_reason
from pdcluster.engine.spec.decoder import SpecDecoder

_LOADING, _IN_STEP = "loading", "in step"      # _start_load's answers


@dataclass
class ScheduledBatch:
    reqs: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)   # tokens computed this step, per request
    preempted: list[Request] = field(default_factory=list)

    def without(self, request_ids: set[str], *per_request: list) -> tuple:
        """This batch less the requests in request_ids, and each per-request list likewise."""
        keep = [i for i, r in enumerate(self.reqs) if r.request_id not in request_ids]
        b = ScheduledBatch([self.reqs[i] for i in keep], [self.num_new_tokens[i] for i in keep], self.preempted)
        return (b, *([lst[i] for i in keep] for lst in per_request))

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def samples(self, i: int) -> bool:
        """Does request i's chunk reach its last token (so the step samples for it)?"""
        r = self.reqs[i]
        return r.num_computed_tokens + self.num_new_tokens[i] == r.num_tokens + len(r.spec_token_ids)

    def __len__(self) -> int:
        return len(self.reqs)


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, kv: KVCacheManager, max_model_len: int,
                 connector: KVConnector | None = None, spec: SpecDecoder | None = None):
        self.cfg = cfg
        self.spec = spec                                    # None: no speculative decoding
        self.kv = kv
        self.max_model_len = max_model_len
        self.connector = connector or KVConnector()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # remote prefills whose KV is in (RUNNING, first token appended), waiting, in arrival order, for a
        # batch slot: they join `running` at the next schedule() while it has fewer than max_num_seqs
        self.joining: deque[Request] = deque()
        self.requests: dict[str, Request] = {}              # every unfinished request, by id
        self.loading: dict[str, Request] = {}               # waiting for the connector's load
        self.held: dict[str, Request] = {}                  # finished; blocks kept for the connector

    # admission
    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """ValueError unless a request of this size can ever run here."""
        if num_prompt_tokens + max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds "
                             f"the context length {self.max_model_len}")
        if not self.cfg.enable_chunked_prefill and num_prompt_tokens + max_tokens > self.cfg.max_num_batched_tokens:
            raise ValueError(f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the step's "
                             f"{self.cfg.max_num_batched_tokens} tokens, and chunked prefill is off (a preempted "
                             "request recomputes its prompt and outputs in one step)")
        need = blocks_for_lifetime(num_prompt_tokens, max_tokens, self.kv.block_size)
        if need > self.kv.num_blocks:
            raise ValueError(f"prompt + max_tokens needs {need} KV blocks; the pool has {self.kv.num_blocks}")

    def _check_new_id(self, request_id: str) -> None:
        """ValueError if the id is in flight, or ended with its blocks still held for the connector (a
        second request of that id ending held as well would overwrite the first's entry: its blocks leak)."""
        if request_id in self.requests or request_id in self.held:
            raise ValueError(f"request_id {request_id!r} is already in flight")

    def add(self, req: Request) -> None:
        self._check_new_id(req.request_id)
        self.check_fits(req.num_prompt_tokens, req.params.max_tokens)
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def add_remote(self, req: Request) -> tuple[int, list[int]]:
        """A request whose prompt KV comes from outside (a prefill worker): blocks for the whole
        prompt are allocated now, prefix hits reused, and it waits in WAITING_FOR_REMOTE_KV (in
        no queue: it is not stepped) until remote_kv_done. The blocks right after the hits that
        the connector can load from a cache tier in step (step_tokens) are loaded from there; the
        rest come from outside. Returns (blocks not to send: hits + tier blocks, the ids of the
        blocks to fill from outside, in order). NoKVCapacity when the pool cannot hold it now."""
        self._check_new_id(req.request_id)
        self.check_fits(req.num_prompt_tokens, req.params.max_tokens)
        hits = self.kv.computed_blocks(req)
        local = len(hits) * self.kv.block_size
        n_new = req.num_prefill_tokens - local
        if not self.kv.can_allocate(req, n_new, hits):
            raise NoKVCapacity(f"{self.kv.num_free_blocks} free KV blocks")
        fill = self.kv.allocate(req, n_new, hits)
        n_tier = self.connector.step_tokens(req, local) // self.kv.block_size    # a cache tier's blocks
        try:
            if n_tier:
                self.connector.after_alloc(req, fill[:n_tier], n_tier * self.kv.block_size)
                if not self.connector.load_in_step(req):    # a source went meanwhile: those blocks cross too
                    n_tier = 0
            self.connector.after_alloc(req, fill[n_tier:], n_new - n_tier * self.kv.block_size)
        except BaseException:
            # undone whole: a tier load the first call started must not write into the freed blocks
            self.connector.request_aborted(req.request_id)
            self.kv.free(req)
            raise
        req.status = Status.WAITING_FOR_REMOTE_KV
        self.requests[req.request_id] = req
        return len(hits) + n_tier, fill[n_tier:]

    def remote_kv_done(self, req: Request, first_token: int) -> None:
        """Its prompt's KV is in: the prompt counts as computed (and cached), the first token,
        sampled where the prompt was prefilled, is appended, and it runs. If that token already
        ends it, it finishes here (blocks freed) and ValueError says so: nothing to decode."""
        assert req.status is Status.WAITING_FOR_REMOTE_KV
        req.num_computed_tokens = req.num_prefill_tokens
        self.kv.cache_computed_blocks(req)
        req.append_token(first_token)
        if (status := self.stop_status(req, first_token)) is not None:
            self.finish(req, status)
            raise ValueError("the first token already finishes the request; nothing to decode")
        req.status = Status.RUNNING
        self.joining.append(req)

    def loads_done(self, results: list[tuple[str, bool]]) -> None:
        """The connector's loads that ended: a complete one counts its tokens as computed (and
        cached) and queues the request first; a failed one frees its blocks to recompute them."""
        for request_id, ok in results:
            req = self.loading.pop(request_id, None)
            if req is None:                     # aborted meanwhile
                continue
            if ok:
                req.num_computed_tokens += req.num_external_tokens
                self.kv.cache_computed_blocks(req)
                req.num_cached_tokens = req.num_computed_tokens
            else:
                self.kv.free(req)
                req.num_computed_tokens = 0
            req.num_external_tokens = 0
            req.status = Status.WAITING
            self.waiting.appendleft(req)

    def loads_failed(self, request_ids: list[str]) -> set[str]:
        """In-step loads that failed (KVConnector.failed_in_step): each such request, running or
        waiting with its blocks, gives them back (its loaded blocks were never published: update has
        not run for them) and waits at the front to recompute its prompt, as if preempted. Returns
        the ids reset (a step's results for them must be dropped, and update not run for them)."""
        out = set()
        for request_id in request_ids:
            req = self.requests.get(request_id)
            if req is None or req.status not in (Status.RUNNING, Status.WAITING):
                continue                # ended, or a reservation (its remote KV decides: take_loaded)
            if req in self.running:
                self.running.remove(req)
            elif req in self.joining:
                self.joining.remove(req)
            elif req in self.waiting:
                self.waiting.remove(req)
            self._requeue(req)
            req.num_cached_tokens = -1          # counted again at readmission
            out.add(request_id)
        return out

    def sends_done(self, request_ids: list[str]) -> None:
        """Free the blocks of finished requests the connector no longer reads."""
        for request_id in request_ids:
            req = self.held.pop(request_id, None)
            if req is not None:
                self.kv.free(req)

    def queued(self) -> list[Request]:
        """The requests a step may run: running, joining and waiting (not loading, reserved or held)."""
        return [*self.running, *self.joining, *self.waiting]

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.joining or self.loading or self.held)

    @property
    def num_waiting_tokens(self) -> int:
        # a copy first (one C call): status polls read this off the engine thread, which edits the queue
        return sum(r.num_tokens - r.num_computed_tokens for r in list(self.waiting))

    # step
    def schedule(self) -> ScheduledBatch:
        out = ScheduledBatch()
        budget = self.cfg.max_num_batched_tokens
        while self.joining and len(self.running) < self.cfg.max_num_seqs:     # the batch cap holds for them too
            self.running.append(self.joining.popleft())
        # draft tokens this step may add: a step past spec.max_step_tokens rows is compute-bound, so
        # a drafted row there costs about what the token would cost in a step of its own
        spec_room = self.spec.max_step_tokens - len(self.running) if self.spec is not None else 0
        scheduled: set[str] = set()
        cap = self._chunk_cap()
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget, cap)
            if n <= 0:
                i += 1
                continue
            # drafts follow the sequence's last token: only when it is the one left to compute (a chunk of 1, as
            # a cap of 1 makes a resumed request's every chunk, is not)
            if req.num_tokens - req.num_computed_tokens == 1 and spec_room > 0 and req.num_output_tokens:
                req.spec_token_ids = self.spec.drafts(req, min(spec_room, self._draft_limit(req, budget)))
                n += len(req.spec_token_ids)
                spec_room -= len(req.spec_token_ids)
            while not self.kv.can_allocate(req, n):
                if req.spec_token_ids:      # drafts are optional: drop them before preempting anyone
                    n -= len(req.spec_token_ids)
                    req.spec_token_ids = []
                    continue
                if self._release_holders():  # then the blocks waiting requests hold since their loads
                    continue
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is req:
                    break
            if req.status is not Status.RUNNING:  # preempted itself: nothing older left to evict
                break
            self.kv.allocate(req, n)
            out.reqs.append(req)
            out.num_new_tokens.append(n)
            scheduled.add(req.request_id)
            budget -= n
            i += 1

        wait = self.cfg.wait_for_inflight_prefix and self.kv.enable_caching   # no cache: nothing to wait for
        inflight = inflight_hashes(self.running, self.kv.block_size) if wait and self.waiting else set()
        j = 0                                   # waiting[:j] are deferred on an in-flight prefix
        while j < len(self.waiting) and budget > 0 and len(self.running) < self.cfg.max_num_seqs \
                and not out.preempted:
            req = self.waiting[j]
            hits = self.kv.computed_blocks(req, count=False) if req.num_computed_tokens == 0 else []
            if wait and req.num_computed_tokens == 0:
                hashes = req.block_hashes()
                k = len(hits)
                if k < self.kv.max_hit_blocks(req) and hashes[k] in inflight:
                    req.num_prefix_waits += 1
                    j += 1                      # its next block is being computed: wait, then hit
                    continue
            if req.num_computed_tokens == 0:
                self.kv.count_lookup(req, len(hits))
                got = self._start_load(req, hits, min(budget, cap)) if not req.wants_prompt_logprobs else None
                if got is _LOADING:
                    del self.waiting[j]
                    continue
                if got is _IN_STEP:             # loaded inside this step's forward: its tail runs now
                    hits = []
            n = min(req.num_tokens - (len(hits) * self.kv.block_size if hits else req.num_computed_tokens), cap)
            if n > budget:
                if not self.cfg.enable_chunked_prefill:
                    break
                n = budget
            if not self.kv.can_allocate(req, n, hits):
                if not self._release_holders(keep=req):
                    break
                continue                        # this request again, with the released blocks (hits anew)
            del self.waiting[j]
            self.kv.allocate(req, n, hits)
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = len(hits) * self.kv.block_size
            req.status = Status.RUNNING
            self.running.append(req)
            out.reqs.append(req)
            out.num_new_tokens.append(n)
            budget -= n
            if wait:
                inflight.update(computing(req, self.kv.block_size))
        return out

    def _chunk_cap(self) -> int:
        """Most tokens one request computes this step: long_prefill_token_threshold with chunked
        prefill on (else no cap). A decode row's 1 token is never cut; its drafts come after the cap."""
        thr = self.cfg.long_prefill_token_threshold
        return thr if thr > 0 and self.cfg.enable_chunked_prefill else sys.maxsize

    def _start_load(self, req: Request, hits: list, chunk: int):
        """Does the connector supply tokens past req's local hits? Then their blocks (and the hits)
        are req's and either it waits in `loading` (_LOADING), or the connector loads them inside
        the next forward pass, layer by layer (_IN_STEP: they count as computed and req is admitted
        for its tail like any request). None: no load (none offered, or no room now for it and for
        the tail's first chunk of up to `chunk` tokens: a load never leaves a request that cannot go
        on holding blocks, which an in-step load's, being written, could not even give back)."""
        local = len(hits) * self.kv.block_size
        n_ext = self.connector.external_tokens(req, local)
        if n_ext <= 0:
            return None
        assert local + n_ext < req.num_prefill_tokens, "the last prompt token is computed here"
        tail = req.num_tokens - local - n_ext
        if tail > chunk and not self.cfg.enable_chunked_prefill:
            return None
        if not self.kv.can_allocate(req, n_ext + min(tail, chunk), hits):
            return None
        fill = self.kv.allocate(req, n_ext, hits)
        try:
            self.connector.after_alloc(req, fill, n_ext)
        except Exception:
            self.kv.free(req)
            req.num_computed_tokens = 0
            raise
        if self.connector.load_in_step(req):
            req.num_computed_tokens += n_ext
            req.num_cached_tokens = req.num_computed_tokens
            return _IN_STEP
        req.num_external_tokens = n_ext
        req.status = Status.WAITING_FOR_REMOTE_KV
        self.loading[req.request_id] = req
        return _LOADING

    def _draft_limit(self, req: Request, budget: int) -> int:
        """Most drafts req may verify this step: the step's budget after its own token, and no
        output past max_tokens or the context length (the last one drawn rather than drafted)."""
        return min(budget - 1, req.params.max_tokens - req.num_output_tokens - 1,
                   self.max_model_len - req.num_tokens - 1)

    def _release_holders(self, keep: Request | None = None) -> bool:
        """Free the blocks of waiting requests that hold some: those whose load ended (loads_done) while there was
        no room for their tail. Nothing else would: the waiting loop stops at the first request that does not fit,
        and preemption takes running ones, so two such holders (or one, ahead of a preempted request) could wait for
        each other's blocks forever. Their blocks were published at the load's end: they stay cached, hits again at
        readmission unless evicted meanwhile. keep: one to leave holding its own. True if any were freed."""
        freed = False
        for r in self.waiting:
            if r.block_ids and r is not keep:
                self.kv.free(r)
                r.num_computed_tokens = 0
                r.num_cached_tokens = -1            # counted again at readmission
                freed = True
        return freed

    def _preempt(self, req: Request, out: ScheduledBatch) -> None:
        self.running.remove(req)
        self._requeue(req)
        req.num_preemptions += 1
        out.preempted.append(req)

    def _requeue(self, req: Request) -> None:
        """Its blocks freed, nothing computed: first in line to recompute its prompt (and outputs)."""
        self.kv.free(req)
        req.spec_token_ids = []
        req.num_computed_tokens = 0
        req.status = Status.WAITING
        self.waiting.appendleft(req)

    def update(self, batch: ScheduledBatch, sampled: list[int | list[int] | None]) -> list[Request]:
        """Advance counters after the forward pass; append sampled tokens; return newly finished.
        sampled, per request: None (a partial prefill chunk), a token, or a list of tokens (a
        request with drafts: the accepted drafts, then the token drawn after them)."""
        finished = []
        for req, n, tok in zip(batch.reqs, batch.num_new_tokens, sampled):
            if req.is_finished:  # aborted while the step ran
                continue
            if req.spec_token_ids:
                if self._update_spec(req, n, tok):
                    finished.append(req)
                continue
            if isinstance(tok, list):
                assert len(tok) <= 1, "several tokens for a request without drafts"
                tok = tok[0] if tok else None
            req.num_computed_tokens += n
            self.kv.cache_computed_blocks(req)
            if tok is None:
                continue
            req.append_token(tok)
            status = self.stop_status(req, tok)
            if status is not None:
                self.finish(req, status)
                finished.append(req)
        return finished

    def _update_spec(self, req: Request, n: int, toks: list[int]) -> bool:
        """A verification step: toks = accepted drafts + one drawn token. Counts only verified
        positions as computed, appends tokens until one finishes the request, frees the blocks
        that only rejected drafts used. Returns whether req finished."""
        drafts, req.spec_token_ids = req.spec_token_ids, []
        a = len(toks) - 1
        assert a >= 0 and toks[:a] == drafts[:a], (toks, drafts)
        self.spec.observe(req.request_id, len(drafts), a)
        req.num_computed_tokens += n - len(drafts) + a      # the last token and the accepted drafts
        status = None
        for t in toks:
            req.append_token(t)
            if (status := self.stop_status(req, t)) is not None:
                break
        self.kv.cache_computed_blocks(req)
        if status is not None:
            self.finish(req, status)
            return True
        self._trim_blocks(req)
        return False

    def _trim_blocks(self, req: Request) -> None:
        """Free req's blocks past its computed tokens (they held rejected drafts' KV only: never
        cached, never shared), tail first."""
        keep = -(-req.num_computed_tokens // self.kv.block_size)
        extra = req.block_ids[keep:]
        if extra:
            del req.block_ids[keep:]
            self.kv.pool.free(self.kv.pool.blocks[b] for b in reversed(extra))

    def stop_status(self, req: Request, tok: int) -> Status | None:
        if req.grammar_ended:               # nothing may follow (a grammar whose stop tokens the engine's EOS
            return Status("stop")           # set lacks would otherwise mask the next step from a finished matcher)
        reason = finish_reason(tok, req.num_output_tokens, req.num_tokens, req.params, req.eos_token_ids,
                               self.max_model_len)
        return Status(reason) if reason else None

    def finish(self, req: Request, status: Status) -> None:
        """Finish (or abort) a request anywhere in the queues and free its blocks, unless the
        connector still reads them (then they wait in `held` for sends_done)."""
        if req.is_finished:
            return
        if req in self.running:
            self.running.remove(req)
        elif req in self.joining:
            self.joining.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.loading.pop(req.request_id, None)
        if self.spec is not None:
            self.spec.release(req.request_id)
        if self.connector.request_finished(req.request_id, req.block_ids):
            self.held[req.request_id] = req
        else:
            self.kv.free(req)
        req.status = status
        self.requests.pop(req.request_id, None)

    def abort(self, request_id: str) -> Request | None:
        req = self.requests.get(request_id)
        if req is not None:
            self.finish(req, Status.FINISHED_ABORTED)
        return req


def inflight_hashes(running: list[Request], block_size: int) -> set[int]:
    """Chain hashes of the full prompt blocks running requests are still computing (scheduled
    in an earlier step or this one, not yet cached). A waiting request whose next uncached
    block is among them is deferred: once the running request's step publishes the block
    (update -> cache_computed_blocks) it becomes a prefix hit. No deadlock: the running
    request makes progress (the oldest always can), and if it is preempted or aborted it
    leaves `running`, so nothing waits on it any more."""
    out: set[int] = set()
    for r in running:
        out.update(computing(r, block_size))
    return out


def computing(r: Request, bs: int) -> list[int]:
    """Hashes of r's full prompt blocks not computed yet (r is running: it will compute them)."""
    done, full = r.num_computed_tokens // bs, r.num_prefill_tokens // bs
    return r.block_hashes()[done:full] if done < full else []
