"""Frames landing in caches of another format (kv_transfer/receiver.py CacheWriter): an int8 frame
into an int8 cache (engine/kv_quant.py QuantKV) is copied as codes + scales, never dequantized; every
other pairing converts at the boundary. Also the prefill side: a quantized cache ships float blocks."""
import pytest
import torch

from pdcluster.engine.kv_quant import QuantKV, new_quant_kv
from pdcluster.kv_transfer import codec as kvcodec
from pdcluster.kv_transfer import wire
from pdcluster.kv_transfer.connectors import _blocks
from pdcluster.kv_transfer.receiver import InboundStream, KVReceiver, TransferState, cache_writer

pytestmark = [pytest.mark.timeout(60), pytest.mark.filterwarnings("ignore:The given buffer is not writable")]

NB, BLOCK = 8, (4, 2, 8)                   # cache blocks, [block_size, kv_heads, head_dim]
IDS = [6, 1, 2]


def _quant_caches(codec, layers=1):
    z = lambda s, d: torch.zeros(s, dtype=d)   # noqa: E731
    return ([new_quant_kv(codec, (NB, *BLOCK), torch.float32, z) for _ in range(layers)],
            [new_quant_kv(codec, (NB, *BLOCK), torch.float32, z) for _ in range(layers)])


def _land(caches, codec, dtype=torch.float32, seed=0):
    """One layer of IDS sent under `codec` through decode_frame + a reservation; the sent K, V."""
    g = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(len(IDS), *BLOCK, generator=g).to(dtype) for _ in range(2))
    rx = KVReceiver()
    pt = rx.expect("r", IDS, 1, cache_writer(*caches))
    InboundStream(rx).feed(wire.encode_frame("r", 0, IDS, k, v, codec=codec))
    assert pt.state is TransferState.COMPLETE
    return k, v


def test_int8_frame_lands_in_int8_cache_as_codes(monkeypatch):
    kc, vc = _quant_caches("int8")
    monkeypatch.setattr(kvcodec, "decode", lambda *a: pytest.fail("an int8 frame was dequantized"))
    k, v = _land((kc, vc), "int8")
    for cache, x in ((kc[0], k), (vc[0], v)):
        q, s = kvcodec.encode("int8", x)                     # what the sender put on the wire
        assert torch.equal(cache.data[IDS], q) and torch.equal(cache.scale[IDS], s)
        assert cache.data[[0, 3]].abs().sum() == 0           # other blocks untouched


@pytest.mark.parametrize("codec", ["none", "fp8"])
def test_other_frames_are_converted_into_an_int8_cache(codec):
    kc, vc = _quant_caches("int8")
    k, v = _land((kc, vc), codec)
    sent = k if codec == "none" else kvcodec.decode(*kvcodec.encode("fp8", k), torch.float32)
    q, s = kvcodec.encode("int8", sent)
    assert torch.equal(kc[0].data[IDS], q) and torch.equal(kc[0].scale[IDS], s)
    err = (kc[0].dequant(torch.tensor(IDS)) - k).abs().max()
    assert 0 < err < (0.03 if codec == "none" else 0.3)


def test_int8_frame_into_a_bfloat16_cache_is_decoded_and_cast():
    kc, vc = [torch.zeros(NB, *BLOCK, dtype=torch.bfloat16)], [torch.zeros(NB, *BLOCK, dtype=torch.bfloat16)]
    k, v = _land((kc, vc), "int8")
    want = kvcodec.decode(*kvcodec.encode("int8", v), torch.float32).to(torch.bfloat16)
    assert torch.equal(vc[0][IDS], want)


def test_float32_frame_into_bfloat16_cache_takes_the_converting_path():
    """A raw frame of another dtype cannot land byte for byte: target() hands no views (staged)."""
    kc, vc = [torch.zeros(NB, *BLOCK, dtype=torch.bfloat16)], [torch.zeros(NB, *BLOCK, dtype=torch.bfloat16)]
    rx = KVReceiver()
    pt = rx.expect("r", IDS, 1, cache_writer(kc, vc))
    k = torch.randn(len(IDS), *BLOCK)
    h, _, _ = wire.decode_frame(wire.encode_frame("r", 0, IDS, k, k))
    assert pt.target(h)[1] is None
    pt.write(h, k, k)
    assert torch.equal(kc[0][IDS], k.to(torch.bfloat16)) and pt.state is TransferState.COMPLETE
    same = [torch.zeros(NB, *BLOCK)], [torch.zeros(NB, *BLOCK)]          # control: same dtype -> views
    assert KVReceiver().expect("s", IDS, 1, cache_writer(*same)).target(h)[1] is not None


def test_bad_shape_is_refused_for_a_quantized_cache():
    kc, vc = _quant_caches("int8")
    with pytest.raises(ValueError, match="cache blocks are"):
        cache_writer(kc, vc)(0, [0], torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 2, 8))


def test_quantized_prefill_cache_ships_its_blocks_dequantized():
    kc, _ = _quant_caches("int8")
    x = torch.randn(2, *BLOCK)
    q, s = kvcodec.encode("int8", x)
    kc[0].data[[3, 5]], kc[0].scale[[3, 5]] = q, s
    out = _blocks(kc[0], torch.tensor([3, 5]))
    assert isinstance(kc[0], QuantKV) and out.dtype == torch.float32
    assert torch.equal(out, kvcodec.decode(q, s, torch.float32))
    assert torch.equal(kvcodec.encode("int8", out)[0], q)         # re-encoding gives the same codes back
