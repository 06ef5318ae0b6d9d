"""Decode steps on CPU through one AOTInductor-compiled decoder layer (`--cpu-compile`).

Why: a CPU decode step at batch 1 is ~40 small torch ops per layer, whose Python and dispatch cost
~40% of the step (bench/RESULTS.md, "CPU decode step compiled"). torch.compile of the whole model
unrolls its 30 layers (minutes to compile); torch.compile of one layer pays dynamo's guards and
wrappers on every call (~150 us a layer, about what it saves). Here one layer is exported with its
weights and KV cache as inputs and compiled ahead of time into a package (~25-60 s once): it serves
every layer, every batch of 1..MAX_ROWS-1 decode rows, every table width and pool size (dynamic
dimensions), called through the AOTI loader with a flat list of tensors.

The compiled layer is LlamaModel's eager CPU layer for a pure-decode step (no prefill chunk, float KV
cache): rms_norm, qkv, rotary, store_kv, paged decode attention, o, rms_norm, gate_up, silu * mul, down,
residuals. With packed int4 / int8 linears it computes the eager step bit for bit: the linears, attention and
rms_norm call the same kernels, and the fused elementwise ops round as eager's do (_rotary). Where pdcluster's
CPU ops are built (engine/cpu_ext.py), attention is pdcluster::paged_decode_attention (K/V read in place, float32)
and rms_norm pdcluster::rms_norm, and they and q4x8_mm are called through their C shims: AOTI's proxy executor,
which it uses for any op without one, costs ~4 us a call in boxing (6 calls a layer; bench/RESULTS.md,
"pdcluster's own CPU ops, called directly"). Without them: a gather + SDPA, and rms_norm's mean through aten
(_aten_mean). Float linears run F.linear (MKL), as eager does in float32 (bfloat16's eager split bmm at 1-4 rows
is the same function, rounded differently).

With int8 copies of the int4 linears (cpu_int8_rows = N, engine/quant/int8_rows.py) a second package
serves the steps of N..WIDE_MAX_ROWS-1 rows with their linears on the copies (int8_rows), the first one
the rows below N on the packed kernel: each the eager step's arithmetic for its rows.

The package is cached on disk (PDCLUSTER_AOTI_CACHE, default ~/.cache/pdcluster/aoti) under a key of
what it depends on (torch version and CPU capability, threads, the traced sources, layer geometry,
kernels and dtypes, block size); a later start loads it in milliseconds.

Inductor's own kernels in the layer (norms, rotary, the KV store and gather, silu * mul, residuals) are
generated serial (KERNEL_THREADS): at decode sizes each is a few microseconds of work, and as OpenMP
regions they cost a barrier each, 8 a layer; with 2 threads and the workers' OMP_WAIT_POLICY=PASSIVE a
barrier is a sleep and a wake-up. The aten calls (int4 mms, SDPA, mean) keep torch's threads. Measured
at 2 threads: 1.05-1.14x per step at batch 1 and 8 on a quieter host, equal on a contended one and at
1,024 tokens x 8 rows (the KV gather is serial); equal at 1 thread (bench/RESULTS.md, "int4 decode
linears on AVX-512"; bench/compiled_threads.py).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdcluster.engine import cpu_ext
from pdcluster.engine.quant.cpu_linear import BF16, DENSE_MIN_ROWS, int8_rows
from pdcluster.engine.quant.packed import GROUP
from pdcluster.kernels.decode_attention import cpu_kernel_fits

log = logging.getLogger(__name__)

KERNEL_THREADS = 1          # inductor's own kernels: serial (aten's calls in the layer keep torch's threads)
MAX_ROWS = DENSE_MIN_ROWS   # decode rows below this take the compiled layer: the packed linears' kernel path
                            # (from there on eager dequantizes + runs a GEMM, which the layer does not do)
WIDE_MAX_ROWS = 512         # with int8 copies (cpu_int8_rows): their compiled layer's rows, up to here


@dataclass(frozen=True)
class LinSpec:
    """How one linear runs in the compiled layer: kind (float | f32mm | q4f32 | int4 | q4x8 | int8 | int8rows |
    int8amx), output features N and whether a bias tensor follows its weights in the argument list."""
    kind: str
    n: int
    bias: bool


def linear_spec(lin, wide: bool = False) -> tuple[LinSpec, tuple[torch.Tensor, ...]] | None:
    """(spec, weight tensors) of one of llama.py's / cpu_linear.py's linears; None if not supported.
    wide: a linear with an int8 copy (engine/quant/int8_rows.Int8Rows) as its wide steps run it."""
    from pdcluster.engine.llama import Linear
    from pdcluster.engine.quant.cpu_linear import Int4Linear, Int8Linear
    from pdcluster.engine.quant.int8_rows import Int8Rows
    from pdcluster.engine.quant.q4x8 import Q4x8Linear
    from pdcluster.kernels.q4f32_mm import Q4F32Weight
    if isinstance(lin, Int8Rows):
        if wide:
            # AMX tiles where Int8Rows runs them (the same sums as torch._int_mm on q): the eager step's kernel
            kind, w = ("int8amx", lin.tiles) if lin.tiles is not None else ("int8rows", lin.q)
            ws = (w, lin.scale) + ((lin.bias,) if lin.bias is not None else ())
            return LinSpec(kind, lin.N, lin.bias is not None), ws
        lin = lin.inner
    elif wide:
        return None
    if isinstance(lin, Linear) and isinstance(lin.packed, Q4F32Weight):
        ws, spec = (lin.packed.codes, lin.packed.dm), LinSpec("q4f32", lin.packed.n, lin.bias is not None)
    elif isinstance(lin, Linear) and lin.packed is not None:
        ws, spec = (lin.packed.w,), LinSpec("f32mm", lin.packed.n, lin.bias is not None)
    elif isinstance(lin, Linear):
        ws, spec = (lin.weight,), LinSpec("float", lin.weight.shape[0], lin.bias is not None)
    elif isinstance(lin, Q4x8Linear):
        ws, spec = (lin.q.w, lin.q.d, lin.q.mn), LinSpec("q4x8", lin.N, lin.bias is not None)
    elif isinstance(lin, Int4Linear):
        ws, spec = (lin.packed, lin.sz), LinSpec("int4", lin.N, lin.bias is not None)
    elif isinstance(lin, Int8Linear):
        ws, spec = (lin.q, lin.scale), LinSpec("int8", lin.q.shape[0], lin.bias is not None)
    else:
        return None                      # fbgemm's packed int8 (Dyn8Linear), Triton, reference linears
    return spec, ws + ((lin.bias,) if lin.bias is not None else ())


def _linear(spec: LinSpec, x: torch.Tensor, ws: list[torch.Tensor]) -> torch.Tensor:
    """The eager linear's arithmetic on its kernel path (Linear, packed or not / Int4Linear.kernel /
    Int8Linear.kernel / Int8Rows' int8_rows)."""
    if spec.kind == "float":
        y = F.linear(x, ws[0])
    elif spec.kind == "f32mm":
        y = torch.ops.pdcluster.f32_mm(x, ws[0], spec.n)
    elif spec.kind == "q4f32":
        y = torch.ops.pdcluster.q4f32_mm(x, ws[0], ws[1], spec.n)
    elif spec.kind == "int4":
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(BF16).contiguous(), ws[0], GROUP, ws[1])
        y = y[:, :spec.n].to(x.dtype)
    elif spec.kind == "q4x8":
        y = torch.ops.pdcluster.q4x8_mm(x.float().contiguous(), ws[0], ws[1], ws[2])
        y = (y if y.shape[1] == spec.n else y[:, :spec.n].contiguous()).to(x.dtype)   # N padded to 16 by q4x8.pack
    elif spec.kind == "int8rows":
        y = int8_rows(x, ws[0], ws[1]).to(x.dtype)
    elif spec.kind == "int8amx":
        y = int8_rows(x, None, ws[1], ws[0]).to(x.dtype)
    else:
        y = torch.ops.aten._weight_int8pack_mm(x.to(BF16).contiguous(), ws[0], ws[1]).to(x.dtype)
    return y + ws[-1] if spec.bias else y


def _rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """rotary.apply_rotary_rolled's result bit for bit: eager's addcmul rounds once, as
    fma(roll(x), sin, x * cos); the product of two floats is exact in float64, so the sum there rounds once
    too (inductor's C++ would round the product first, ffp-contract=off)."""
    xc = (x * cos).double()
    return (xc + x.roll(x.shape[-1] // 2, -1).double() * signed_sin.double()).to(x.dtype)


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """llama.rms_norm; float32 (F.rms_norm eagerly) as pdcluster::rms_norm, the same aten kernel behind a C shim
    (kernels/rms_norm.cpp), where pdcluster's CPU ops are built."""
    from pdcluster.engine.llama import rms_norm
    if x.dtype == torch.float32 and w.dtype == torch.float32 and cpu_ext.has("rms_norm"):
        return torch.ops.pdcluster.rms_norm(x, w, eps)
    return rms_norm(x, w, eps)


class DecodeLayer(torch.nn.Module):
    """forward(h [B, E], k_cache, v_cache [NB, BS, KVH, D], slots [B], tables [B, W], attend, cos, sin [B, 1, D],
    in_norm, post_norm [E], *linear weights (qkv, o, gate_up, down)) -> h [B, E]. attend: with `paged`, the rows'
    seq_lens [B] for pdcluster::paged_decode_attention (kernels/decode_attention.cpp, the eager step's kernel
    where it fits); else their mask [B, 1, 1, W * BS] for a gather + SDPA. Writes the step's K and V into the
    caches."""

    def __init__(self, specs: tuple[LinSpec, ...], counts: tuple[int, ...], heads: int, kv_heads: int,
                 head_dim: int, eps: float, scale: float, paged: bool = False):
        super().__init__()
        self.specs, self.counts, self.paged = specs, counts, paged
        self.H, self.KVH, self.D, self.eps, self.scale = heads, kv_heads, head_dim, eps, scale

    def forward(self, h, k_cache, v_cache, slots, tables, attend, cos, sin, in_norm, post_norm, *ws):
        H, KVH, D = self.H, self.KVH, self.D
        lin, i = [], 0
        for n in self.counts:
            lin.append(list(ws[i:i + n]))
            i += n
        qkv_s, o_s, gu_s, down_s = self.specs
        B = h.shape[0]
        x = _rms_norm(h, in_norm, self.eps)
        qkv = _linear(qkv_s, x, lin[0])                                      # [B, (H + 2 KVH) D]
        qk = _rotary(qkv[:, :(H + KVH) * D].view(B, H + KVH, D), cos, sin)
        q, k, v = qk[:, :H], qk[:, H:], qkv[:, (H + KVH) * D:].view(B, KVH, D)
        nb, bs = k_cache.shape[0], k_cache.shape[1]
        k_cache.view(nb * bs, KVH, D).index_copy_(0, slots, k)
        v_cache.view(nb * bs, KVH, D).index_copy_(0, slots, v)
        if self.paged:
            o = torch.ops.pdcluster.paged_decode_attention(q, k_cache, v_cache, tables, attend, self.scale)
        else:
            flat, W = tables.reshape(-1), tables.shape[1]
            kk = k_cache.index_select(0, flat).view(B, W * bs, KVH, D).transpose(1, 2)   # [B, KVH, L, D]
            vv = v_cache.index_select(0, flat).view(B, W * bs, KVH, D).transpose(1, 2)
            o = F.scaled_dot_product_attention(q.reshape(B, KVH, H // KVH, D), kk, vv, attn_mask=attend,
                                               scale=self.scale)
        h = h + _linear(o_s, o.reshape(B, H * D), lin[1])
        x = _rms_norm(h, post_norm, self.eps)
        g, u = _linear(gu_s, x, lin[2]).chunk(2, dim=-1)
        return h + _linear(down_s, F.silu(g) * u, lin[3])


def cache_dir() -> str:
    """Where compiled packages are kept."""
    return os.environ.get("PDCLUSTER_AOTI_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pdcluster",
                                                                  "aoti")


def _sources() -> bytes:
    """The code the compiled layer is traced from."""
    from pdcluster.engine import cpu_ext, llama, rotary
    from pdcluster.engine.quant import cpu_linear, int8_amx, q4x8
    from pdcluster.kernels import decode_attention
    out = cpu_ext.sources()
    for m in (__import__(__name__, fromlist=["x"]), llama, rotary, cpu_linear, q4x8, int8_amx, decode_attention):
        with open(m.__file__, "rb") as f:
            out += f.read()
    return out


@dataclass(frozen=True)
class _Package:
    """One compiled layer: decode steps of lo..hi-1 rows; args[li] = layer li's norms and weights."""
    lo: int
    hi: int
    run: object                     # flat tensor list in, output list out (no pytree per call)
    args: list
    paged: bool                     # attention on pdcluster::paged_decode_attention (its input: seq_lens, not a mask)


class CompiledDecode:
    """The model's decoder layers for pure-decode CPU steps, through compiled layers: `narrow` (1..MAX_ROWS-1
    rows, the linears' packed kernels) and, when the int4 linears have int8 copies from `split` rows on
    (engine/quant/int8_rows.py), `wide` (split..WIDE_MAX_ROWS-1 rows, the copies). Build with
    CompiledDecode.build (None when the model or cache is not supported, or compiling fails)."""

    def __init__(self, narrow: _Package, wide: _Package | None, block_size: int, split: int = MAX_ROWS):
        self.narrow, self.wide, self.block_size, self.split = narrow, wide, block_size, split
        self.steps = 0                         # steps served (tests, stats)

    @staticmethod
    def build(model, k_cache: torch.Tensor, v_cache: torch.Tensor) -> "CompiledDecode | None":
        """Compile (or load from the disk cache) the layer(s) for this model and KV cache geometry."""
        if not isinstance(k_cache, torch.Tensor) or k_cache.device.type != "cpu" or model.triton:
            return None                                     # quantized KV cache, CUDA, Triton kernels
        if k_cache.shape[0] < 2:
            return None                                     # the package's pool-size dimension starts at 2
        lins = [(L.qkv, L.o, L.gate_up, L.down) for L in model.layers]
        split = min([MAX_ROWS] + [lin.min_rows for ls in lins for lin in ls if hasattr(lin, "min_rows")])
        # the narrow layer always spans 1..MAX_ROWS-1: one package whatever the split, shared by every config
        # of this model; steps of >= split rows take the wide one, or stay eager without it
        narrow = _build_package(model, k_cache, lins, 1, MAX_ROWS, wide=False)
        if narrow is None:
            return None
        wide = _build_package(model, k_cache, lins, split, WIDE_MAX_ROWS, wide=True) if split < MAX_ROWS else None
        return CompiledDecode(narrow, wide, k_cache.shape[1], split)

    def covers(self, num_tokens: int, meta) -> bool:
        """A pure-decode step a compiled layer takes: no prefill chunk, and rows below the linears' int8-copy
        threshold (the narrow layer) or in the wide layer's range."""
        if meta.prefills or num_tokens < 1 or meta.decode_block_tables is None:
            return False
        if num_tokens < self.split:
            return num_tokens < self.narrow.hi
        return self.wide is not None and num_tokens < self.wide.hi

    def layer(self, li: int, h, k_cache, v_cache, meta, cos, sin) -> torch.Tensor:
        """Layer li of a covered step: h [B, E] in, h [B, E] out; the step's K/V written to the caches."""
        p = self.wide if h.shape[0] >= self.split else self.narrow
        return p.run([h, k_cache, v_cache, meta.slot_mapping, meta.decode_block_tables,
                      meta.decode_seq_lens if p.paged else meta.decode_mask, cos, sin] + p.args[li])[0]


def _build_package(model, k_cache, lins, lo: int, hi: int, wide: bool) -> _Package | None:
    """The layer for rows lo..hi-1 (wide: on the linears' int8 copies), compiled or loaded; None (logged) if a
    linear is not supported or compiling fails."""
    what = f"decode steps of >= {lo} rows" if wide else "decode steps"
    got = _layer_specs(lins, wide)
    if got is None:
        log.info("a linear the compiled layer does not support: %s stay eager", what)
        return None
    specs, counts, ws = got
    args = [[L.in_norm, L.post_norm] + w for L, w in zip(model.layers, ws)]
    paged = cpu_kernel_fits(model.dtype, k_cache)         # as the eager step's decode_attention decides
    try:
        return _Package(lo, hi, _package(model, k_cache, specs, counts, args, lo, hi, paged), args, paged)
    except Exception as e:                                  # any export / compile / load failure: eager
        log.warning("CPU decode compile failed, %s stay eager: %s", what, str(e).splitlines()[0][:300])
        return None


def _layer_specs(lins, wide: bool):
    """(specs, counts, each layer's linear weights in order) as one compiled layer runs them; None if a
    linear is not supported or the layers differ in kernels (mixed GGUF types)."""
    specs, counts, args = None, None, []
    for ls in lins:
        got = [linear_spec(lin, wide) for lin in ls]
        if any(g is None for g in got):
            return None
        s = tuple(g[0] for g in got)
        if specs is not None and s != specs:
            return None
        specs, counts = s, tuple(len(g[1]) for g in got)
        args.append([w for g in got for w in g[1]])
    return specs, counts, args


def _package(model, k_cache, specs, counts, args: list[list[torch.Tensor]], lo: int, hi: int, paged: bool):
    """The compiled layer for rows lo..hi-1, compiled or loaded from the disk cache: its run function.
    args: each layer's norms and linear weights, as the layer takes them."""
    c = model.cfg
    layer = DecodeLayer(specs, counts, c.num_heads, c.num_kv_heads, c.head_dim, c.rms_norm_eps, model.scale, paged)
    bs = k_cache.shape[1]
    key = hashlib.sha256(repr((torch.__version__, torch.backends.cpu.get_cpu_capability(),
                               torch.get_num_threads(), KERNEL_THREADS, specs, counts, c.num_heads, c.num_kv_heads,
                               c.head_dim, c.hidden_size, c.rms_norm_eps, model.scale, str(model.dtype),
                               str(k_cache.dtype), tuple(k_cache.shape[1:]), lo, hi, paged, sorted(cpu_ext.ops()),
                               [(tuple(t.shape), str(t.dtype)) for t in args[0]])).encode()
                         + _sources()).hexdigest()[:24]
    path = os.path.join(cache_dir(), f"decode_layer_{key}.pt2")
    t = time.perf_counter()
    if not os.path.exists(path):
        _compile(layer, model, k_cache, args[0], bs, path, lo, hi)
        log.info("compiled the CPU decode layer (rows %d-%d) in %.1f s -> %s", lo, hi - 1,
                 time.perf_counter() - t, path)
    return _load(path)


def _load(path: str):
    """The package's run(list of tensors) -> list of tensors. The loader itself takes ~5 ms;
    torch._inductor.aoti_load_package would first import inductor (~2-4 s of a worker's start)."""
    try:
        return torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, -1).run
    except (AttributeError, TypeError):     # another torch's private signature: the public way
        return torch._inductor.aoti_load_package(path).loader.run


@contextlib.contextmanager
def _aten_mean():
    """While compiling, inductor calls aten's mean instead of generating its own reduction: rms_norm's
    mean over the hidden size then sums in eager's order (inductor's own order differs in the last bit
    for ~1 row in 4, and int4 decoding amplifies that into different tokens within ~30 steps). Inductor's
    FX graph cache is off meanwhile: it does not key on this (the package is cached here instead)."""
    from torch._inductor import lowering
    op = torch.ops.aten.mean.dim
    saved, realized = lowering.lowerings.get(op), op in lowering.needs_realized_inputs
    lowering.make_fallback(op, warn=False)
    try:
        yield
    finally:
        if saved is not None:
            lowering.lowerings[op] = saved
        if not realized:
            lowering.needs_realized_inputs.discard(op)


def _compile(layer: DecodeLayer, model, k_cache, args0: list[torch.Tensor], bs: int, path: str, lo: int,
             hi: int) -> None:
    """Export with dynamic rows (lo..hi-1) / table width / pool size, compile to a package at `path`
    (atomically)."""
    B, W, NB = max(2, lo), 3, 8                            # example sizes (> 1: 1 would be specialized)
    c = model.cfg
    kc = torch.zeros((NB,) + tuple(k_cache.shape[1:]), dtype=k_cache.dtype)
    vc = torch.zeros_like(kc)
    h = torch.zeros(B, c.hidden_size, dtype=model.dtype)
    tables = torch.arange(B * W, dtype=torch.int64).view(B, W) % NB
    attend = (torch.full((B,), W * bs, dtype=torch.int64) if layer.paged
              else torch.ones(B, 1, 1, W * bs, dtype=torch.bool))
    slots = torch.arange(B, dtype=torch.int64)
    cos = torch.zeros(B, 1, c.head_dim, dtype=model.dtype)
    Dim = torch.export.Dim
    b, w, nb = Dim("rows", min=lo, max=hi - 1), Dim("width", min=1), Dim("blocks", min=2)
    dyn = ({0: b}, {0: nb}, {0: nb}, {0: b}, {0: b, 1: w}, {0: b} if layer.paged else {0: b, 3: w * bs}, {0: b},
           {0: b}, None, None, (None,) * (len(args0) - 2))          # norms, then the linears' weights (*ws)
    with torch.inference_mode(False), torch.no_grad():
        ep = torch.export.export(layer, (h, kc, vc, slots, tables, attend, cos, cos.clone(), *args0),
                                 dynamic_shapes=dyn)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".pt2", dir=os.path.dirname(path))
    os.close(fd)
    try:
        shims = cpu_ext.c_shims()                  # pdcluster's ops that loaded: direct calls, no proxy
        with _aten_mean(), torch._inductor.config.patch({"fx_graph_cache": False, "cpp.threads": KERNEL_THREADS,
                                                         "aot_inductor.custom_ops_to_c_shims": shims}):
            torch._inductor.aoti_compile_and_package(ep, package_path=tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
