"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2) in plain PyTorch over a paged KV cache.

Shapes: T = tokens in the step (all requests flattened), E = hidden size, H/KVH = query/KV heads,
D = head dim. q/k/v and gate/up projections are fused into one matmul each at load time.
A weight is a float tensor (Linear below) or packed (engine/quant/: int4/int8 weight-only linears,
embedding rows dequantized on lookup).
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

import torch
import torch.nn.functional as F

from pdcluster.engine import cpu_ext
from pdcluster.engine.attention import AttnMeta, decode_attention, prefill_attention, store_kv
from pdcluster.engine.config import ModelConfig
from pdcluster.engine.kv_quant import cache_args
from pdcluster.engine.quant.layers import embed_rows, fuse, quant_linear
from pdcluster.engine.quant.packed import Int8Weight, Packed, nbytes
from pdcluster.engine.rotary import apply_rotary_rolled, cos_sin_cache, rotary_tables
from pdcluster.kernels import f32_mm as f32
from pdcluster.kernels import q4f32_mm as q4f32
from pdcluster.kernels.greedy_head import GreedyHead

log = logging.getLogger(__name__)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm: normalize in float32, scale in the input dtype. float32 x takes torch's
    one-call rms_norm (the same arithmetic: 1 dispatched op instead of 6, ~8 us less per call here)."""
    if x.dtype == torch.float32 and w.dtype == torch.float32:
        return F.rms_norm(x, w.shape, w, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


class Linear:
    """y = x @ w.T + b. float32 on a CPU with pdcluster's ops (kernels/f32_mm.py): the weight is packed once into
    the op's blocks, which replace it (no second copy), and rows below the form's MKL_MIN_ROWS run the op: 1.45-1.78x
    MKL's F.linear at 4-64 rows, 1.03-1.16x at 1-2 and at 408 (bench/RESULTS.md, "float32 linears packed at load"), a
    row's result independent of its batch-mates; longer steps (prefill chunks) run MKL on a transient unpacked copy.
    codes=True: a weight whose values are all GGUF Q4_1 values (a float32 engine on a Q4_1 file) is held as its
    4-bit codes instead (kernels/q4f32_mm.py), 0.75 bytes a weight, with the same results bit for bit; their op
    runs every step up to 4,095 rows (q4f32_mm.mkl_min_rows(); 1,023 with the AVX2 library), so a default step
    budget's rows never leave it on AVX-512.
    Elsewhere F.linear (MKL on CPU); bfloat16 at <= SPLIT_MAX_ROWS rows (decode at batch 1-4) runs torch.bmm over
    the weight viewed as [SPLIT, out / SPLIT, in], a view, no copy: 1.15-1.25x F.linear on 1 thread, a tie on 2
    (bench/RESULTS.md, "Dense CPU linears, remeasured")."""

    SPLIT, SPLIT_MAX_ROWS = 4, 4

    __slots__ = ("weight", "bias", "_split", "packed", "_mm", "_unpack", "mkl_min_rows")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, split: bool, pack: bool = False,
                 codes: bool = False):
        self.weight, self.bias, self._split, self.packed = weight, bias, None, None
        if pack:                                                            # the blocks replace the weight
            q = q4f32.pack(weight) if codes else None                       # None: not all Q4_1 values
            self.weight = None
            if q is not None:
                self.packed, self._mm, self._unpack = q, q4f32.q4f32_mm, q4f32.unpack_into
                self.mkl_min_rows = q4f32.mkl_min_rows()           # steps of this many rows run MKL instead
            else:
                self.packed, self._mm, self._unpack = f32.pack(weight), f32.f32_mm, f32.unpack_into
                self.mkl_min_rows = f32.MKL_MIN_ROWS
        elif split and weight.shape[0] % self.SPLIT == 0 and weight.is_contiguous():
            self._split = weight.view(self.SPLIT, weight.shape[0] // self.SPLIT, weight.shape[1])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if self.packed is not None:
            if n >= self.mkl_min_rows:                      # long prefill chunks: MKL on a transient [N, K] copy
                return F.linear(x, self._unpack(self.packed, _scratch()), self.bias)
            y = self._mm(x, self.packed)
            return y if self.bias is None else y + self.bias
        if self._split is not None and n <= self.SPLIT_MAX_ROWS:
            w = self._split                                                 # [S, out / S, in]
            y = torch.bmm(w, x.t().unsqueeze(0).expand(w.shape[0], -1, -1))  # [S, out / S, n]
            y = y.permute(2, 0, 1).reshape(n, -1)                           # [n, out]
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)

    @property
    def nbytes(self) -> int:
        """Resident bytes: the weight or its packed blocks (the split is a view of the weight)."""
        return self.packed.nbytes if self.packed is not None else nbytes(self.weight)


_local = threading.local()


def _scratch() -> dict:
    """This thread's unpack buffers (kernels/f32_mm.unpack_into): one per packed shape, reused by every layer."""
    d = getattr(_local, "bufs", None)
    if d is None:
        d = _local.bufs = {}
    return d


def use_packed(device: str, w: torch.Tensor | Packed, head: bool) -> bool:
    """Linear packs a float32 CPU weight for pdcluster's op where it loaded, except the LM head: tied, it is the
    embedding, whose rows the lookup reads."""
    if head or not isinstance(w, torch.Tensor) or w.dtype != torch.float32 or torch.device(device).type != "cpu":
        return False
    return f32.available()


def greedy_screen(head, device: str) -> GreedyHead | None:
    """kernels/greedy_head.py's screen for a float32 CPU head (no bias, finite weights) where pdcluster's ops are
    built: a greedy row's token without reading the whole head in float32. None elsewhere."""
    w = getattr(head, "weight", None)
    if not (isinstance(head, Linear) and head.bias is None and isinstance(w, torch.Tensor) and w.dtype == torch.float32
            and w.dim() == 2 and w.shape[1] % 16 == 0 and torch.device(device).type == "cpu"
            and cpu_ext.has("greedy_head")):
        return None
    try:
        return GreedyHead(w)
    except ValueError:                  # a non-finite weight: nothing to bound, the full head it is
        return None


def make_linear(w: torch.Tensor | Packed, bias: torch.Tensor | None, device: str, split: bool, head: bool = False,
                codes: bool = False):
    if isinstance(w, torch.Tensor):
        return Linear(w, bias, split, pack=use_packed(device, w, head), codes=codes)
    return quant_linear(w, bias, device, head)


class Layer:
    __slots__ = ("qkv", "o", "gate_up", "down", "in_norm", "post_norm")

    def __init__(self, sd: dict[str, torch.Tensor | Packed], p: str, bias: bool, device: str, split: bool,
                 codes: bool = False):
        a, m = f"{p}.self_attn", f"{p}.mlp"
        qkv_w = fuse([sd[f"{a}.q_proj.weight"], sd[f"{a}.k_proj.weight"], sd[f"{a}.v_proj.weight"]])
        qkv_b = (torch.cat([sd[f"{a}.q_proj.bias"], sd[f"{a}.k_proj.bias"], sd[f"{a}.v_proj.bias"]])
                 if bias else None)
        self.qkv = make_linear(qkv_w, qkv_b, device, split, codes=codes)
        self.o = make_linear(sd[f"{a}.o_proj.weight"], None, device, split, codes=codes)
        self.gate_up = make_linear(fuse([sd[f"{m}.gate_proj.weight"], sd[f"{m}.up_proj.weight"]]), None, device,
                                   split, codes=codes)
        self.down = make_linear(sd[f"{m}.down_proj.weight"], None, device, split, codes=codes)
        self.in_norm = sd[f"{p}.input_layernorm.weight"]
        self.post_norm = sd[f"{p}.post_attention_layernorm.weight"]


def use_split(device: str, dtype: torch.dtype) -> bool:
    """Linear's split bmm for few rows: bfloat16 on CPU, where it measured faster (Linear)."""
    return torch.device(device).type == "cpu" and dtype == torch.bfloat16


class LlamaModel:
    def __init__(self, cfg: ModelConfig, sd: dict[str, torch.Tensor], device: str, dtype: torch.dtype,
                 attention_backend: str = "auto", int8_rows: int = 0, greedy_head: bool = True,
                 weight_codes: bool = True):
        from pdcluster.kernels.select import get_ops

        self.cfg = cfg
        # Triton kernels on CUDA (or when forced); otherwise the torch path in engine/attention.py
        self.ops = get_ops(attention_backend, device)
        self.triton = self.ops.backend == "triton"
        self.dtype = dtype
        sd = {k: v.to(device=device, dtype=dtype) if isinstance(v, torch.Tensor) else v.to(device)
              for k, v in sd.items()}
        self.embed = sd["model.embed_tokens.weight"]                       # [V, E], float or packed
        split = use_split(device, dtype) and not self.triton
        self.lm_head = make_linear(self.embed if cfg.tie_word_embeddings else sd["lm_head.weight"], None, device,
                                   split, head=True)
        self.greedy = greedy_screen(self.lm_head, device) if greedy_head else None     # greedy rows' tokens
        self.norm = sd["model.norm.weight"]
        self.layers = [Layer(sd, f"model.layers.{i}", cfg.attention_bias, device, split, codes=weight_codes)
                       for i in range(cfg.num_layers)]
        if int8_rows and torch.device(device).type == "cpu":     # wide steps on an int8 copy (quant/int8_rows.py)
            from pdcluster.engine.quant.int8_rows import Int8Rows, widen
            for L in self.layers:
                L.qkv, L.o, L.gate_up, L.down = (widen(lin, int8_rows) for lin in (L.qkv, L.o, L.gate_up, L.down))
            if not any(isinstance(L.qkv, Int8Rows) for L in self.layers):
                log.warning("cpu_int8_rows=%d not applied: no linear here gains from an int8 copy (float or int8 "
                            "weights, or q4x8 on an AVX2 host, faster than the copy at every row count)", int8_rows)
        self.cos_sin = cos_sin_cache(cfg.max_position_embeddings, cfg.head_dim, cfg.rope_theta,
                                     cfg.rope_scaling_dict).to(device)  # float32 [max_pos, D]
        self.scale = cfg.head_dim ** -0.5
        self.compiled = None        # engine/cpu_compile.CompiledDecode: pure-decode CPU steps' layers, when built

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMeta,
                k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
                layer_hook: Callable[[int], None] | None = None,
                layer_wait: Callable[[int], None] | None = None) -> torch.Tensor:
        """input_ids, positions: int64 [T]. Returns hidden states [T, E] after the final norm.
        layer_hook(l) runs after layer l's KV is in the cache (layer-wise KV transfer); layer_wait(l)
        before layer l runs (KV loaded into the cache layer by layer meanwhile)."""
        c = self.cfg
        T, H, KVH, D = input_ids.shape[0], c.num_heads, c.num_kv_heads, c.head_dim
        cos, sin = rotary_tables(self.cos_sin, positions, self.dtype)       # [T, 1, D] each
        h = embed_rows(self.embed, input_ids, self.dtype)                   # [T, E]
        P = meta.num_prefill_tokens
        comp = self.compiled if self.compiled is not None and self.compiled.covers(T, meta) else None
        if comp is not None:
            comp.steps += 1
        for li, L in enumerate(self.layers):
            if layer_wait is not None:
                layer_wait(li)
            if comp is not None:            # the same layer, compiled (engine/cpu_compile.py)
                h = comp.layer(li, h, k_caches[li], v_caches[li], meta, cos, sin)
                if layer_hook is not None:
                    layer_hook(li)
                continue
            if self.triton:
                h = h + self._triton_attention(li, L, h, positions, meta, k_caches[li], v_caches[li])
                x = self.ops.rms_norm(h, L.post_norm, c.rms_norm_eps)
                g, u = L.gate_up(x).chunk(2, dim=-1)
                h = h + L.down(F.silu(g) * u)
                if layer_hook is not None:
                    layer_hook(li)
                continue
            x = rms_norm(h, L.in_norm, c.rms_norm_eps)
            qkv = L.qkv(x)                                                  # [T, (H + 2 KVH) D]
            qk = apply_rotary_rolled(qkv[:, :(H + KVH) * D].view(T, H + KVH, D), cos, sin)   # q, k at once
            q, k = qk[:, :H], qk[:, H:]
            v = qkv[:, (H + KVH) * D:].view(T, KVH, D)
            store_kv(k, v, k_caches[li], v_caches[li], meta.slot_mapping)
            parts = []
            for s in meta.prefills:
                sl = slice(s.q_start, s.q_start + s.q_len)
                parts.append(prefill_attention(q[sl], k[sl], v[sl], k_caches[li], v_caches[li], s, self.scale))
            if P < T:
                parts.append(decode_attention(q[P:], k_caches[li], v_caches[li], meta.decode_block_tables,
                                              meta.decode_mask, self.scale, meta.decode_seq_lens))
            attn = parts[0] if len(parts) == 1 else torch.cat(parts, 0)     # [T, H, D]
            h = h + L.o(attn.reshape(T, H * D))
            x = rms_norm(h, L.post_norm, c.rms_norm_eps)
            g, u = L.gate_up(x).chunk(2, dim=-1)                            # [T, I] each
            h = h + L.down(F.silu(g).mul_(u))                               # (in place: silu's own buffer)
            if layer_hook is not None:
                layer_hook(li)
        return rms_norm(h, self.norm, c.rms_norm_eps)

    def _triton_attention(self, li, L, h, positions, meta: AttnMeta, kc, vc) -> torch.Tensor:
        """The attention half of a layer on the kernels/ ops (one launch per phase). Returns [T, E]."""
        c, ops = self.cfg, self.ops
        T, H, KVH, D = h.shape[0], c.num_heads, c.num_kv_heads, c.head_dim
        x = ops.rms_norm(h, L.in_norm, c.rms_norm_eps)
        q, k, v = L.qkv(x).split([H * D, KVH * D, KVH * D], dim=-1)
        q, k, v = q.contiguous().view(T, H, D), k.contiguous().view(T, KVH, D), v.contiguous().view(T, KVH, D)
        ops.rotary_embedding(positions, q, k, self.cos_sin, D)
        kc, vc, scales = cache_args(kc, vc)          # a quantized cache: codes + k_scale/v_scale
        ops.store_kv(k, v, kc, vc, meta.slot_mapping, **scales)
        P = meta.num_prefill_tokens
        parts = []
        if P:
            parts.append(ops.prefill_attention(q[:P], kc, vc, meta.prefill_block_tables, meta.prefill_cu_seqlens_q,
                                               meta.prefill_seq_lens_k, self.scale, **scales))
        if P < T:
            parts.append(ops.decode_attention(q[P:], kc, vc, meta.decode_block_tables, meta.decode_seq_lens,
                                              self.scale, **scales))
        attn = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
        return L.o(attn.reshape(T, H * D))

    def weight_bytes(self) -> dict[str, int]:
        """Resident weight bytes by part: "linears" (the layers' projections, every copy held),
        "head" (LM head + token embedding; once when tied and shared), "other" (norms)."""
        linears = sum(lin.nbytes for L in self.layers for lin in (L.qkv, L.o, L.gate_up, L.down))
        head = self.lm_head.nbytes + (self.greedy.nbytes if self.greedy is not None else 0)
        shared = (isinstance(self.embed, Int8Weight) and isinstance(getattr(self.lm_head, "q", None), torch.Tensor)
                  and self.lm_head.q.data_ptr() == self.embed.q.data_ptr())
        if shared:
            head += nbytes(self.embed.scale)    # the head's int8 codes are the embedding's own (counted once)
        elif not (isinstance(self.embed, torch.Tensor) and self.cfg.tie_word_embeddings):
            head += nbytes(self.embed)          # untied, or codes beside the head kernel's own layout (int4, fbgemm)
        other = nbytes(self.norm) + sum(nbytes(L.in_norm) + nbytes(L.post_norm) for L in self.layers)
        return {"linears": linears, "head": head, "other": other}

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, E] -> float32 [N, V]."""
        return self.lm_head(hidden).float()

    def greedy_tokens(self, hidden: torch.Tensor) -> list[int]:
        """[N, E] -> per row argmax(logits) through the screen (self.greedy, not None); -1 where the row is not
        finite: its token comes from logits()."""
        return self.greedy.tokens(hidden).tolist()
