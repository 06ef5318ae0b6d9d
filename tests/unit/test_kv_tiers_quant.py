"""Tiers over a quantized device pool (engine/kv_quant.py QuantKV, int8 / fp8): its own codes and scales
go below and come back bit for bit (kv_transfer/tiers/block_format.py's "native" geometry), small CPU
caches, no model."""
import time

import pytest
import torch

from tests.unit.test_kv_tiers import BLOCK_BYTES, BS, D, H, L, NB, QUANT_BYTES, req, tiers


def quant_caches(codec="int8", seed=5):
    """An int8 / fp8 device pool (engine/kv_quant.py), codes and scales random."""
    from pdcluster.engine.kv_quant import new_quant_kv_pair
    g = torch.Generator().manual_seed(seed)
    k, v = [], []
    for _ in range(L):
        kc, vc = new_quant_kv_pair(codec, (NB, BS, H, D), torch.float32, lambda s, d: torch.zeros(s, dtype=d))
        for c in (kc, vc):
            c.data.copy_(torch.randint(-127, 128, c.data.shape, generator=g).to(c.data.dtype))
            c.scale.copy_(torch.rand(c.scale.shape, generator=g) + 0.01)
        k.append(kc)
        v.append(vc)
    return k, v


def evict_wipe_alloc(tc, caches, n: int, into: list[int]):
    """Blocks 0..n-1 of a quantized pool evicted to the tiers, the pool wiped, a request for the same
    prompt allocated `into`: (the codes and scales it must get back per layer row, that request, its
    external tokens)."""
    want = [(c.data[:n].clone(), c.scale[:n].clone()) for c in caches]
    tc.evicted(list(range(n)), req("a").block_hashes()[:n])
    assert tc.wait_idle()
    for c in caches:
        c.data.zero_()
        c.scale.zero_()
    r2 = req("a2")
    ext = tc.external_tokens(r2, 0)
    r2.block_ids = list(into)
    tc.after_alloc(r2, r2.block_ids, ext)
    return want, r2, ext


@pytest.mark.parametrize("layerwise", [False, True])
def test_a_quantized_device_pool_goes_below_as_its_own_codes_and_comes_back_bit_for_bit(tmp_path, layerwise):
    """An int8 KV cache: the tiers keep its codes and scales (no float round trip, a quarter of float32's
    bytes), host and disk, whole-block and layer-wise loads."""
    k, v = quant_caches()
    tc, _, k, v = tiers(tmp_path, kv=(k, v), host_blocks=2 * QUANT_BYTES / BLOCK_BYTES, layerwise=layerwise)
    host = tc.figures()[0]
    assert tc.geom.native and tc.geom.codec == "int8" and (host["block_bytes"], host["capacity_blocks"]) == (QUANT_BYTES, 2)
    want, r2, n = evict_wipe_alloc(tc, k + v, 3, [5, 6, 7])
    assert n == 12 and tc.load_in_step(r2) == layerwise     # block 0 from disk, 1 and 2 from host
    if layerwise:
        for layer in range(L):
            tc.wait_layer(layer)
        tc.wait_loaded("a2", 10)                        # (its figures are counted once it ends)
        assert tc.failed_in_step() == []
    else:
        deadline = time.monotonic() + 10
        while not (done := tc.finished_loading()) and time.monotonic() < deadline:
            time.sleep(0.001)
        assert done == [("a2", True)]
    for c, (codes, scales) in zip(k + v, want):
        assert torch.equal(c.data[5:8], codes) and torch.equal(c.scale[5:8], scales)
    st = {f["tier"]: f for f in tc.figures()}
    assert st["disk"]["hits"] == 1 and st["host"]["hits"] == 2
    tc.close()


def test_a_quantized_device_pool_loads_host_hits_layer_by_layer():
    k, v = quant_caches("fp8", seed=6)
    tc, _, k, v = tiers(None, kv=(k, v), layerwise=True)
    want, r2, n = evict_wipe_alloc(tc, k + v, 2, [4, 5])
    assert n == 8 and tc.load_in_step(r2)
    for layer in range(L):
        tc.wait_layer(layer)
        for c, (codes, scales) in ((k[layer], want[layer]), (v[layer], want[L + layer])):
            assert torch.equal(c.data[4:6].view(torch.uint8), codes.view(torch.uint8)) and torch.equal(c.scale[4:6], scales)
    tc.close()


def test_a_quantized_pool_refuses_another_tier_codec():
    from pdcluster.engine.config import CacheConfig, EngineConfig, ModelConfig
    with pytest.raises(ValueError, match="int8 KV cache keeps its own codes"):
        tiers(None, kv=quant_caches(), codec="fp8")
    m = ModelConfig("t", "t", vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                    num_kv_heads=1, head_dim=4)
    with pytest.raises(ValueError, match=r"tier codec \(--kv-tier-codec\) must be none or int8"):
        EngineConfig(m, cache=CacheConfig(tier_codec="fp8"), kv_cache_dtype="int8")
    EngineConfig(m, cache=CacheConfig(tier_codec="int8"), kv_cache_dtype="int8")         # its own codec: fine
