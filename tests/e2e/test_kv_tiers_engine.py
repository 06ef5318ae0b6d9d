"""KV cache tiers on the real model (the session's float32 engine): a prompt evicted from the device
pool comes back from the host tier (layer by layer, inside the step that computes its tail), then
from the disk tier after a restart of the tiers (layer by layer too, each layer checked; and whole
blocks before that step with layer-wise loads off), and greedy decoding gives the tokens of computing
it, while the engine computes only the prompt's tail. The control: garbage in the (unchecksummed)
host tier changes the tokens, so the equality checks can fail. A disk file corrupt in a middle layer,
found while its step runs: the step's work for the prompt is dropped and it is recomputed, same tokens.
More corruption cases: tests/unit/test_kv_tiers.py, tests/unit/test_kv_tiers_disk_layerwise.py."""
import pytest
import torch

from pdcluster.engine import SamplingParams
from pdcluster.engine.hashing import block_hashes
from pdcluster.engine.kv_connector import KVConnector
from pdcluster.kv_transfer.tiers import MultiConnector, TierConfig, TierConnector

PROMPT = ("You are a careful physics teacher. Explain, in three short sentences a child could follow, why "
          "the sky looks blue during the day, why it turns red and orange at sunset, and why clouds stay "
          "white while the sky around them changes colour.")
SALT = "kv-tiers-e2e"               # no other test's cached blocks share these hashes


def run(engine, ids, rid, max_tokens=6):
    """The finished request; req.first_step: the engine steps until its first token."""
    req = engine.add_request(ids, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                             request_id=rid, cache_salt=SALT)
    steps = 0
    while not req.is_finished:
        engine.step()
        steps += 1
        if req.output_token_ids and not hasattr(req, "first_step"):
            req.first_step = steps
    return req


def evict_all(engine, tiers):
    """Memory pressure: every free block is handed out once (the pool evicts the cached ones, the tiers
    copy them out), then freed uncached; wait for the writer."""
    pool = engine.kv.pool
    pool.free(pool.allocate(pool.num_free_blocks))
    assert tiers.wait_idle()


def use(engine, cfg, inner=None):
    tiers = TierConnector(cfg, engine.block_events())
    engine.connector = MultiConnector(tiers, inner or KVConnector())
    assert tiers.wait_idle()
    return tiers


@pytest.fixture
def engine(llm):
    llm.engine.kv.pool.reset_prefix_cache()     # other tests' cached blocks would crowd the small tiers
    yield llm.engine
    llm.engine.connector = KVConnector()        # the session's engine goes back to no tiers


def test_prompt_evicted_from_device_reloads_from_host_then_disk_and_garbage_changes_it(engine, tmp_path):
    bb = engine.kv_block_bytes()
    ids = engine.tokenizer.encode(PROMPT, add_special_tokens=False)
    bs = engine.cfg.cache.block_size
    n_blocks = (len(ids) - 1) // bs
    hashes = set(block_hashes(ids, bs, SALT)[:n_blocks])
    tiers = use(engine, TierConfig(host_bytes=64 * bb, disk_dir=str(tmp_path), disk_bytes=64 * (bb + 256)))
    engine.block_events().drain()
    ref = run(engine, ids, "tiers-ref")                          # computed: the no-tier tokens
    assert ref.num_cached_tokens == 0
    evict_all(engine, tiers)
    stored = {"host": set(), "disk": set()}
    for _, kind, hs, tier in engine.block_events().drain()[1]:
        if kind == "stored" and tier != "device":
            stored[tier].update(hs)
    assert hashes <= stored["host"] and hashes <= stored["disk"]

    def check(rid, tier, in_step):
        before = engine.stats.tokens
        out = run(engine, ids, rid)
        assert (out.first_step == 1) == in_step         # else empty steps poll the loader first
        figs = {f["tier"]: f for f in tiers.figures()}
        assert figs[tier]["hits"] == n_blocks                    # not vacuous: the tier served the prefix
        assert out.num_cached_tokens == n_blocks * bs
        assert engine.stats.tokens - before == len(ids) - n_blocks * bs + 5   # the tail, then 5 decodes
        assert out.output_token_ids == ref.output_token_ids
    check("tiers-host", "host", True)          # loaded layer by layer inside the step that computes the tail

    evict_all(engine, tiers)
    assert tiers.snapshot.skipped >= n_blocks                    # held below already: not copied again
    tiers.close()
    tiers = use(engine, TierConfig(disk_dir=str(tmp_path), disk_bytes=64 * (bb + 256)))   # a restart: disk only
    announced = {h for _, kind, hs, tier in engine.block_events().drain()[1] if tier == "disk" for h in hs}
    assert hashes <= announced
    check("tiers-disk", "disk", True)          # layer by layer too, each layer checked before it is copied
    evict_all(engine, tiers)
    tiers.close()
    tiers = use(engine, TierConfig(disk_dir=str(tmp_path), disk_bytes=64 * (bb + 256), layerwise=False))
    check("tiers-disk-whole", "disk", False)   # --kv-tier-block-loads: whole blocks, checked, before the step
    tiers.close()

    # the control: garbage in the host tier (no checksum there) is what the tokens are computed from
    tiers = use(engine, TierConfig(host_bytes=64 * bb))
    evict_all(engine, tiers)
    for c in tiers.host.chunks:
        c.normal_()
    out = run(engine, ids, "tiers-garbage")
    assert tiers.figures()[0]["hits"] == n_blocks and out.output_token_ids != ref.output_token_ids
    tiers.close()


def test_a_layer_corrupt_on_disk_is_found_in_step_and_the_prompt_recomputed_with_the_same_tokens(engine, tmp_path):
    """A bit flipped in a middle layer of a middle block's file: the layer-wise load stops there, the
    engine drops the step's work for the prompt (no token), the prompt recomputes from the blocks
    before the bad one (loaded again from disk), and the tokens are those of computing it all."""
    bb, bs = engine.kv_block_bytes(), engine.cfg.cache.block_size
    ids = engine.tokenizer.encode(PROMPT, add_special_tokens=False)
    n_blocks = (len(ids) - 1) // bs
    tiers = use(engine, TierConfig(disk_dir=str(tmp_path), disk_bytes=64 * (bb + 256)))
    ref = run(engine, ids, "corrupt-ref")
    evict_all(engine, tiers)
    c = n_blocks // 2
    path = tmp_path / f"{block_hashes(ids, bs, SALT)[c]:016x}.kvb"
    raw = bytearray(path.read_bytes())
    raw[tiers.disk.header_bytes + (engine.cfg.model.num_layers // 2) * tiers.disk.row_data + 3] ^= 0x08
    path.write_bytes(raw)
    before = engine.stats.tokens
    out = run(engine, ids, "corrupt")
    disk = tiers.figures()[0]
    assert out.output_token_ids == ref.output_token_ids
    assert disk["corrupt"] == 1 and disk["load_failures"] == 1
    assert tiers.wait_idle()        # the bad file was dropped; the recomputed block is written through again,
    tiers.disk.read(block_hashes(ids, bs, SALT)[c])                        # intact this time (no CorruptBlock)
    assert disk["hits"] == c and out.num_cached_tokens == c * bs          # the blocks before the bad one
    tail = len(ids) - n_blocks * bs
    assert engine.stats.tokens - before == tail + (len(ids) - c * bs) + 5  # the dropped step, the recompute, decodes
    tiers.close()


class PrefillStandIn(KVConnector):
    """The transfer's two ends on one engine: while a prompt computes it keeps its blocks' KV (as a
    prefill worker sends it, every layer as it is stored); a reservation's blocks are filled from
    that copy (as the receiver lands the frames)."""
    saves = True

    def __init__(self):
        self.kept, self.fill = {}, {}

    def save_layer(self, layer, k_caches, v_caches, completing):
        for c in completing:
            ids = torch.tensor(c.block_ids)
            self.kept.setdefault(c.request_id, {})[layer] = (k_caches[layer].index_select(0, ids),
                                                             v_caches[layer].index_select(0, ids))

    def after_alloc(self, request, block_ids, num_external_tokens):
        self.fill[request.request_id] = list(block_ids)

    def land(self, engine, src: str, dst: str, skip: int) -> None:
        k_caches, v_caches = engine.kv_caches()
        ids = torch.tensor(self.fill[dst])
        for layer, (k, v) in self.kept[src].items():
            k_caches[layer][ids], v_caches[layer][ids] = k[skip:], v[skip:]

    def take_loaded(self, request_id):
        return None


def test_a_reservation_loads_the_prefix_its_host_tier_holds_and_only_the_rest_crosses(engine):
    """A decode engine's reservation for a remote prefill (reserve_remote) takes the prompt's blocks its
    host tier holds from there (in step) and asks the prefill side for the rest only; decoding from
    that KV gives the tokens of computing the prompt. Control: garbage in the host tier changes them."""
    bb, bs = engine.kv_block_bytes(), engine.cfg.cache.block_size
    ids = engine.tokenizer.encode(PROMPT, add_special_tokens=False)
    n_blocks = (len(ids) - 1) // bs
    inner = PrefillStandIn()
    tiers = use(engine, TierConfig(host_bytes=64 * bb), inner)
    ref = run(engine, ids, "res-ref", 4)                         # computed: its KV kept, its tokens the reference
    assert ref.num_cached_tokens == 0 and len(inner.kept["res-ref"]) == engine.cfg.model.num_layers
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)

    def reserved(rid):
        evict_all(engine, tiers)                                 # the prefix is in the host tier only
        hits0 = tiers.figures()[0]["hits"]
        r = engine.reserve_remote(ids, params, rid, SALT)
        assert r.skip_blocks == n_blocks and r.cached_tokens == n_blocks * bs   # the tier's blocks do not cross
        assert len(r.block_ids) == -(-len(ids) // bs) - n_blocks == len(inner.fill[rid])
        inner.land(engine, "res-ref", rid, r.skip_blocks)
        engine.connector.wait_loaded(rid, 10)
        engine.start_remote(rid, ref.output_token_ids[0])
        req = engine.scheduler.requests[rid]
        while not req.is_finished:
            engine.step()
        assert tiers.figures()[0]["hits"] - hits0 == n_blocks
        return req.output_token_ids

    assert reserved("res-1") == ref.output_token_ids
    for c in tiers.host.chunks:
        c.zero_()
    assert reserved("res-2") != ref.output_token_ids
    tiers.close()


def test_a_prefix_the_device_pool_never_evicted_comes_back_from_disk_after_a_restart(engine, tmp_path):
    """Write-through (the default): computed blocks go below at once, so a prefix still in the device
    pool when the worker stops (a hot system prompt: the LRU frees a request's tail first, so its head
    may never be evicted) is on disk for the restarted worker. Control: write-back stores a block only
    when the device pool evicts it, and the restart finds none of this prompt (the head was missing
    from disk before the change, which broke the whole chain)."""
    bb, bs = engine.kv_block_bytes(), engine.cfg.cache.block_size
    ids = engine.tokenizer.encode(PROMPT, add_special_tokens=False)
    n_blocks = (len(ids) - 1) // bs
    for write_through in (False, True):
        engine.kv.pool.reset_prefix_cache()
        d = str(tmp_path / f"wt-{write_through}")
        tiers = use(engine, TierConfig(host_bytes=64 * bb, disk_dir=d, disk_bytes=64 * (bb + 256),
                                       write_through=write_through))
        ref = run(engine, ids, f"wt-{write_through}-ref")          # computed; it stays in the device pool
        assert ref.num_cached_tokens == 0 and tiers.wait_idle()
        assert engine.kv.pool.lookup(block_hashes(ids, bs, SALT)[0]) is not None     # never evicted
        tiers.close()
        engine.kv.pool.reset_prefix_cache()                         # the restart: an empty device pool
        tiers = use(engine, TierConfig(disk_dir=d, disk_bytes=64 * (bb + 256)))
        out = run(engine, ids, f"wt-{write_through}-restarted")
        disk_hits = tiers.figures()[0]["hits"]
        tiers.close()
        if write_through:
            assert (out.num_cached_tokens, disk_hits) == (n_blocks * bs, n_blocks)
            assert out.output_token_ids == ref.output_token_ids
        else:
            assert (out.num_cached_tokens, disk_hits) == (0, 0)


EXITS_AFTER_GENERATE = """
import sys
from pdcluster.engine import LLM, SamplingParams
llm = LLM(disk_cache_dir=sys.argv[1], disk_cache_gb=1.0, kv_cache_memory=64 * 2**20)
prompts = [[(7 * i + 13 * j) % 40000 + 100 for i in range(256)] for j in range(6)]     # 6 x 16 full blocks
llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0))
"""


def test_an_offline_llm_stores_every_queued_block_before_its_script_exits(tmp_path):
    """The tiers' writer is a daemon thread: a script that ended right after generate() lost the blocks
    still queued (about half in the review's run; here it even aborted, SIGABRT, in the interpreter's
    teardown), so its next run came back colder. The LLM now drains the writer at exit (and at close(),
    or as a context manager)."""
    import subprocess
    import sys
    d = tmp_path / "tier"
    r = subprocess.run([sys.executable, "-c", EXITS_AFTER_GENERATE, str(d)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(list(d.glob("*.kvb"))) == 6 * 16 and not list(d.glob(".*.tmp"))
