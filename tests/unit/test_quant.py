"""Weight-only quantization (engine/quant/): formats, GGUF block mapping, torch's int4pack layouts,
the CPU linears against their references, which weights a mode packs, and both loaders."""
import json
import os
import platform

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize, quantize as gguf_quantize  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from pdcluster.engine.loader import load_model_config, load_weights  # noqa: E402
from pdcluster.engine.quant.cpu_linear import (LAYOUTS, Dyn8Linear, Int4Linear, Int8Linear,  # noqa: E402
                                               fbgemm_usable, int4pack_layout, unpack_int4pack)
from pdcluster.engine.quant.gguf_blocks import native_kind, to_packed  # noqa: E402
from pdcluster.engine.quant.layers import embed_rows, fuse  # noqa: E402
from pdcluster.engine.quant.packed import (Int4Weight, Int8Weight, cat_rows, dequantize, quantize_int4,  # noqa: E402
                                           quantize_int8)
from pdcluster.engine.quant.layers import quant_linear  # noqa: E402
from pdcluster.engine.quant.policy import check_mode, cpu_kernel, weight_kind  # noqa: E402

G = torch.Generator().manual_seed(0)


def _w(n, k, scale=0.1):
    return torch.randn(n, k, generator=G) * scale


# formats

def test_quantizers_round_to_nearest():
    w = _w(24, 96)
    w[3, :32] = 0.25                                   # a constant group is exact
    q4, q8 = quantize_int4(w), quantize_int8(w)
    err4 = (dequantize(q4) - w).abs().view(24, 3, 32)
    assert (err4 <= q4.scale.unsqueeze(-1) / 2 + 1e-6).all()
    assert torch.equal(dequantize(q4)[3, :32], w[3, :32])
    assert ((dequantize(q8) - w).abs() <= q8.scale.unsqueeze(-1) / 2 + 1e-7).all()
    assert q4.q.dtype == torch.uint8 and q4.q.shape == (24, 48) and q8.q.dtype == torch.int8
    with pytest.raises(ValueError, match="divisible by 32"):
        quantize_int4(_w(4, 40))


def test_rows_and_fusion():
    a, b = quantize_int4(_w(8, 64)), quantize_int4(_w(4, 64))
    both = cat_rows([a, b])
    torch.testing.assert_close(dequantize(both), torch.cat([dequantize(a), dequantize(b)]), rtol=0, atol=0)
    idx = torch.tensor([3, 0, 7])
    torch.testing.assert_close(dequantize(a.rows(idx)), dequantize(a)[idx], rtol=0, atol=0)
    # int4 beside int8 (a Q4_K_M file's Q6_K attn_v): all int8, each within its own rounding
    c = quantize_int8(_w(4, 64))
    mixed = cat_rows([a, c])
    assert mixed.kind == "int8"
    ref = torch.cat([dequantize(a), dequantize(c)])
    assert ((dequantize(mixed) - ref).abs() <= mixed.scale.unsqueeze(-1) / 2 + 1e-6).all()
    f = fuse([_w(4, 64), b])                                 # a float part is quantized to its neighbours' kind
    assert isinstance(f, Int4Weight) and f.shape == (8, 64)
    e = quantize_int8(_w(10, 64))
    ids = torch.tensor([9, 2, 2])
    torch.testing.assert_close(embed_rows(e, ids, torch.float32), dequantize(e)[ids])


# GGUF blocks

def _q4k_blocks(n_rows, k, seed=0):
    """Random valid Q4_K rows (gguf cannot quantize to Q4_K): finite f16 d and dmin, any other bytes."""
    rng = np.random.default_rng(seed)
    nb = k // 256
    b = rng.integers(0, 256, (n_rows, nb, 144), dtype=np.uint8)
    b[..., 0:2] = np.abs(rng.normal(0, 0.01, (n_rows, nb, 1))).astype(np.float16).view(np.uint8)
    b[..., 2:4] = np.abs(rng.normal(0, 0.01, (n_rows, nb, 1))).astype(np.float16).view(np.uint8)
    return b.reshape(n_rows, nb * 144)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q4_K])
def test_gguf_4bit_types_map_exactly(qtype):
    N, K = 16, 512
    data = _q4k_blocks(N, K) if qtype == T.Q4_K else gguf_quantize(_w(N, K).numpy(), qtype)
    ref = torch.from_numpy(gguf_dequantize(data, qtype).reshape(N, K)).double()
    p = to_packed(data, qtype, (N, K))
    assert isinstance(p, Int4Weight) and native_kind(qtype) == "int4"
    # the same values up to float32 rounding of zero = m + 8 d (one rounding, not a requantization)
    torch.testing.assert_close(dequantize(p).double(), ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())


def test_gguf_q8_0_requantized_per_row_within_bound():
    N, K = 16, 256
    w = _w(N, K)
    w[:, :32] *= 8                                           # one block per row with an 8x larger scale
    data = gguf_quantize(w.numpy(), T.Q8_0)
    exact = torch.from_numpy(gguf_dequantize(data, T.Q8_0).reshape(N, K))
    p = to_packed(data, T.Q8_0, (N, K))
    assert isinstance(p, Int8Weight)
    d_max = exact.abs().amax(-1, keepdim=True) / 127            # the row's largest block scale, at most
    err = (dequantize(p) - exact).abs()
    assert (err <= d_max / 2 + 1e-7).all()                       # the documented bound
    assert torch.equal(dequantize(p)[:, :32], exact[:, :32]) or err[:, :32].max() < 1e-6   # largest block kept


def test_gguf_other_types_go_through_a_load_time_quantizer():
    N, K = 8, 64
    data = gguf_quantize(_w(N, K).numpy(), T.Q5_0)
    exact = torch.from_numpy(gguf_dequantize(data, T.Q5_0).reshape(N, K))
    assert native_kind(T.Q5_0) == "int8" and native_kind(T.Q3_K) == "int4" and native_kind(T.F16) is None
    p = to_packed(data, T.Q5_0, (N, K))
    assert isinstance(p, Int8Weight) and ((dequantize(p) - exact).abs() <= p.scale[:, None] / 2 + 1e-7).all()
    p4 = to_packed(data, T.Q5_0, (N, K), "int4")
    assert isinstance(p4, Int4Weight)


# torch's int4pack layouts

def _pack_like_torch(codes: torch.Tensor, block: int, kind: str) -> torch.Tensor:
    """aten's weight_to_int4pack_kernel for one of its builds, in Python (int4mm_kernel.cpp)."""
    N, K = codes.shape
    out = []
    for start in range(0, N, block):
        rows = codes[start:start + block]
        n = rows.shape[0]
        if n == block and kind == "split":
            half = block // 2
            byte = rows[:half] | (rows[half:] << 4)              # [half, K]: row j low, row j + half high
        else:
            byte = rows[0::2] | (rows[1::2] << 4)                 # pairs
        out.append(byte.t().reshape(-1))                          # [K, n / 2]
    return torch.cat(out).to(torch.uint8).view(N, K // 2)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("N", [64, 176, 48])
def test_unpack_int4pack_layouts(layout, N):
    codes = torch.randint(0, 16, (N, 64), generator=G, dtype=torch.int32)
    assert torch.equal(unpack_int4pack(_pack_like_torch(codes, *layout), N, 64, layout).int(), codes)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="layouts known for x86 builds")
def test_this_builds_int4pack_layout_is_known():
    layout = int4pack_layout()
    assert layout in LAYOUTS
    codes = torch.randint(0, 16, (96, 64), generator=G, dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    assert torch.equal(packed, _pack_like_torch(codes, *layout))


# CPU linears

def _bf16(t):
    return t.to(torch.bfloat16).double()


@pytest.mark.parametrize("N", [96, 40])                           # 40: padded to the kernel's 16 rows
@pytest.mark.parametrize("M", [1, 3, 70])                         # kernel, kernel, dense path
def test_int4_linear_matches_its_reference(N, M):
    w = quantize_int4(_w(N, 128))
    bias = torch.randn(N, generator=G)
    lin = Int4Linear(w, bias)
    # the weights the kernel multiplies by: scale and zero rounded to bfloat16, nothing else
    w_kernel = dequantize(Int4Weight(w.q, w.scale.bfloat16().float(), w.zero.bfloat16().float()))
    torch.testing.assert_close(lin.dequantize(), w_kernel, rtol=0, atol=0)
    x = torch.randn(M, 128, generator=G)
    ref = _bf16(x) @ w_kernel.double().t()
    y = lin(x)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    torch.testing.assert_close(y.double() - bias.double(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    # both paths compute one function: float32 sums of the same bfloat16 inputs, rounded to bfloat16
    torch.testing.assert_close(lin.kernel(x).double(), lin.dense(x).double(), rtol=8e-3, atol=1e-5)


@pytest.mark.parametrize("M", [1, 70])
def test_int8_linear_matches_its_reference(M):
    w = quantize_int8(_w(72, 128))
    lin = Int8Linear(w, None)
    x = torch.randn(M, 128, generator=G)
    ref = _bf16(x) @ (w.q.double() * _bf16(w.scale)[:, None]).t()
    torch.testing.assert_close(lin(x).double(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    torch.testing.assert_close(lin.kernel(x).double(), lin.dense(x).double(), rtol=8e-3, atol=1e-5)


needs_fbgemm = pytest.mark.skipif(not fbgemm_usable(), reason="torch built without the x86/fbgemm quantized engine")


@needs_fbgemm
@pytest.mark.parametrize("M", [1, 5, 32])
def test_fbgemm_int8_linear_within_its_activation_rounding_bound(M):
    """The weight is Int8Weight's exactly; only x is rounded: one (scale, zero point) over all of x,
    128 levels (reduce_range) spanning [min(x, 0), max(x, 0)], so each x moves by at most step / 2 and
    y[m, n] by at most step / 2 * sum_k |w[n, k]|."""
    w = quantize_int8(_w(72, 128))
    bias = torch.randn(72, generator=G)
    lin = Dyn8Linear(w, bias)
    assert torch.equal(lin.codes(), w.q) and torch.equal(lin.dequantize(), dequantize(w))
    x = torch.randn(M, 128, generator=G)
    ref = x.double() @ dequantize(w).double().t() + bias.double()
    step = (x.max().clamp(min=0) - x.min().clamp(max=0)).double() / 127
    bound = step / 2 * dequantize(w).double().abs().sum(1) + 1e-4
    err = (lin.kernel(x).double() - ref).abs()
    assert lin(x).dtype == torch.float32 and (err <= bound).all(), (err / bound).max()
    assert err.max() > 0.02 * bound.max()          # x really is rounded: the bound is not vacuous
    # control: a weight off by one code in one row breaks the bound there
    bad = Dyn8Linear(Int8Weight(w.q.clone().index_fill_(0, torch.tensor([3]), 100), w.scale), bias)
    assert not ((bad.kernel(x).double() - ref).abs() <= bound).all()
    # several rows: each row rounded on its own symmetric scale (amax / 127, 255 levels), so each row's
    # result is exactly what it would be alone in rows(), and within that row's own rounding bound
    if M > 1:
        x = x * torch.logspace(-2, 1, M).unsqueeze(1)                      # rows of unlike scales
        ref = x.double() @ dequantize(w).double().t() + bias.double()
        y = lin(x)
        assert y.dtype == torch.float32
        assert torch.equal(y, torch.cat([lin.rows(x[i:i + 1]) for i in range(M)]))
        row_step = x.abs().amax(1, keepdim=True).double() / 127
        row_bound = row_step / 2 * dequantize(w).double().abs().sum(1) + 1e-5 * ref.abs().amax(1, keepdim=True)
        row_err = (y.double() - ref).abs()
        assert (row_err <= row_bound).all(), (row_err / row_bound).max()
        assert (row_err.amax(1) > 0.02 * row_bound.amax(1)).all()       # every row rounded: not vacuous
        assert not ((bad(x).double() - ref).abs() <= row_bound).all()  # control: the bad weight shows


@needs_fbgemm
def test_fbgemm_int8_linear_dense_path_for_prefill_rows():
    w = quantize_int8(_w(72, 128))
    lin = Dyn8Linear(w, None)
    x = torch.randn(70, 128, generator=G)
    ref = _bf16(x) @ dequantize(w).double().t()
    torch.testing.assert_close(lin(x).double(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


def test_cpu_kernel_policy():
    assert cpu_kernel("int8", True) == "fbgemm" and cpu_kernel("int8", False) == "int8pack"
    assert cpu_kernel("int4", True) == cpu_kernel("int4", False) == "int4pack"
    assert cpu_kernel("int4", True, q4x8=True) == "q4x8"
    with pytest.raises(ValueError):
        cpu_kernel("int3", True)
    lin = quant_linear(quantize_int8(_w(16, 64)), None, "cpu")
    assert isinstance(lin, Dyn8Linear if fbgemm_usable() else Int8Linear)
    # int4: pdcluster's kernel where it builds (any whole groups of 32, any rows), torch's otherwise
    from pdcluster.engine.quant import q4x8
    for n, k in ((16, 64), (12, 96)):
        assert isinstance(quant_linear(quantize_int4(_w(n, k)), None, "cpu"),
                          q4x8.Q4x8Linear if q4x8.available() else Int4Linear)


# policy

def test_which_weights_a_mode_packs():
    q, emb, norm = "model.layers.3.self_attn.q_proj.weight", "model.embed_tokens.weight", "model.norm.weight"
    assert weight_kind(q, "int4") == "int4" and weight_kind(emb, "int4") == "int8"
    assert weight_kind(q, "int8") == weight_kind(emb, "int8") == "int8"
    assert weight_kind(norm, "int4") is None and weight_kind("model.layers.0.self_attn.q_proj.bias", "int8") is None
    assert weight_kind(q, "none", "int4") is None                 # GGUF dequantized
    assert weight_kind(q, None, "int4") == "int4" and weight_kind(emb, None, "int8") == "int8"
    assert weight_kind(q, None) is None                           # unset, HF: float
    with pytest.raises(ValueError, match="none, int8, int4"):
        check_mode("fp4")


# loaders

TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
            num_hidden_layers=2, vocab_size=80, rms_norm_eps=1e-6, max_position_embeddings=128)


def _tensors():
    E, F, V, D = 64, 96, 80, 16
    shapes = {"model.embed_tokens.weight": (V, E), "model.norm.weight": (E,)}
    for i in range(2):
        p = f"model.layers.{i}"
        shapes |= {f"{p}.self_attn.q_proj.weight": (4 * D, E), f"{p}.self_attn.k_proj.weight": (2 * D, E),
                   f"{p}.self_attn.v_proj.weight": (2 * D, E), f"{p}.self_attn.o_proj.weight": (E, 4 * D),
                   f"{p}.mlp.gate_proj.weight": (F, E), f"{p}.mlp.up_proj.weight": (F, E),
                   f"{p}.mlp.down_proj.weight": (E, F), f"{p}.input_layernorm.weight": (E,),
                   f"{p}.post_attention_layernorm.weight": (E,)}
    return {n: torch.randn(s, generator=G) * 0.1 for n, s in shapes.items()}


def test_hf_folder_quantized_at_load(tmp_path):
    t = _tensors()
    save_file(t, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **TINY}))
    cfg = load_model_config(str(tmp_path))
    for mode, kind in (("int4", Int4Weight), ("int8", Int8Weight)):
        w = load_weights(cfg, torch.float32, mode)
        q = "model.layers.1.mlp.down_proj.weight"
        assert isinstance(w[q], kind) and isinstance(w["model.embed_tokens.weight"], Int8Weight)
        assert isinstance(w["model.norm.weight"], torch.Tensor)
        err = (dequantize(w[q]) - t[q]).abs().max() / t[q].abs().max()
        assert err < (0.08 if mode == "int4" else 0.005), (mode, err)
    assert all(isinstance(v, torch.Tensor) for v in load_weights(cfg, torch.float32, None).values())


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (HF halves -> interleaved pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_gguf_file_stays_packed_with_rows_unpermuted(tmp_path):
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    for k, v in (("block_count", 2), ("embedding_length", 64), ("feed_forward_length", 96),
                 ("head_count", 4), ("head_count_kv", 2), ("context_length", 128)):
        getattr(w, f"add_{k}")(v)
    w.add_layer_norm_rms_eps(1e-6)
    for name, t in _tensors().items():
        base, kind = name.rsplit(".", 1)
        if base.startswith("model.layers."):
            _, _, i, part = base.split(".", 3)
            gname = f"blk.{i}.{names[part]}.{kind}"
        else:
            gname = {"model.embed_tokens": "token_embd", "model.norm": "output_norm"}[base] + f".{kind}"
        a = t.numpy()
        if ".q_proj." in name or ".k_proj." in name:
            a = _permute(a, 4 if ".q_proj." in name else 2)
        if a.ndim == 1:
            w.add_tensor(gname, a)
            continue
        qt = T.Q8_0 if "embed" in name else (T.Q4_1 if ".mlp." in name else T.Q4_0)
        w.add_tensor(gname, gguf_quantize(np.ascontiguousarray(a), qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cfg = load_model_config(str(tmp_path / "m.gguf"))
    flat, packed = load_weights(cfg, torch.float32, "none"), load_weights(cfg, torch.float32, None)
    for name, f in flat.items():
        p = packed[name]
        if name.endswith("norm.weight"):
            assert isinstance(p, torch.Tensor) and torch.equal(p, f)
        elif "embed" in name:                                   # Q8_0: per-row int8
            assert isinstance(p, Int8Weight)
            assert ((dequantize(p) - f).abs() <= f.abs().amax(-1, keepdim=True) / 254 + 1e-7).all()
        else:                                                   # Q4_0 / Q4_1: the file's values, rows in HF order
            assert isinstance(p, Int4Weight), name
            torch.testing.assert_close(dequantize(p), f, rtol=1e-6, atol=1e-6)
    assert isinstance(load_weights(cfg, torch.float32, "int8")["model.layers.0.self_attn.q_proj.weight"], Int8Weight)


# the model on packed weights

def _run_model(sd):
    from pdcluster.engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from pdcluster.engine.kv_cache_manager import KVCacheManager
    from pdcluster.engine.llama import LlamaModel
    from pdcluster.engine.model_runner import ModelRunner
    from pdcluster.engine.request import Request
    from pdcluster.engine.sampling_params import SamplingParams
    from pdcluster.engine.scheduler import Scheduler

    m = ModelConfig(name="tiny", path="-", vocab_size=80, hidden_size=64, intermediate_size=96, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=True)
    cfg = EngineConfig(model=m, cache=CacheConfig(block_size=16, num_blocks=16),
                       sched=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64))
    model = LlamaModel(m, sd, "cpu", torch.float32)
    sched, runner = Scheduler(cfg.sched, KVCacheManager(16, 16), 128), ModelRunner(cfg, model, 16)
    for n in (70, 5):                     # a 70-token prefill (dense path) and small steps (the kernels)
        sched.add(Request(list(range(3, 3 + n)), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                          block_size=16))
    hidden = []
    while sched.has_work():
        b = sched.schedule()
        ids, pos, meta, rows = runner.prepare(b)
        h = model.forward(ids, pos, meta, runner.k_caches, runner.v_caches)
        hidden.append(h)
        sched.update(b, [7 if b.samples(i) else None for i in range(len(b))])   # fixed tokens: same inputs
    return model, hidden


def test_model_on_packed_weights_matches_its_dequantized_float_twin():
    t = _tensors()
    packed = {n: (quantize_int4(v) if weight_kind(n, "int4") == "int4" else quantize_int8(v))
              if weight_kind(n, "int4") else v for n, v in t.items()}
    twin = {n: v if isinstance(v, torch.Tensor) else dequantize(v) for n, v in packed.items()}
    qm, qh = _run_model(packed)
    fm, fh = _run_model(twin)
    assert sum(qm.weight_bytes().values()) * 3 < sum(fm.weight_bytes().values())
    assert len(qh) == len(fh) > 3
    for a, b in zip(qh, fh):              # bfloat16 activations in the packed linears, float32 in the twin
        err = (a - b).abs().max() / b.abs().max()
        assert err < 3e-2, err


@needs_fbgemm
def test_fbgemm_int8_linear_rows_keep_a_non_finite_row_non_finite():
    """The int8 rounding must not turn a NaN / inf hidden state into finite logits (the sampler's finite
    check is what fails such a request); its batch-mates are untouched."""
    lin = Dyn8Linear(quantize_int8(_w(40, 64)), None)
    x = torch.randn(3, 64, generator=G)
    clean = lin(x)
    x[1, 5], x[2, 0] = float("nan"), float("inf")
    y = lin(x)
    assert torch.isfinite(y).all(1).tolist() == [True, False, False]
    assert torch.equal(y[0], clean[0])

