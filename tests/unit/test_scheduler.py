"""Scheduler: budget, chunked prefill, prefix hits, preemption without deadlock (no torch)."""
import random

import pytest

from pdcluster.engine.config import SchedulerConfig
from pdcluster.engine.kv_cache_manager import KVCacheManager
from pdcluster.engine.kv_connector import KVConnector, NoKVCapacity
from pdcluster.engine.request import Request, Status
from pdcluster.engine.sampling_params import SamplingParams
from pdcluster.engine.scheduler import Scheduler

BS = 4


def make(num_blocks=16, budget=16, max_seqs=8, chunked=True, max_len=1000, connector=None):
    kv = KVCacheManager(num_blocks, BS)
    return Scheduler(SchedulerConfig(max_seqs, budget, chunked), kv, max_len, connector)


class Reserving(KVConnector):
    """A decode worker's connector, minus the transport: records the reservations it is told of."""
    def __init__(self):
        self.allocs = {}

    def after_alloc(self, request, block_ids, num_external_tokens):
        self.allocs[request.request_id] = (list(block_ids), num_external_tokens)


def req(n, max_tokens=4, start=0, rid=None):
    return Request(list(range(start, start + n)), SamplingParams(max_tokens=max_tokens, temperature=0),
                   request_id=rid, eos_token_ids=(99999,), block_size=BS)


def run_step(s, tok=7):
    b = s.schedule()
    sampled = [tok if b.samples(i) else None for i in range(len(b))]
    fin = s.update(b, sampled)
    return b, fin


def test_chunked_prefill_splits_long_prompt_and_mixes_decodes():
    s = make(budget=8)
    a, b = req(3, rid="a"), req(20, start=100, rid="b")
    s.add(a)
    s.add(b)
    batch, _ = run_step(s)
    assert [r.request_id for r in batch.reqs] == ["a", "b"] and batch.num_new_tokens == [3, 5]
    assert a.num_output_tokens == 1 and b.num_output_tokens == 0 and b.num_computed_tokens == 5
    batch, _ = run_step(s)
    assert batch.num_new_tokens == [1, 7]     # a decodes, b's next chunk fills the budget
    batch, _ = run_step(s)
    assert batch.num_new_tokens == [1, 7]
    assert b.num_computed_tokens == 19 and b.num_output_tokens == 0
    batch, _ = run_step(s)
    assert batch.num_new_tokens[1] == 1 and b.num_output_tokens == 1   # last prompt token sampled


def test_without_chunking_a_request_past_the_step_is_refused_not_left_blocking_the_queue():
    """Before, it was accepted and then never scheduled, and every request behind it waited forever. Its whole
    lifetime must fit a step: preempted, it recomputes its prompt and outputs in one."""
    s = make(budget=8, chunked=False)
    with pytest.raises(ValueError, match="chunked prefill is off"):
        s.add(req(20))
    with pytest.raises(ValueError, match="chunked prefill is off"):
        s.add(req(6, max_tokens=3))
    short = req(5, max_tokens=3)
    s.add(short)
    assert s.schedule().num_new_tokens == [5] and not s.waiting


def test_prefix_hit_skips_computation_and_records_cached_tokens():
    s = make()
    a = req(9, max_tokens=1)
    s.add(a)
    run_step(s)
    assert a.status is Status.FINISHED_LENGTH
    b = req(9, max_tokens=1)
    s.add(b)
    batch, _ = run_step(s)
    assert batch.num_new_tokens == [1] and b.num_cached_tokens == 8


def test_a_prompt_whose_logprobs_are_asked_is_computed_whole_then_hits_again():
    """No prefix hit stands in for a prompt whose logprobs are to be computed (the runner fills them); once
    they are all there (a preempted request recomputing), the cache serves it as any other."""
    s = make()
    a = req(9, max_tokens=1)
    s.add(a)
    run_step(s)
    b = Request(list(range(9)), SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0), eos_token_ids=(99999,),
                block_size=BS)
    assert b.wants_prompt_logprobs and s.kv.max_hit_blocks(b) == 0
    s.add(b)
    batch, _ = run_step(s)
    assert batch.num_new_tokens == [9] and b.num_cached_tokens == 0
    b.prompt_logprobs += [None] * 8                         # what the runner fills: tokens 1..8
    assert not b.wants_prompt_logprobs and s.kv.max_hit_blocks(b) == 2


def test_finish_by_length_and_stop_token_frees_blocks():
    s = make()
    a = req(5, max_tokens=2)
    s.add(a)
    run_step(s)
    _, fin = run_step(s)
    assert fin == [a] and a.status is Status.FINISHED_LENGTH and a.output_token_ids == [7, 7]
    assert s.kv.num_free_blocks == 16
    c = Request([1, 2], SamplingParams(max_tokens=9, stop_token_ids=[7]), block_size=BS)
    s.add(c)
    _, fin = run_step(s)
    assert fin == [c] and c.status is Status.FINISHED_STOPPED


def test_preemption_recomputes_and_never_deadlocks():
    s = make(num_blocks=6, budget=64)
    reqs = [req(6, max_tokens=10, start=10 * i) for i in range(4)]   # 4 x 4 blocks > 6 blocks
    for r in reqs:
        s.add(r)
    steps, preempted = 0, 0
    while s.has_work():
        b, _ = run_step(s)
        preempted += len(b.preempted)
        steps += 1
        assert steps < 500, "no progress"
        assert s.kv.num_free_blocks >= 0
    assert preempted > 0
    assert all(r.status is Status.FINISHED_LENGTH and r.num_output_tokens == 10 for r in reqs)
    assert s.kv.num_free_blocks == 6


def test_admission_rejects_what_can_never_fit():
    s = make(num_blocks=4, max_len=50)
    with pytest.raises(ValueError, match="context length"):
        s.add(req(40, max_tokens=11))
    with pytest.raises(ValueError, match="KV blocks"):
        s.add(req(14, max_tokens=3))     # 17 tokens = 5 blocks > 4
    s.add(req(3, rid="x"))
    with pytest.raises(ValueError, match="already in flight"):
        s.add(req(3, rid="x"))


def test_abort_anywhere_frees_everything():
    s = make(num_blocks=8, budget=8)
    rs = [req(9, max_tokens=8, start=50 * i) for i in range(3)]
    for r in rs:
        s.add(r)
    run_step(s)
    for r in rs:
        s.abort(r.request_id)
    assert not s.has_work() and s.kv.num_free_blocks == 8


def test_remote_kv_request_holds_its_blocks_unstepped_then_runs_from_the_first_token():
    s = make(num_blocks=8, budget=8, connector=Reserving())
    warm = req(8, max_tokens=1, rid="warm")                    # caches blocks 0..1 of the shared prefix
    s.add(warm)
    run_step(s)
    r = req(10, max_tokens=3, rid="r")                         # same first 8 tokens
    skip, fill = s.add_remote(r)
    assert (skip, len(fill)) == (2, 1) and r.status is Status.WAITING_FOR_REMOTE_KV   # the cached prefix is skipped
    assert s.connector.allocs == {"r": (fill, 2)}               # told: 2 prompt tokens come from outside
    assert not s.has_work() and s.kv.num_free_blocks == 8 - 3 and "r" in s.requests
    with pytest.raises(ValueError, match="already in flight"):
        s.add_remote(req(4, rid="r"))
    s.remote_kv_done(r, 5)
    assert r.status is Status.RUNNING and r.num_computed_tokens == 10 and r.output_token_ids == [5]
    b, _ = run_step(s)
    assert b.reqs == [r] and b.num_new_tokens == [1]            # a decode step, no prompt recompute
    with pytest.raises(NoKVCapacity):
        s.add_remote(req(28, max_tokens=1, start=100, rid="big"))   # 7 blocks: 5 free
    assert "big" not in s.requests and s.kv.num_free_blocks == 8 - 3


def test_remote_prefills_join_the_batch_within_max_num_seqs_in_arrival_order():
    """A request whose KV came from a prefill worker joined `running` at once: a decode worker's batch
    (almost all such requests) grew past max_num_seqs (the CUDA graphs' largest captured batch), and a
    local request behind them stayed blocked by the cap they skipped. Now they wait for a slot, first
    come first joined; an abort while waiting frees them."""
    s = make(num_blocks=64, budget=64, max_seqs=2, connector=Reserving())
    rs = [req(5, max_tokens=8, start=100 * i, rid=f"r{i}") for i in range(6)]
    for r in rs:
        s.add_remote(r)
        s.remote_kv_done(r, 1)
    b, _ = run_step(s)
    assert [r.request_id for r in b.reqs] == ["r0", "r1"] and len(s.running) == 2
    assert s.has_work() and s.abort("r3") is not None and rs[3] not in s.joining
    s.abort("r0"), s.abort("r1")
    b, _ = run_step(s)
    assert [r.request_id for r in b.reqs] == ["r2", "r4"]       # in arrival order, r3 gone
    for r in list(s.running) + list(s.joining):
        s.abort(r.request_id)
    assert s.kv.num_free_blocks == 64 and not s.has_work()


def test_an_id_whose_blocks_are_still_held_is_refused_until_they_are_freed():
    """A finished request whose blocks the connector still reads (held) left `requests`, so its id was
    taken again; a second request of that id ending held overwrote the entry and the first's blocks
    leaked. Now the id is refused while held, and free again once the send ends."""
    class Sending(KVConnector):
        def __init__(self):
            self.sending = []

        def request_finished(self, request_id, block_ids):
            self.sending.append(request_id)
            return True

    s = make(num_blocks=16, budget=64, connector=Sending())
    s.add(req(9, max_tokens=1, rid="x"))
    run_step(s)
    assert "x" in s.held
    with pytest.raises(ValueError, match="already in flight"):
        s.add(req(9, max_tokens=1, start=500, rid="x"))
    with pytest.raises(ValueError, match="already in flight"):
        s.add_remote(req(9, max_tokens=1, start=500, rid="x"))
    s.sends_done(s.connector.sending)
    assert s.kv.num_free_blocks == 16 and not s.has_work()
    s.add(req(9, max_tokens=1, start=500, rid="x"))                  # free again


def test_a_failed_reservation_tells_the_connector_so_a_started_tier_load_stops():
    """add_remote's first after_alloc started a tier load; when the second raised, the blocks were freed
    but the connector was never told, so the load could write into blocks the next request got."""
    class SecondFails(TierReserving):
        aborted = []

        def after_alloc(self, request, block_ids, num_external_tokens):
            if not self._next_tier:
                raise RuntimeError("the receiver refused it")
            super().after_alloc(request, block_ids, num_external_tokens)

        def request_aborted(self, request_id):
            self.aborted.append(request_id)

    s = make(num_blocks=8, budget=8, connector=SecondFails(tier=2))
    with pytest.raises(RuntimeError, match="refused"):
        s.add_remote(req(13, max_tokens=2, rid="r"))
    assert s.connector.tier_allocs and s.connector.aborted == ["r"]
    assert s.kv.num_free_blocks == 8 and "r" not in s.requests


class TierReserving(Reserving):
    """Reserving beside a cache tier that holds `tier` more blocks of every prompt, loadable in step;
    `in_step` False: their source went between step_tokens and after_alloc."""
    def __init__(self, tier, in_step=True):
        super().__init__()
        self.tier, self.in_step, self.tier_allocs, self._next_tier = tier, in_step, {}, False

    def step_tokens(self, request, num_local_tokens):
        self._next_tier = self.tier > 0
        return self.tier * BS

    def after_alloc(self, request, block_ids, num_external_tokens):
        if self._next_tier:
            self._next_tier = False
            self.tier_allocs[request.request_id] = (list(block_ids), num_external_tokens)
        else:
            super().after_alloc(request, block_ids, num_external_tokens)

    def load_in_step(self, request):
        return self.in_step


def test_a_reservation_loads_the_blocks_a_tier_holds_and_the_rest_cross():
    """A decode worker's reservation counts its tier's blocks: they load here (in step), and the
    prefill worker is told to skip them. The control: a tier whose source went sends them all."""
    s = make(num_blocks=8, budget=8, connector=TierReserving(tier=2))
    r = req(13, max_tokens=2, rid="r")                          # 4 blocks: 2 from the tier, 2 cross
    skip, fill = s.add_remote(r)
    assert skip == 2 and fill == r.block_ids[2:] and len(r.block_ids) == 4
    assert s.connector.tier_allocs == {"r": (r.block_ids[:2], 8)} and s.connector.allocs == {"r": (fill, 5)}
    s.remote_kv_done(r, 5)
    assert r.num_computed_tokens == 13
    s2 = make(num_blocks=8, budget=8, connector=TierReserving(tier=2, in_step=False))
    r2 = req(13, max_tokens=2, rid="r2")
    skip, fill = s2.add_remote(r2)
    assert skip == 0 and fill == r2.block_ids and s2.connector.allocs == {"r2": (fill, 13)}


def test_remote_kv_request_aborted_or_ended_by_its_first_token_frees_its_blocks():
    s = make(num_blocks=8, budget=8, connector=Reserving())
    a, b = req(9, rid="a"), req(9, max_tokens=1, start=100, rid="b")
    s.add_remote(a)
    s.add_remote(b)
    assert s.abort("a") is a and a.status is Status.FINISHED_ABORTED
    with pytest.raises(ValueError, match="nothing to decode"):
        s.remote_kv_done(b, 5)                                 # max_tokens=1: the first token ends it
    assert b.status is Status.FINISHED_LENGTH and not s.requests and s.kv.num_free_blocks == 8


def drive_random(s, rng, new_req, steps, p_add, p_abort, drain_limit=1000):
    """Add new_req(step) with probability p_add and abort a random earlier one with p_abort, each
    step for `steps` steps, checking the block accounting after every step (every block in use or
    free; a running request's blocks carry exactly its references); then run until idle (within
    drain_limit steps) and check that the pool is whole again. Returns the requests added."""
    total, live = s.kv.num_blocks, []
    for step in range(steps):
        if rng.random() < p_add:
            r = new_req(step)
            s.add(r)
            live.append(r)
        if live and rng.random() < p_abort:
            s.abort(rng.choice(live).request_id)
        run_step(s)
        used = sum(1 for b in s.kv.pool.blocks if b.ref_cnt > 0)
        assert used + s.kv.num_free_blocks == total
        owned = {}
        for r in s.running:
            for bid in r.block_ids:
                owned[bid] = owned.get(bid, 0) + 1
        assert all(s.kv.pool.blocks[b].ref_cnt == c for b, c in owned.items())
    steps = 0
    while s.has_work():
        run_step(s)
        steps += 1
        assert steps < drain_limit, "no progress"
    assert s.kv.num_free_blocks == total
    return live


def test_random_workload_keeps_pool_consistent():
    rng = random.Random(0)
    s = make(num_blocks=12, budget=10, max_seqs=4)
    drive_random(s, rng, lambda step: req(rng.randint(1, 20), max_tokens=rng.randint(1, 12),
                                          start=rng.choice([0, 0, 500])), steps=400, p_add=0.3, p_abort=0.05)


# a waiting prompt whose next uncached block a running request is computing waits for it
def make_wait(wait=True, **kw):
    kv = KVCacheManager(kw.pop("num_blocks", 32), BS)
    cfg = SchedulerConfig(kw.pop("max_seqs", 8), kw.pop("budget", 64), True, wait_for_inflight_prefix=wait)
    return Scheduler(cfg, kv, 1000)


def shared(n_prefix, suffix_start, n_suffix=2, rid=None, max_tokens=1, prefix_start=0):
    """A prompt: n_prefix tokens from prefix_start (the shared prefix) then its own suffix."""
    return Request(list(range(prefix_start, prefix_start + n_prefix)) + list(range(suffix_start, suffix_start + n_suffix)),
                   SamplingParams(max_tokens=max_tokens, temperature=0), request_id=rid,
                   eos_token_ids=(99999,), block_size=BS)


def test_prompt_sharing_a_cold_prefix_waits_and_hits_instead_of_recomputing():
    s = make_wait()
    a, b = shared(12, 500, rid="a"), shared(12, 600, rid="b")   # 3 shared blocks + 2 own tokens each
    s.add(a)
    s.add(b)
    batch, _ = run_step(s)
    assert [r.request_id for r in batch.reqs] == ["a"] and batch.num_new_tokens == [14]
    assert b.status is Status.WAITING and b.num_prefix_waits == 1
    batch, _ = run_step(s)
    assert [r.request_id for r in batch.reqs] == ["b"] and batch.num_new_tokens == [2]
    assert b.num_cached_tokens == 12
    assert s.kv.pool.queries == 28 and s.kv.pool.hits == 12     # b's lookup counted once, when admitted

    off = make_wait(wait=False)                 # the same two prompts without waiting: both compute it
    a, b = shared(12, 500, rid="a"), shared(12, 600, rid="b")
    off.add(a)
    off.add(b)
    batch, _ = run_step(off)
    assert batch.num_new_tokens == [14, 14] and b.num_cached_tokens == 0

    nocache = Scheduler(SchedulerConfig(8, 64, True), KVCacheManager(32, BS, enable_caching=False), 1000)
    a, b = shared(12, 500, rid="a"), shared(12, 600, rid="b")   # no prefix cache: waiting would gain nothing
    nocache.add(a)
    nocache.add(b)
    batch, _ = run_step(nocache)
    assert batch.num_new_tokens == [14, 14] and b.num_prefix_waits == 0


def test_waiting_on_a_chunked_prefix_lets_unrelated_prompts_pass():
    s = make_wait(budget=8)
    a = shared(20, 500, rid="a")                # 5 shared blocks, chunked 8 tokens a step
    b = shared(20, 600, rid="b")
    c = Request(list(range(900, 902)), SamplingParams(max_tokens=1, temperature=0), request_id="c",
                eos_token_ids=(99999,), block_size=BS)
    for r in (a, b, c):
        s.add(r)
    batch, _ = run_step(s)
    assert [r.request_id for r in batch.reqs] == ["a"] and batch.num_new_tokens == [8]
    batch, _ = run_step(s)                      # a's next chunk leaves no budget
    assert [r.request_id for r in batch.reqs] == ["a"] and batch.num_new_tokens == [8]
    batch, _ = run_step(s)                      # a: 6 left (4 shared + 2 own); c passes b
    assert [r.request_id for r in batch.reqs] == ["a"] + ["c"] and batch.num_new_tokens == [6, 2]
    assert b.status is Status.WAITING and c.status is Status.FINISHED_LENGTH
    batch, _ = run_step(s)                      # a finished at its last token; b hits all 5 blocks
    assert [r.request_id for r in batch.reqs] == ["b"] and batch.num_new_tokens == [2]
    assert b.num_cached_tokens == 20 and b.num_prefix_waits == 1   # passed over once (step 3)


def test_prompt_stops_waiting_when_the_prefix_owner_is_aborted_or_preempted():
    s = make_wait(budget=4)
    a, b = shared(12, 500, rid="a"), shared(12, 600, rid="b")
    s.add(a)
    s.add(b)
    run_step(s)                                 # a: first block
    assert b.status is Status.WAITING
    s.abort("a")
    batch, _ = run_step(s)                      # nobody computes the prefix now: b does, from a's cached block
    assert [r.request_id for r in batch.reqs] == ["b"] and b.num_cached_tokens == 4

    s = make_wait(num_blocks=6, budget=4)       # a preempted by an older request's growth
    old = Request(list(range(700, 707)), SamplingParams(max_tokens=12, temperature=0), request_id="old",
                  eos_token_ids=(99999,), block_size=BS)
    a, b = shared(12, 500, rid="a"), shared(12, 600, rid="b")
    for r in (old, a, b):
        s.add(r)
    steps = 0
    while s.has_work():
        run_step(s)
        steps += 1
        assert steps < 200, "no progress"
    assert all(r.status is Status.FINISHED_LENGTH for r in (old, a, b))
    assert a.num_preemptions + b.num_preemptions > 0 and s.kv.num_free_blocks == 6


def test_random_shared_prefix_workload_with_waiting_finishes_and_stays_consistent():
    rng = random.Random(1)
    s = make_wait(num_blocks=16, budget=8, max_seqs=4)
    live = drive_random(s, rng, lambda step: shared(rng.choice([8, 12, 20]), 10_000 + step * 7,
                                                    n_suffix=rng.randint(1, 5), max_tokens=rng.randint(1, 6),
                                                    prefix_start=100 * rng.randrange(6)),
                        steps=500, p_add=0.35, p_abort=0.03, drain_limit=500)
    assert sum(r.num_prefix_waits for r in live) > 0
    assert all(r.is_finished for r in live)


def test_the_stop_rule_the_router_shares():
    """engine/rules.py is the one stop rule: the scheduler's verdicts, and the router's (it calls
    finish_reason for the first token, which the prefill worker sampled)."""
    from pdcluster.engine.rules import blocks_for_lifetime, finish_reason
    s = make(max_len=20)
    cases = [((4, 7, False), None), ((1, 7, False), "length"), ((4, 99999, False), "stop"),
             ((4, 99999, True), None), ((4, 3, False), "stop"), ((20, 7, False), None)]
    for (max_tokens, tok, ignore), want in cases:
        p = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=ignore, stop_token_ids=[3])
        r = Request(list(range(11)), p, eos_token_ids=(99999,), block_size=BS)
        r.append_token(tok)
        got = s.stop_status(r, tok)
        assert (got.value if got else None) == want, (max_tokens, tok, ignore)
        assert finish_reason(tok, 1, 12, p, (99999,), 20) == want
    assert finish_reason(7, 1, 20, SamplingParams(max_tokens=4), (), 20) == "length"     # the context is full
    assert blocks_for_lifetime(5, 3, 4) == 2 and blocks_for_lifetime(5, 4, 4) == 3


def test_a_connector_that_cannot_receive_refuses_a_remote_reservation_and_keeps_nothing():
    s = make(num_blocks=8)                                      # the plain KVConnector: no KV from outside
    with pytest.raises(NotImplementedError):
        s.add_remote(req(9, rid="r"))
    assert not s.requests and s.kv.num_free_blocks == 8


def test_long_prefill_threshold_lets_a_short_prompt_in_beside_a_long_ones_chunks():
    """long_prefill_token_threshold (vLLM's per-request chunk cap): a 40-token prompt computes at most 8
    tokens a step, so a 3-token prompt that arrives behind it is admitted in the next step and gets its
    first token there. Control: without the cap the long prompt takes the whole 16-token budget each
    step and the short one waits for its last chunk."""
    def short_first_token_step(threshold):
        kv = KVCacheManager(64, BS)
        s = Scheduler(SchedulerConfig(8, 16, True, threshold), kv, 1000, None)
        s.add(req(40, rid="long"))
        steps, chunks = 0, []
        short = None
        while short is None or not short.num_output_tokens:
            batch, _ = run_step(s)
            steps += 1
            chunks.append(dict(zip([r.request_id for r in batch.reqs], batch.num_new_tokens)))
            if steps == 1:
                short = req(3, start=500, rid="short")
                s.add(short)
        return steps, chunks
    steps, chunks = short_first_token_step(8)
    assert steps == 2 and chunks == [{"long": 8}, {"long": 8, "short": 3}]
    steps, chunks = short_first_token_step(0)
    assert steps == 3 and chunks == [{"long": 16}, {"long": 16}, {"long": 8, "short": 3}]


def test_long_prefill_threshold_is_checked():
    with pytest.raises(ValueError, match="long_prefill_token_threshold must be >= 0"):
        SchedulerConfig(long_prefill_token_threshold=-5)


@pytest.mark.parametrize("kw, says", [
    # only the CLI's flag parser held these: LLM(max_num_seqs=0) built, and generate() then spun for ever
    (dict(max_num_seqs=0), "max_num_seqs must be >= 1"),
    (dict(max_num_batched_tokens=-1), "max_num_batched_tokens must be >= 1"),
])
def test_a_step_that_could_schedule_nothing_is_refused(kw, says):
    with pytest.raises(ValueError, match=says):
        SchedulerConfig(**kw)


@pytest.mark.parametrize("kw, says", [
    (dict(block_size=0), "block_size and num_blocks must be >= 1"),          # was a ZeroDivisionError at load
    (dict(num_blocks=0), "block_size and num_blocks must be >= 1"),
    (dict(memory_fraction=1.5), "memory_fraction must be in"),
    (dict(protected_fraction=-0.1), "protected_fraction in"),
])
def test_cache_sizes_out_of_range_are_refused(kw, says):
    from pdcluster.engine.config import CacheConfig
    with pytest.raises(ValueError, match=says):
        CacheConfig(**kw)


@pytest.mark.parametrize("kw, says", [
    # LLM(...) keywords reach the tree without the flags' checks: each of these built, then failed later (a
    # TypeError at allocation, an OverflowError, set_num_threads' RuntimeError) or ran on (NaN drafts: ~4x slower)
    (dict(kv_cache_memory=float("inf")), "kv_cache_memory must be an integer"),
    (dict(kv_cache_memory=0), "kv_cache_memory must be > 0"),
    (dict(host_cache_gb=float("inf")), "host_cache_gb must be a finite number"),
    (dict(host_cache_gb=10**400), "host_cache_gb must be a finite number"),     # no float holds it (OverflowError)
    (dict(num_blocks=float("nan")), "num_blocks must be an integer"),
    (dict(max_num_seqs=1.5), "max_num_seqs must be an integer"),
    (dict(enable_prefix_caching="false"), "enable_prefix_caching must be True or False"),
    (dict(num_threads=-1), "num_threads must be >= 1"),
    (dict(spec_ngram_k=float("nan")), "spec_ngram_k must be an integer"),
    (dict(max_model_len=100.5), "max_model_len must be in"),
])
def test_offline_keywords_of_the_wrong_kind_are_refused(kw, says):
    from pdcluster.engine.llm_engine import build_config
    with pytest.raises(ValueError, match=says):
        build_config(None, **kw)


def test_numpy_integers_are_integers():
    import numpy as np

    from pdcluster.engine.llm_engine import build_config
    assert build_config(None, max_num_seqs=np.int64(8)).sched.max_num_seqs == 8


class _LoadsTwoBlocks(KVConnector):
    """A lower tier holding the first 2 blocks (8 tokens) of `only`'s prompts (None: all), loaded before the step,
    always whole, `delay` steps after the first."""
    def __init__(self, only=None, delay=0):
        self.only, self.delay, self.steps, self.started = only, delay, 0, []

    def external_tokens(self, req, num_local_tokens):
        return 8 if num_local_tokens == 0 and (self.only is None or req.request_id in self.only) else 0

    def after_alloc(self, req, block_ids, num_external_tokens):
        if num_external_tokens:
            self.started.append(req.request_id)

    def finished_loading(self):
        self.steps += 1
        if self.steps <= self.delay:
            return []
        out, self.started = [(r, True) for r in self.started], []
        return out


def _req(rid, prompt, max_tokens):
    return Request(prompt, SamplingParams(max_tokens=max_tokens, temperature=0), request_id=rid, eos_token_ids=(99999,),
                   block_size=BS)


@pytest.mark.parametrize("case", ["two holders", "a holder behind a self-preempted request"])
def test_requests_whose_loads_ended_without_room_for_their_tails_never_wait_on_each_other(case):
    """A load that ends with no room for its request's tail leaves the request waiting with the loaded blocks.
    Before, nothing gave those back: the waiting loop stops at the first request that does not fit and preemption
    takes only running ones. So two holders, or one behind a request that preempted itself for want of the
    holder's blocks, waited forever. Now a holder's blocks go back (cached: hits again) when another needs room.
    6-block pool: A and B each load 2 blocks of 17-token prompts; or A (4 tokens, 20 outputs: the whole pool in
    its lifetime) runs while B's load of 2 blocks takes 12 steps."""
    if case == "two holders":
        conn, a, b = _LoadsTwoBlocks(), _req("A", list(range(17)), 1), _req("B", list(range(100, 117)), 1)
    else:
        conn = _LoadsTwoBlocks({"B"}, delay=12)
        a, b = _req("A", list(range(4)), 20), _req("B", list(range(100, 109)), 1)
    s = Scheduler(SchedulerConfig(8, 64), KVCacheManager(6, BS), 1000, conn)
    s.add(a)
    s.add(b)
    for _ in range(80):
        s.loads_done(conn.finished_loading())
        batch = s.schedule()
        s.update(batch, [7 if batch.samples(i) else None for i in range(len(batch))])
        if a.is_finished and b.is_finished:
            break
    assert a.is_finished and b.is_finished and s.kv.num_free_blocks == 6 and not s.has_work()
    assert a.num_output_tokens == a.params.max_tokens and b.num_output_tokens == 1


def test_drafts_only_when_the_last_token_is_the_one_left_to_compute():
    """With a 1-token chunk cap a resumed request (outputs already) computes its prompt a token a step: a chunk of
    one is not its last token, and drafts appended after that token broke the step's update."""
    from pdcluster.engine.spec.decoder import SpecDecoder
    s = Scheduler(SchedulerConfig(8, 64, long_prefill_token_threshold=1), KVCacheManager(64, BS), 1000,
                  spec=SpecDecoder())
    r = Request([1, 2, 3, 1, 2, 3, 1, 2], SamplingParams(max_tokens=20, temperature=0), request_id="m",
                block_size=BS, output_token_ids=[3, 1, 2, 3])
    s.add(r)
    for _ in range(11):                                 # 12 tokens to compute, one a step
        batch = s.schedule()
        assert batch.num_new_tokens == [1] and r.spec_token_ids == []
        s.update(batch, [7 if batch.samples(i) else None for i in range(len(batch))])
    batch = s.schedule()                                # the last one: drafts may follow it (n-grams match)
    assert batch.num_new_tokens == [1 + len(r.spec_token_ids)]


def test_a_max_model_len_past_the_models_context_is_refused():
    """It was capped at the model's 8,192 without a word; vLLM refuses it too."""
    from pdcluster.engine.llm_engine import build_config
    assert build_config(max_model_len=4096).max_model_len == 4096
    for bad in (0, 8193):
        with pytest.raises(ValueError, match=r"max_model_len must be in \[1, 8192\]"):
            build_config(max_model_len=bad)
