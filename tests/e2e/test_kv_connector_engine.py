"""The KV connector seam on the real model: one engine saves a prompt's KV through save_layer, a
second engine loads it through external_tokens/after_alloc/finished_loading instead of computing it,
and both give the same greedy tokens (the path the host/disk tiers and peer pulls take)."""
import pytest
import torch

from pdcluster.engine import SamplingParams
from pdcluster.engine.kv_connector import KVConnector
from pdcluster.engine.llm_engine import LLMEngine, build_config

PROMPT = ("You are a careful physics teacher. Explain, in three short sentences a child could follow, why "
          "the sky looks blue during the day, why it turns red and orange at sunset, and why clouds stay "
          "white while the sky around them changes colour.")


class Capture(KVConnector):
    """Copies every completing prompt's blocks, all layers, to host tensors keyed by request id."""
    saves = True

    def __init__(self):
        self.kv = {}                        # rid -> ([K per layer], [V per layer]), [blocks, bs, heads, dim]

    def save_layer(self, layer, k_caches, v_caches, completing):
        for p in completing:
            ids = torch.tensor(p.block_ids)
            ks, vs = self.kv.setdefault(p.request_id, ([], []))
            ks.append(k_caches[layer][ids].clone())
            vs.append(v_caches[layer][ids].clone())


class Peer(KVConnector):
    """Loads the first `blocks` blocks of request `rid`'s prompt from a Capture, cast to the caches'
    dtype as the KV receiver lands them (a no-op where the two engines' dtypes agree)."""

    def __init__(self, src, blocks, block_size, rid="src"):
        self.src, self.blocks, self.bs, self.rid = src, blocks, block_size, rid
        self.loaded, self.done = {}, []

    def register_caches(self, k_caches, v_caches):
        self.k, self.v = k_caches, v_caches

    def external_tokens(self, request, num_local_tokens):
        return max(0, self.blocks * self.bs - num_local_tokens)

    def after_alloc(self, request, block_ids, num_external_tokens):
        ks, vs = self.src.kv[self.rid]
        first = request.num_computed_tokens // self.bs          # local hits come first
        ids = torch.tensor(block_ids)
        for layer in range(len(self.k)):
            self.k[layer][ids] = ks[layer][first:first + len(block_ids)].to(self.k[layer].dtype)
            self.v[layer][ids] = vs[layer][first:first + len(block_ids)].to(self.v[layer].dtype)
        self.loaded[request.request_id] = num_external_tokens
        self.done.append((request.request_id, True))

    def finished_loading(self):
        out, self.done = self.done, []
        return out


def run(engine, ids, rid, salt=None, max_tokens=12):
    req = engine.add_request(ids, SamplingParams(max_tokens=max_tokens, temperature=0), request_id=rid,
                             cache_salt=salt)
    while not req.is_finished:
        engine.step()
    return req


@pytest.fixture(scope="module")
def engines():
    cfg = build_config(kv_cache_memory=32 * 2**20, max_num_batched_tokens=512)
    return LLMEngine(cfg, connector=Capture()), LLMEngine(cfg)


def test_kv_loaded_through_the_connector_gives_the_tokens_of_computing_it(engines):
    src, dst = engines
    ids = src.tokenizer.encode(PROMPT, add_special_tokens=False)
    bs = src.cfg.cache.block_size
    ref = run(src, ids, "src")
    n_blocks = (len(ids) - 1) // bs
    assert n_blocks >= 2 and len(src.connector.kv["src"][0]) == src.cfg.model.num_layers
    dst.connector = peer = Peer(src.connector, n_blocks, bs)
    before = dst.stats.tokens
    out = run(dst, ids, "dst")
    assert peer.loaded == {"dst": n_blocks * bs}
    tail = len(ids) - n_blocks * bs
    assert dst.stats.tokens - before == tail + len(out.output_token_ids) - 1    # the prompt's tail, then decodes
    assert out.num_cached_tokens == n_blocks * bs
    assert out.output_token_ids == ref.output_token_ids


def test_garbage_loaded_through_the_connector_changes_the_tokens(engines):
    """The check above can fail: the loaded KV is what the tokens are computed from."""
    src, dst = engines
    ids = src.tokenizer.encode(PROMPT, add_special_tokens=False)
    ref = run(src, ids, "src-2")
    src.connector.kv["src"] = tuple([torch.randn_like(t) for t in ts] for ts in src.connector.kv["src-2"])
    bs = src.cfg.cache.block_size
    dst.connector = peer = Peer(src.connector, (len(ids) - 1) // bs, bs)
    out = run(dst, ids, "dst-2", salt="fresh")  # salted: no local prefix hit from the first test
    assert peer.loaded == {"dst-2": (len(ids) - 1) // bs * bs}
    assert out.output_token_ids != ref.output_token_ids
