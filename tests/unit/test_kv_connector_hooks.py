"""The scheduler side of the KV connector seam (engine/kv_connector.py), without torch: tokens a
connector supplies from outside (a cache tier, a peer) are loaded instead of computed, and blocks a
connector still reads outlive their finished request until it lets go."""
from pdcluster.engine.config import SchedulerConfig
from pdcluster.engine.kv_cache_manager import KVCacheManager
from pdcluster.engine.kv_connector import KVConnector
from pdcluster.engine.request import Request, Status
from pdcluster.engine.sampling_params import SamplingParams
from pdcluster.engine.scheduler import Scheduler

BS = 4


class Tier(KVConnector):
    """Holds the KV of the first `prefix` tokens of the prompts of `only` (None: of every prompt)."""
    def __init__(self, prefix, hold=False, only=None):
        self.prefix, self.hold, self.only = prefix, hold, only
        self.asked, self.loads, self.done, self.sent = [], {}, [], []

    def external_tokens(self, request, num_local_tokens):
        self.asked.append((request.request_id, num_local_tokens))
        if self.only is not None and request.request_id not in self.only:
            return 0
        return max(0, min(self.prefix, request.num_prompt_tokens - 1) - num_local_tokens)

    def after_alloc(self, request, block_ids, num_external_tokens):
        self.loads[request.request_id] = (list(block_ids), num_external_tokens)

    def finished_loading(self):
        out, self.done = self.done, []
        return out

    def request_finished(self, request_id, block_ids):
        return self.hold

    def finished_sending(self):
        out, self.sent = self.sent, []
        return out


def make(connector, num_blocks=16, budget=16):
    return Scheduler(SchedulerConfig(8, budget, True), KVCacheManager(num_blocks, BS), 1000, connector)


def req(n, rid, max_tokens=2, start=0):
    return Request(list(range(start, start + n)), SamplingParams(max_tokens=max_tokens, temperature=0),
                   request_id=rid, eos_token_ids=(99999,), block_size=BS)


def step(s, tok=7):
    b = s.schedule()
    return b, s.update(b, [tok if b.samples(i) else None for i in range(len(b))])


def test_tokens_from_a_tier_are_loaded_not_computed_then_the_rest_is_computed():
    t = Tier(prefix=8)
    s = make(t)
    r = req(10, "r")
    s.add(r)
    b, _ = step(s)
    assert b.reqs == [] and r.status is Status.WAITING_FOR_REMOTE_KV    # nothing computed while loading
    assert t.loads == {"r": (r.block_ids, 8)} and len(r.block_ids) == 2 and s.has_work()
    b, _ = step(s)
    assert b.reqs == []                                                 # still loading: not stepped
    t.done.append(("r", True))
    s.loads_done(t.finished_loading())
    assert r.num_computed_tokens == 8 and r.num_cached_tokens == 8 and r.status is Status.WAITING
    b, _ = step(s)
    assert b.reqs == [r] and b.num_new_tokens == [2] and r.output_token_ids == [7]   # only the tail
    assert s.kv.pool.lookup(r.block_hashes()[0]) is not None           # loaded blocks are published


def test_local_hits_come_first_and_the_connector_is_asked_only_for_the_rest():
    t = Tier(prefix=12)
    s = make(t)
    warm = req(9, "warm", max_tokens=1)
    t.prefix = 0
    s.add(warm)
    step(s)                                                             # caches 2 blocks (8 tokens)
    t.prefix = 12
    r = req(14, "r")
    s.add(r)
    step(s)
    assert t.asked[-1] == ("r", 8) and t.loads["r"][1] == 4 and len(t.loads["r"][0]) == 1


def test_a_failed_load_frees_its_blocks_and_the_prompt_is_recomputed():
    t = Tier(prefix=8)
    s = make(t)
    r = req(10, "r")
    s.add(r)
    step(s)
    free_while_loading = s.kv.num_free_blocks
    t.prefix = 0                                                        # the tier lost it
    t.done.append(("r", False))
    s.loads_done(t.finished_loading())
    assert s.kv.num_free_blocks == free_while_loading + 2 and r.num_computed_tokens == 0
    b, _ = step(s)
    assert b.reqs == [r] and b.num_new_tokens == [10]


def test_abort_while_loading_frees_everything_and_a_late_completion_is_ignored():
    t = Tier(prefix=8)
    s = make(t)
    s.add(req(10, "r"))
    step(s)
    s.abort("r")
    assert not s.has_work() and s.kv.num_free_blocks == 16
    t.done.append(("r", True))
    s.loads_done(t.finished_loading())
    assert not s.has_work() and s.kv.num_free_blocks == 16


def test_a_load_waits_for_room_like_any_admission():
    t = Tier(prefix=8, only={"r"})
    s = make(t, num_blocks=4, budget=16)
    a, r = req(13, "a", max_tokens=1, start=100), req(10, "r")
    s.add(a)                                                            # 13 tokens: all 4 blocks
    s.add(r)
    b, fin = step(s)
    assert b.reqs == [a] and fin == [a]
    assert "r" not in t.loads and r.status is Status.WAITING and not r.block_ids   # no room: nothing taken
    b, _ = step(s)                                                      # a freed its blocks
    assert b.reqs == [] and t.loads == {"r": (r.block_ids, 8)} and len(r.block_ids) == 2


def test_blocks_held_for_sending_outlive_the_request_until_the_connector_lets_go():
    t = Tier(prefix=0, hold=True)
    s = make(t)
    r = req(8, "r", max_tokens=1)
    s.add(r)
    _, fin = step(s)
    assert fin == [r] and r.is_finished and "r" in s.held
    assert s.kv.num_free_blocks == 16 - 2 and s.has_work()              # still allocated
    t.sent.append("r")
    s.sends_done(t.finished_sending())
    assert not s.held and s.kv.num_free_blocks == 16 and not s.has_work()


class InStep(Tier):
    """A tier that loads inside the step, layer by layer (load_in_step True)."""
    loads_in_step = True

    def load_in_step(self, request):
        return self.loads_in_step and request.request_id in self.loads


def test_an_in_step_load_counts_as_computed_and_the_tail_runs_in_the_same_step():
    t = InStep(prefix=8)
    s = make(t)
    r = req(10, "r")
    s.add(r)
    b, _ = step(s)
    assert b.reqs == [r] and b.num_new_tokens == [2] and r.output_token_ids == [7]   # loaded + tail, one step
    assert t.loads == {"r": (r.block_ids[:2], 8)} and r.num_cached_tokens == 8 and not s.loading
    assert s.kv.pool.lookup(r.block_hashes()[1]) is not None           # published once the step ran
    # control: the same tier loading before the step leaves the request waiting, nothing computed
    t2 = InStep(prefix=8)
    t2.loads_in_step = False
    s2 = make(t2)
    r2 = req(10, "r2")
    s2.add(r2)
    b, _ = step(s2)
    assert b.reqs == [] and r2.status is Status.WAITING_FOR_REMOTE_KV


def test_an_in_step_load_starts_only_with_room_for_its_tail_too():
    """Before, the load took its 2 blocks and the request waited holding them for its tail's room: blocks that
    nothing could take back (being written in the step), on which two such requests could wait for each other."""
    t = InStep(prefix=8)
    s = make(t, num_blocks=4)
    hog = req(4, "hog", max_tokens=8, start=500)
    t.only = {"r"}
    s.add(hog)
    step(s)                                                             # hog: 1 block, 2 once it decodes
    r = req(10, "r")
    s.add(r)
    b, _ = step(s)                                                      # room for 2 loaded blocks, not the tail
    assert b.reqs == [hog] and r.status is Status.WAITING and r.num_computed_tokens == 0 and r.block_ids == []
    assert not t.loads
    s.finish(hog, Status.FINISHED_ABORTED)
    b, _ = step(s)
    assert b.reqs == [r] and b.num_new_tokens == [2] and len(t.loads) == 1      # not loaded twice


def test_a_failed_in_step_load_drops_the_step_frees_unpublished_blocks_and_recomputes():
    """failed_in_step named the request after its step's forward pass: loads_failed gives back every
    block (the loaded ones were never published), the step's results for it are dropped (`without`),
    and it recomputes its whole prompt; the batch-mate's step stands."""
    t = InStep(prefix=8, only={"r"})
    s = make(t)
    other = req(5, "other", start=300)
    r = req(10, "r")
    s.add(other)
    s.add(r)
    b = s.schedule()
    assert b.reqs == [other, r] and b.num_new_tokens == [5, 2] and r.num_computed_tokens == 8
    loaded = r.block_ids[:2]
    assert s.loads_failed(["r", "unknown"]) == {"r"}                   # the connector's report, after the pass
    b2, sampled = b.without({"r"}, [7, 7])
    assert b2.reqs == [other] and b2.num_new_tokens == [5] and sampled == [7]
    s.update(b2, sampled)
    assert r.status is Status.WAITING and s.waiting[0] is r and r.block_ids == [] and r.num_computed_tokens == 0
    assert r.output_token_ids == [] and all(s.kv.pool.lookup(h) is None for h in r.block_hashes()[:2])
    assert all(s.kv.pool.blocks[i].ref_cnt == 0 for i in loaded)       # nothing leaked
    assert other.output_token_ids == [7]
    t.only = set()                                                      # the tier lost the prefix (dropped)
    b, _ = step(s)
    assert r in b.reqs and b.num_new_tokens[b.reqs.index(r)] == 10 and r.output_token_ids == [7]   # recomputed
