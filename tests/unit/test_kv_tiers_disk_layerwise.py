"""Disk-tier hits loaded layer by layer inside the step (kv_transfer/tiers/load_back.py), small CPU
caches, no model: bit for bit as stored (float, and an int8 / fp8 pool's own codes), overlapped (layer 0
is in while layer 1 still copies), each layer checked before it is copied: a corrupt layer is never
copied, the file is dropped and the request named by failed_in_step, with no pin left behind."""
import pytest
import torch

from tests.unit.test_kv_tiers import BLOCK_BYTES, L, QUANT_BYTES, caches, evict_and_wipe, gated_layer_load, kinds, req, tiers
from tests.unit.test_kv_tiers_quant import evict_wipe_alloc, quant_caches


def start(tc, rid, block_ids):
    r = req(rid)
    n = tc.external_tokens(r, 0)
    r.block_ids = list(block_ids)
    tc.after_alloc(r, r.block_ids, n)
    return r, n


def test_a_disk_hit_loads_layer_by_layer_in_step_bit_for_bit(tmp_path):
    tc, _, k, v = tiers(tmp_path, host_blocks=0, layerwise=True)
    want = evict_and_wipe(tc, k, v, 3)
    gated_layer_load(tc, k, v, want)                        # layer 0 is in while layer 1 still copies
    tc.wait_loaded("a2", 10)
    assert tc.failed_in_step() == [] and tc.finished_loading() == []
    disk = {f["tier"]: f for f in tc.figures()}["disk"]
    assert disk["hits"] == 3 and disk["corrupt"] == 0
    assert all(e.pins == 0 for e in tc.index["disk"].entries.values())
    tc.close()


@pytest.mark.parametrize("layer", [0, 1])
def test_a_corrupt_layer_on_disk_is_never_copied_and_fails_the_in_step_load(tmp_path, layer):
    """One bit flipped in block 1's K rows of `layer`: layers before it load, it and every later one are
    not copied at all (the blocks keep what they held), the file is deleted and announced removed, the
    request is named once by failed_in_step (the engine drops its step and recomputes), no pin remains;
    the blocks before the corrupt one still load next time."""
    tc, events, k, v = tiers(tmp_path, host_blocks=0, layerwise=True)
    want = evict_and_wipe(tc, k, v, 3)
    events.drain()
    h = req("a").block_hashes()[1]
    p = tmp_path / f"{h:016x}.kvb"
    raw = bytearray(p.read_bytes())
    raw[tc.disk.header_bytes + layer * tc.disk.row_data + 5] ^= 0x10
    p.write_bytes(raw)
    for c in k + v:
        c.fill_(7.0)                                        # what the blocks hold before the load
    r, n = start(tc, "a2", [5, 6, 7])
    assert n == 12 and tc.load_in_step(r)
    for l in range(L):
        tc.wait_layer(l)                                    # returns: the load ended (failed)
    tc.wait_loaded("a2", 10)
    assert tc.failed_in_step() == ["a2"] and tc.failed_in_step() == [] and tc.finished_loading() == []
    for l in range(L):
        if l < layer:
            assert torch.equal(k[l][5:8], want[l][0]) and torch.equal(v[l][5:8], want[l][1])
        else:
            assert bool((k[l][5:8] == 7.0).all()) and bool((v[l][5:8] == 7.0).all())   # nothing of it copied
    assert not p.exists() and kinds(events) == [("removed", "disk", 1)]
    disk = {f["tier"]: f for f in tc.figures()}["disk"]
    assert disk["corrupt"] == 1 and disk["hits"] == 0 and disk["load_failures"] == 1
    assert all(e.pins == 0 for e in tc.index["disk"].entries.values())
    assert tc.external_tokens(req("a3"), 0) == 4            # block 0 still loads; the chain stops at the bad one
    tc.close()


def test_a_corrupt_header_fails_before_any_layer_is_copied(tmp_path):
    tc, _, k, v = tiers(tmp_path, host_blocks=0, layerwise=True)
    evict_and_wipe(tc, k, v, 2)
    p = tmp_path / f"{req('a').block_hashes()[0]:016x}.kvb"
    raw = bytearray(p.read_bytes())
    raw[20] ^= 1                                            # the fingerprint field
    p.write_bytes(raw)
    r, _ = start(tc, "a2", [4, 5])
    tc.wait_loaded("a2", 10)
    assert tc.failed_in_step() == ["a2"] and not p.exists() and not any(c[4:6].any() for c in k + v)
    tc.close()


@pytest.mark.parametrize("codec", ["int8", "fp8"])
def test_a_quantized_pool_loads_disk_hits_layer_by_layer_as_its_own_codes(tmp_path, codec):
    """A native int8 / fp8 pool: its codes and scales come back from disk layer by layer, bit for bit."""
    k, v = quant_caches(codec, seed=8)
    tc, _, k, v = tiers(tmp_path, kv=(k, v), host_blocks=0, layerwise=True)
    assert tc.geom.native and tc.geom.codec == codec
    want, r2, n = evict_wipe_alloc(tc, k + v, 3, [5, 6, 7])
    assert n == 12 and tc.load_in_step(r2)
    for layer in range(L):
        tc.wait_layer(layer)
        for c, (codes, scales) in ((k[layer], want[layer]), (v[layer], want[L + layer])):
            assert torch.equal(c.data[5:8].view(torch.uint8), codes.view(torch.uint8))
            assert torch.equal(c.scale[5:8], scales)
    tc.wait_loaded("a2", 10)
    assert tc.failed_in_step() == [] and {f["tier"]: f for f in tc.figures()}["disk"]["hits"] == 3
    tc.close()


def test_a_quantized_pools_corrupt_scale_is_caught_in_its_layer(tmp_path):
    """The scales are under the row crcs too: a flipped scale bit of layer 1's V fails that layer."""
    k, v = quant_caches("int8", seed=9)
    tc, _, k, v = tiers(tmp_path, kv=(k, v), host_blocks=0, layerwise=True)
    tc.evicted([0, 1], req("a").block_hashes()[:2])
    assert tc.wait_idle()
    p = tmp_path / f"{req('a').block_hashes()[0]:016x}.kvb"
    raw = bytearray(p.read_bytes())
    g = tc.geom
    raw[tc.disk.header_bytes + g.data_bytes + (L + 1) * tc.disk.row_scale + 2] ^= 0x20   # row L+1: V of layer 1
    p.write_bytes(raw)
    r, _ = start(tc, "a2", [4, 5])
    tc.wait_layer(0)
    tc.wait_loaded("a2", 10)
    assert tc.failed_in_step() == ["a2"] and not p.exists()
    tc.close()


def test_a_read_cannot_be_fooled_by_swapped_rows(tmp_path):
    """Whole-block reads (warm-restart scan, peer pulls) check every row's crc: two rows swapped in
    place (each intact on its own) are caught."""
    tc, _, k, v = tiers(tmp_path, host_blocks=0)
    h = req("a").block_hashes()[0]
    k[0][0].fill_(1.0)
    k[1][0].fill_(2.0)
    tc.evicted([0], [h])
    assert tc.wait_idle()
    p = tmp_path / f"{h:016x}.kvb"
    raw = bytearray(p.read_bytes())
    o, n = tc.disk.header_bytes, tc.disk.row_data
    raw[o:o + n], raw[o + n:o + 2 * n] = raw[o + n:o + 2 * n], raw[o:o + n]
    p.write_bytes(raw)
    assert tc.read_blocks([h]) is None and not p.exists()
    tc.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_disk_hit_loads_layer_by_layer_on_the_copy_stream(tmp_path):
    k, v = caches(11)
    tc, _, k, v = tiers(tmp_path, kv=([t.cuda() for t in k], [t.cuda() for t in v]), host_blocks=0, layerwise=True)
    want = evict_and_wipe(tc, k, v, 3)
    r, n = start(tc, "a2", [5, 6, 7])
    assert n == 12 and tc.load_in_step(r)
    got = []
    for layer in range(L):
        tc.wait_layer(layer)                        # the current stream waits on the layer's copy event
        got.append((k[layer][5:8].clone(), v[layer][5:8].clone()))
    torch.cuda.synchronize()
    assert all(torch.equal(g[0], w[0]) and torch.equal(g[1], w[1]) for g, w in zip(got, want))
    tc.close()


@pytest.mark.parametrize("codec", ["int8", "fp8"])
def test_a_float_pools_quantized_host_and_disk_blocks_load_layer_by_layer_as_the_whole_block_load_does(tmp_path, codec):
    """Tier codec int8 / fp8 over a float pool (lossy below the device): a layer-wise load of one host and
    two disk blocks decodes each layer to exactly what the whole-block load gives."""
    got = {}
    for layerwise in (False, True):
        kv = caches(12)
        tc, _, k, v = tiers(tmp_path / str(layerwise), host_blocks=QUANT_BYTES / BLOCK_BYTES, codec=codec, kv=kv, layerwise=layerwise)
        evict_and_wipe(tc, k, v, 3)
        r, n = start(tc, "a2", [5, 6, 7])
        assert n == 12 and tc.load_in_step(r) == layerwise
        for layer in range(L if layerwise else 0):
            tc.wait_layer(layer)
        tc.wait_loaded("a2", 10)
        assert tc.failed_in_step() == [] and tc.finished_loading() == ([] if layerwise else [("a2", True)])
        st = {f["tier"]: f["hits"] for f in tc.figures()}
        assert st == {"host": 1, "disk": 2}
        got[layerwise] = [c[5:8].clone() for c in k + v]
        tc.close()
    assert all(torch.equal(a, b) and a.abs().max() > 0 for a, b in zip(got[False], got[True]))
