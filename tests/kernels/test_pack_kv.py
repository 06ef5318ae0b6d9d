"""pack_kv / unpack_kv (Triton) against their torch references; exact round trip unquantized,
int8/fp8 within the documented quantization error."""
import pytest
import torch

from pdcluster.kernels import pack_kv, pack_kv_ref, unpack_kv, unpack_kv_ref

KVH, D, NUM_BLOCKS = 3, 16, 12


def _caches(block_size, device):
    k = torch.randn(NUM_BLOCKS, block_size, KVH, D, device=device) * torch.rand(NUM_BLOCKS, 1, 1, 1, device=device) * 4
    v = torch.randn_like(k)
    k[5] = 0.0                                                    # an all-zero block: scale 0
    return k, v


def _bound(x: torch.Tensor, scales: torch.Tensor, quant: str) -> torch.Tensor:
    """Per-element error bound: int8 scale/2; fp8 e4m3 half-ulp |y|/16 + subnormal step (2^-10)."""
    s = scales[:, :, None, None, None]
    if quant == "int8":
        return s / 2 + 1e-6
    return x.abs() / 16 + s * 2.0 ** -10 + 1e-6


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("quant", [None, "int8", "fp8"])
def test_pack_unpack_match_reference(device, quant, block_size):
    kc, vc = _caches(block_size, device)
    ids = [7, 2, 5, 11]                                           # out of order, includes the zero block
    buf, scales = pack_kv(kc, vc, ids, quant=quant)
    buf_ref, scales_ref = pack_kv_ref(kc, vc, ids, quant=quant)
    assert buf.dtype == buf_ref.dtype and buf.shape == (2, 4, block_size, KVH, D)
    if quant is None:
        assert scales is None and torch.equal(buf, buf_ref)
    else:
        assert torch.equal(scales, scales_ref)
        # Same arithmetic, but the interpreter may carry x * (qmax / amax) at a different precision,
        # so a value within an ulp of a rounding tie can land on the neighbouring code: allow one
        # quantization step on a tiny fraction of elements, and nothing else.
        deq, deq_ref = buf.float() * scales[..., None, None, None], buf_ref.float() * scales[..., None, None, None]
        step = 2 * _bound(deq_ref, scales, quant)
        diff = (deq - deq_ref).abs()
        assert bool((diff <= step + 1e-6).all()), float((diff - step).max())
        assert (diff > 0).float().mean().item() <= 0.01
        assert scales[0, 2].item() == 0.0 and not buf[0, 2].float().any()

    # scatter into other blocks of a poisoned pool; untouched blocks stay NaN
    dst = [0, 9, 3, 4]
    k2 = torch.full_like(kc, float("nan"))
    v2 = torch.full_like(vc, float("nan"))
    k2r, v2r = k2.clone(), v2.clone()
    unpack_kv(buf, scales, k2, v2, dst)
    unpack_kv_ref(buf, scales, k2r, v2r, dst)
    assert torch.equal(k2.nan_to_num(7.0), k2r.nan_to_num(7.0)) and torch.equal(v2.nan_to_num(7.0), v2r.nan_to_num(7.0))
    others = [b for b in range(NUM_BLOCKS) if b not in dst]
    assert torch.isnan(k2[others]).all() and torch.isfinite(k2[dst]).all()

    x = torch.stack((kc[ids], vc[ids]))
    y = torch.stack((k2[dst], v2[dst]))
    if quant is None:
        assert torch.equal(x, y)                                  # exact round trip
    else:
        err = (x - y).abs()
        assert (err <= _bound(x, scales, quant)).all(), f"max error {err.max().item():.3e}"
        assert err.max() > 0                                      # it did quantize


def test_pack_kv_empty_and_tensor_ids(device):
    kc, vc = _caches(16, device)
    buf, scales = pack_kv(kc, vc, torch.tensor([], dtype=torch.int64, device=device), quant="int8")
    assert buf.shape == (2, 0, 16, KVH, D) and scales.shape == (2, 0)
    buf, _ = pack_kv(kc, vc, torch.tensor([3, 1], dtype=torch.int32, device=device))
    assert torch.equal(buf[1, 0], vc[3])


def test_pack_kv_rejects_bad_inputs():
    kc, vc = _caches(16, "cpu")
    with pytest.raises(ValueError, match="quant must be one of"):
        pack_kv(kc, vc, [1], quant="int4")
    with pytest.raises(ValueError, match="contiguous"):
        pack_kv(kc.transpose(1, 2), vc.transpose(1, 2), [1])
    buf, scales = pack_kv_ref(kc, vc, [1, 2], quant="int8")
    with pytest.raises(ValueError, match="needs contiguous float32 scales"):
        unpack_kv(buf, None, kc, vc, [1, 2])
    with pytest.raises(ValueError, match="buffer must be contiguous"):
        unpack_kv(buf, scales, kc, vc, [1])


def test_fp8_rounding_edges(device):
    # amax 448 makes the scale exactly 1, so these values reach the rounding unchanged: ties to even
    # inside a binade (17, 19, 31 -> 16, 20, 32), carries into the next binade (31.9, 63.9, 127.9),
    # subnormals and their ties (2^-10 -> 0, 3 * 2^-10 -> 2^-8), the 448 maximum.
    edges = [448.0, 17.0, 19.0, 31.0, 31.9, 63.9, 127.9, 1.99, 0.999, 2.0 ** -10, 3 * 2.0 ** -10,
             0.0123, 2.0 ** -6 * 1.0625, 300.0, 447.0]
    kc = torch.zeros(2, 16, 1, 16, device=device)
    vals = torch.tensor(edges + [-e for e in edges], device=device)
    kc[0].view(-1)[: len(vals)] = vals
    buf, scales = pack_kv(kc, kc.clone(), [0], quant="fp8")
    assert scales[0, 0].item() == 1.0
    want = vals.to(torch.float8_e4m3fn)
    got = buf[0, 0].view(-1)[: len(vals)]
    # bit-exact, except that a negative value rounded to zero may come out as +0 (Triton 3.7's
    # interpreter drops the sign there; 3.9 keeps it): -0 and +0 unpack to the same 0.0
    zero = want.float() == 0
    assert torch.equal(got.view(torch.uint8)[~zero], want.view(torch.uint8)[~zero]), (got.float() - want.float()).tolist()
    assert (got.float()[zero] == 0).all()
