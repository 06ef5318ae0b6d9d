"""Decode steps on CPU through one AOTInductor-compiled decoder layer (`--cpu-compile`).

Why: a CPU decode step at batch 1 is ~40 small torch ops per layer, whose Python and dispatch cost
~40% of the step (bench/RESULTS.md, "CPU decode step compiled"). torch.compile of the whole model
unrolls its 30 layers (minutes to compile); torch.compile of one layer pays dynamo's guards and
wrappers on every call (~150 us a layer, about what it saves). Here one layer is exported with its
weights and KV cache as inputs and compiled ahead of time into a package (~25-60 s once): it serves
every layer, every batch of 1..MAX_ROWS-1 decode rows, every table width and pool size (dynamic
dimensions), called through the AOTI loader with a flat list of tensors.

The compiled layer is LlamaModel's eager CPU layer for a pure-decode step (no prefill chunk, float KV
cache): rms_norm, qkv, rotary, store_kv, paged decode attention (gather + SDPA), o, rms_norm, gate_up,
silu * mul, down, residuals. With packed int4 / int8 linears it computes the eager step bit for bit:
the linears, SDPA and rms_norm's mean call the same aten kernels (_aten_mean), and the fused
elementwise ops round as eager's do (_rotary). Float linears run F.linear (MKL), where eager runs a
split bmm or oneDNN at these row counts: the same function, rounded differently.

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

from pdcluster.engine.quant.cpu_linear import BF16, DENSE_MIN_ROWS
from pdcluster.engine.quant.packed import GROUP

log = logging.getLogger(__name__)

KERNEL_THREADS = 1          # inductor's own kernels: serial (aten's calls in the layer keep torch's threads)
MAX_ROWS = DENSE_MIN_ROWS   # decode rows below this take the compiled layer: the packed linears' kernel path
                            # (from there on eager dequantizes + runs a GEMM, which the layer does not do)


@dataclass(frozen=True)
class LinSpec:
    """How one linear runs in the compiled layer: kind (float | int4 | int8), output features N and
    whether a bias tensor follows its weights in the argument list."""
    kind: str
    n: int
    bias: bool


def linear_spec(lin) -> tuple[LinSpec, tuple[torch.Tensor, ...]] | None:
    """(spec, weight tensors) of one of llama.py's / cpu_linear.py's linears; None if not supported."""
    from pdcluster.engine.llama import Linear
    from pdcluster.engine.quant.cpu_linear import Int4Linear, Int8Linear
    if isinstance(lin, Linear):
        ws, spec = (lin.weight,), LinSpec("float", lin.weight.shape[0], lin.bias is not None)
    elif isinstance(lin, Int4Linear):
        ws, spec = (lin.packed, lin.sz), LinSpec("int4", lin.N, lin.bias is not None)
    elif isinstance(lin, Int8Linear):
        ws, spec = (lin.q, lin.scale), LinSpec("int8", lin.q.shape[0], lin.bias is not None)
    else:
        return None                      # fbgemm's packed int8 (Dyn8Linear), Triton, reference linears
    return spec, ws + ((lin.bias,) if lin.bias is not None else ())


def _linear(spec: LinSpec, x: torch.Tensor, ws: list[torch.Tensor]) -> torch.Tensor:
    """The eager linear's arithmetic on its kernel path (Linear / Int4Linear.kernel / Int8Linear.kernel)."""
    if spec.kind == "float":
        y = F.linear(x, ws[0])
    elif spec.kind == "int4":
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(BF16).contiguous(), ws[0], GROUP, ws[1])
        y = y[:, :spec.n].to(x.dtype)
    else:
        y = torch.ops.aten._weight_int8pack_mm(x.to(BF16).contiguous(), ws[0], ws[1]).to(x.dtype)
    return y + ws[-1] if spec.bias else y


def _rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """rotary.apply_rotary_rolled's result bit for bit: eager's addcmul rounds once, as
    fma(roll(x), sin, x * cos); the product of two floats is exact in float64, so the sum there rounds once
    too (inductor's C++ would round the product first, ffp-contract=off)."""
    xc = (x * cos).double()
    return (xc + x.roll(x.shape[-1] // 2, -1).double() * signed_sin.double()).to(x.dtype)


class DecodeLayer(torch.nn.Module):
    """forward(h [B, E], k_cache, v_cache [NB, BS, KVH, D], slots [B], tables [B, W], mask [B, 1, 1, W * BS],
    cos, sin [B, 1, D], in_norm, post_norm [E], *linear weights (qkv, o, gate_up, down)) -> h [B, E].
    Writes the step's K and V into the caches."""

    def __init__(self, specs: tuple[LinSpec, ...], counts: tuple[int, ...], heads: int, kv_heads: int,
                 head_dim: int, eps: float, scale: float):
        super().__init__()
        self.specs, self.counts = specs, counts
        self.H, self.KVH, self.D, self.eps, self.scale = heads, kv_heads, head_dim, eps, scale

    def forward(self, h, k_cache, v_cache, slots, tables, mask, cos, sin, in_norm, post_norm, *ws):
        from pdcluster.engine.llama import rms_norm
        H, KVH, D = self.H, self.KVH, self.D
        lin, i = [], 0
        for n in self.counts:
            lin.append(list(ws[i:i + n]))
            i += n
        qkv_s, o_s, gu_s, down_s = self.specs
        B = h.shape[0]
        x = rms_norm(h, in_norm, self.eps)
        qkv = _linear(qkv_s, x, lin[0])                                      # [B, (H + 2 KVH) D]
        qk = _rotary(qkv[:, :(H + KVH) * D].view(B, H + KVH, D), cos, sin)
        q, k, v = qk[:, :H], qk[:, H:], qkv[:, (H + KVH) * D:].view(B, KVH, D)
        nb, bs = k_cache.shape[0], k_cache.shape[1]
        k_cache.view(nb * bs, KVH, D).index_copy_(0, slots, k)
        v_cache.view(nb * bs, KVH, D).index_copy_(0, slots, v)
        flat, W = tables.reshape(-1), tables.shape[1]
        kk = k_cache.index_select(0, flat).view(B, W * bs, KVH, D).transpose(1, 2)   # [B, KVH, L, D]
        vv = v_cache.index_select(0, flat).view(B, W * bs, KVH, D).transpose(1, 2)
        o = F.scaled_dot_product_attention(q.reshape(B, KVH, H // KVH, D), kk, vv, attn_mask=mask,
                                           scale=self.scale)
        h = h + _linear(o_s, o.reshape(B, H * D), lin[1])
        x = rms_norm(h, post_norm, self.eps)
        g, u = _linear(gu_s, x, lin[2]).chunk(2, dim=-1)
        return h + _linear(down_s, F.silu(g) * u, lin[3])


def cache_dir() -> str:
    """Where compiled packages are kept."""
    return os.environ.get("PDCLUSTER_AOTI_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pdcluster",
                                                                  "aoti")


def _sources() -> bytes:
    """The code the compiled layer is traced from."""
    from pdcluster.engine import llama, rotary
    from pdcluster.engine.quant import cpu_linear
    out = b""
    for mod in (__import__(__name__, fromlist=["x"]), llama, rotary, cpu_linear):
        with open(mod.__file__, "rb") as f:
            out += f.read()
    return out


class CompiledDecode:
    """The model's decoder layers for pure-decode CPU steps, through one compiled layer. Build with
    CompiledDecode.build (None when the model or cache is not supported, or compiling fails)."""

    def __init__(self, run, layer_args: list[list[torch.Tensor]], block_size: int):
        self._run = run                        # flat tensor list in, output list out (no pytree per call)
        self.layer_args, self.block_size = layer_args, block_size
        self.steps = 0                         # steps served (tests, stats)

    @staticmethod
    def build(model, k_cache: torch.Tensor, v_cache: torch.Tensor) -> "CompiledDecode | None":
        """Compile (or load from the disk cache) the layer for this model and KV cache geometry."""
        if not isinstance(k_cache, torch.Tensor) or k_cache.device.type != "cpu" or model.triton:
            return None                                     # quantized KV cache, CUDA, Triton kernels
        if k_cache.shape[0] < 2:
            return None                                     # the package's pool-size dimension starts at 2
        specs, counts, layer_args = None, None, []
        for L in model.layers:
            got = [linear_spec(lin) for lin in (L.qkv, L.o, L.gate_up, L.down)]
            if any(g is None for g in got):
                return None
            s = tuple(g[0] for g in got)
            if specs is not None and s != specs:
                return None                                 # layers of different kernels (mixed GGUF types)
            specs, counts = s, tuple(len(g[1]) for g in got)
            layer_args.append([L.in_norm, L.post_norm] + [w for g in got for w in g[1]])
        c = model.cfg
        layer = DecodeLayer(specs, counts, c.num_heads, c.num_kv_heads, c.head_dim, c.rms_norm_eps, model.scale)
        bs = k_cache.shape[1]
        key = hashlib.sha256(repr((torch.__version__, torch.backends.cpu.get_cpu_capability(),
                                   torch.get_num_threads(), KERNEL_THREADS, specs, counts, c.num_heads, c.num_kv_heads,
                                   c.head_dim, c.hidden_size, c.rms_norm_eps, model.scale, str(model.dtype),
                                   str(k_cache.dtype), tuple(k_cache.shape[1:]),
                                   [(tuple(t.shape), str(t.dtype)) for t in layer_args[0]])).encode()
                             + _sources()).hexdigest()[:24]
        path = os.path.join(cache_dir(), f"decode_layer_{key}.pt2")
        try:
            t = time.perf_counter()
            if not os.path.exists(path):
                _compile(layer, model, k_cache, layer_args[0], bs, path)
                log.info("compiled the CPU decode layer in %.1f s -> %s", time.perf_counter() - t, path)
            run = _load(path)
        except Exception as e:                              # any export / compile / load failure: eager
            log.warning("CPU decode compile failed, decode steps stay eager: %s", str(e).splitlines()[0][:300])
            return None
        return CompiledDecode(run, layer_args, bs)

    def covers(self, num_tokens: int, meta) -> bool:
        """A pure-decode step the compiled layer takes: no prefill chunk, 1..MAX_ROWS-1 rows."""
        return not meta.prefills and 0 < num_tokens < MAX_ROWS and meta.decode_block_tables is not None

    def layer(self, li: int, h, k_cache, v_cache, meta, cos, sin) -> torch.Tensor:
        """Layer li of a covered step: h [B, E] in, h [B, E] out; the step's K/V written to the caches."""
        return self._run([h, k_cache, v_cache, meta.slot_mapping, meta.decode_block_tables, meta.decode_mask,
                          cos, sin] + self.layer_args[li])[0]


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


def _compile(layer: DecodeLayer, model, k_cache, args0: list[torch.Tensor], bs: int, path: str) -> None:
    """Export with dynamic rows / table width / pool size, compile to a package at `path` (atomically)."""
    B, W, NB = 2, 3, 8                                     # example sizes (> 1: 1 would be specialized)
    c = model.cfg
    kc = torch.zeros((NB,) + tuple(k_cache.shape[1:]), dtype=k_cache.dtype)
    vc = torch.zeros_like(kc)
    h = torch.zeros(B, c.hidden_size, dtype=model.dtype)
    tables = torch.arange(B * W, dtype=torch.int64).view(B, W) % NB
    mask = torch.ones(B, 1, 1, W * bs, dtype=torch.bool)
    slots = torch.arange(B, dtype=torch.int64)
    cos = torch.zeros(B, 1, c.head_dim, dtype=model.dtype)
    Dim = torch.export.Dim
    b, w, nb = Dim("rows", min=1, max=MAX_ROWS - 1), Dim("width", min=1), Dim("blocks", min=2)
    dyn = ({0: b}, {0: nb}, {0: nb}, {0: b}, {0: b, 1: w}, {0: b, 3: w * bs}, {0: b}, {0: b}, None, None,
           (None,) * (len(args0) - 2))          # norms, then the linears' weights (*ws)
    with torch.inference_mode(False), torch.no_grad():
        ep = torch.export.export(layer, (h, kc, vc, slots, tables, mask, cos, cos.clone(), *args0),
                                 dynamic_shapes=dyn)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".pt2", dir=os.path.dirname(path))
    os.close(fd)
    try:
        with _aten_mean(), torch._inductor.config.patch({"fx_graph_cache": False, "cpp.threads": KERNEL_THREADS}):
            torch._inductor.aoti_compile_and_package(ep, package_path=tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
