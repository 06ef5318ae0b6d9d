"""Kernel micro-benchmark: each Triton kernel vs its torch reference (and torch SDPA where it applies).

Needs an NVIDIA GPU; on any other machine it prints why and exits with status 2.

    python -m pdcluster.bench.kernels                              # Llama-3-8B-like layer: 32 q / 8 kv heads, d=128, bf16
    python -m pdcluster.bench.kernels --batch 64 --context 4096    # the decode target: >= 70% of copy bandwidth
    python -m pdcluster.bench.kernels --only decode --num-splits 1 2 4 8      # sweep the split-KV count
    python -m pdcluster.bench.kernels --heads 9 --kv-heads 3 --head-dim 64 --hidden 576   # SmolLM2-135M

Method.  "copy BW" is the device's measured copy bandwidth: bytes read + written by `dst.copy_(src)`
on a 1 GiB tensor.  Every call is timed with triton.testing.do_bench (CUDA events, L2 flushed before
each run, median).  "GB/s" is the kernel's minimum memory traffic (each input byte read once, each
output byte written once: the MB column) over its median time; "%BW" is that over the copy
bandwidth, the figure the decode target is stated in.  Prefill is compute bound: its TFLOP/s column
counts causal QK^T and PV only.  "xref" / "xsdpa" are baseline time / Triton time (> 1: Triton is
faster).  SDPA runs on dense, unpaged K/V of the same sizes; for w4a16 / w8a16 the same column holds
cuBLAS's F.linear on the dense weight in --dtype (what the packed weight replaces).  "err" is max|triton - ref| / max|ref|
on the benchmark's own inputs (a sanity check at bf16/fp16, where the tests cannot run).

--cpu-smoke runs tiny float32 shapes on CPU under TRITON_INTERPRET=1 to check this script's
plumbing; its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pdcluster.deploy.cli import HelpFormatter  # noqa: E402
from pdcluster.bench.outputs import Listed  # noqa: E402


NO_GPU = ("pdcluster.bench.kernels needs an NVIDIA GPU (torch.cuda.is_available() is False on this machine).\n"
          "Run it on a GPU host:  python -m pdcluster.bench.kernels    (python -m pdcluster.bench.kernels --cpu-smoke only "
          "checks the script)")
KERNELS = ("decode", "decode_int8", "prefill", "store_kv", "rms_norm", "rotary", "pack_kv", "unpack_kv", "w4a16",
           "w8a16")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter,
                                epilog=__doc__[__doc__.index("    python"):])
    p.add_argument("--batch", type=int, default=64, help="decode batch (sequences)")
    p.add_argument("--context", type=int, default=4096, help="decode context per sequence (tokens)")
    p.add_argument("--heads", type=int, default=32, help="query heads")
    p.add_argument("--kv-heads", type=int, default=8, help="KV heads (GQA groups)")
    p.add_argument("--head-dim", type=int, default=128, help="elements per head")
    p.add_argument("--hidden", type=int, default=4096, help="rms_norm width")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="dtype of activations, weights and KV cache")
    p.add_argument("--prefill-seqs", type=int, default=4, help="sequences in the prefill attention call")
    p.add_argument("--prefill-len", type=int, default=2048, help="new tokens per prefill sequence (no prefix)")
    p.add_argument("--tokens", type=int, default=4096, help="rows for store_kv / rms_norm / rotary")
    p.add_argument("--pack-blocks", type=int, default=256, help="blocks per pack_kv / unpack_kv call")
    p.add_argument("--linear-rows", type=int, nargs="*", default=Listed([1, 16, 256]),
                   help="rows of x for w4a16 / w8a16 (weight [4 * hidden, hidden], an MLP up projection)")
    p.add_argument("--num-splits", type=int, nargs="*", default=None,
                   help="decode split-KV counts to time (default: the launcher's heuristic only)")
    p.add_argument("--only", nargs="*", choices=KERNELS, default=None, help="run only these kernels (default: all)")
    p.add_argument("--no-ref", action="store_true", help="skip the torch references (slow, memory hungry)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU under the interpreter")
    return p.parse_args(argv)


@dataclass
class Row:
    name: str
    ms: float                                   # Triton median
    nbytes: int                                 # minimum memory traffic
    flops: float = 0.0
    base: dict[str, float] = field(default_factory=dict)   # baseline name -> ms
    err: float | None = None


# ---------------------------------------------------------------- timing

def make_timer(device: str):
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")

    def cpu_timer(fn):
        fn()
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)

    return cpu_timer


def copy_bandwidth(device: str, timer) -> float:
    """Bytes/s of dst.copy_(src): read + write of a 1 GiB buffer (16 MiB for --cpu-smoke)."""
    import torch

    n = (1 << 30) if device == "cuda" else (16 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * n / (ms * 1e-3)


def rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


# ---------------------------------------------------------------- cases

def _paged(torch, num_seqs, ctx, kvh, d, bs, dtype, dev):
    """Caches holding num_seqs x ctx tokens in randomly scattered blocks."""
    nb = -(-ctx // bs)
    num_blocks = num_seqs * nb + 8
    kc = torch.randn(num_blocks, bs, kvh, d, device=dev).to(dtype)
    vc = torch.randn_like(kc)
    bt = torch.randperm(num_blocks, device=dev)[: num_seqs * nb].view(num_seqs, nb).int()
    return kc, vc, bt


def _sdpa(torch, q, k, v, causal, scale):
    """torch SDPA with GQA; falls back to repeating K/V heads where enable_gqa is unsupported."""
    F = torch.nn.functional
    try:
        F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=True)
        return "sdpa", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                                              enable_gqa=True)
    except (RuntimeError, TypeError):
        g = q.shape[1] // k.shape[1]
        k2, v2 = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        return "sdpa", lambda: F.scaled_dot_product_attention(q, k2, v2, is_causal=causal, scale=scale)


def versus_ref(a, timer, ours, ref) -> tuple[dict, float | None]:
    """({"ref": ms of ref()}, relative error of `ours` against ref()'s output); ({}, None) with --no-ref."""
    if a.no_ref:
        return {}, None
    err = rel_err(ours, ref())
    return {"ref": timer(ref)}, err


def case_decode(a, torch, K, dev, dtype, timer) -> list[Row]:
    B, ctx, H, kvh, D = a.batch, a.context, a.heads, a.kv_heads, a.head_dim
    kc, vc, bt = _paged(torch, B, ctx, kvh, D, a.block_size, dtype, dev)
    q = torch.randn(B, H, D, device=dev).to(dtype)
    lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
    scale = D ** -0.5
    el = kc.element_size()
    nbytes = 2 * B * ctx * kvh * D * el + 2 * q.numel() * el + bt.numel() * 4 + B * 4
    base = {}
    ref = None
    if not a.no_ref:
        ref = K.paged_decode_attention_ref(q, kc, vc, bt, lens, scale)
        base["ref"] = timer(lambda: K.paged_decode_attention_ref(q, kc, vc, bt, lens, scale))
    kd = torch.randn(B, kvh, ctx, D, device=dev).to(dtype)
    name, sdpa = _sdpa(torch, q[:, :, None], kd, kd.clone(), False, scale)
    base[name] = timer(sdpa)
    rows = []
    for ns in (a.num_splits or [None]):
        out = K.paged_decode_attention(q, kc, vc, bt, lens, scale, num_splits=ns)
        if ns is None:
            from pdcluster.kernels.decode_attention import default_num_splits

            ns = default_num_splits(B, kvh, bt.shape[1] * a.block_size, q.device)
        ms = timer(lambda: K.paged_decode_attention(q, kc, vc, bt, lens, scale, num_splits=ns))
        rows.append(Row(f"decode B={B} ctx={ctx} splits={ns}", ms, nbytes, 4 * B * H * ctx * D, dict(base),
                        rel_err(out, ref) if ref is not None else None))
    return rows


def case_decode_int8(a, torch, K, dev, dtype, timer) -> list[Row]:
    """Decode over an int8 KV cache (codes + a float32 scale per (block, kv head)): half the bytes of bf16."""
    from pdcluster.kernels.store_kv import quantize
    B, ctx, H, kvh, D = a.batch, a.context, a.heads, a.kv_heads, a.head_dim
    kc, vc, bt = _paged(torch, B, ctx, kvh, D, a.block_size, dtype, dev)
    ks, vs = (c.float().abs().amax((1, 3)) / 127 for c in (kc, vc))                 # [num_blocks, kvh]
    kq, vq = (quantize(c, (1 / s)[:, None, :, None], "int8") for c, s in ((kc, ks), (vc, vs)))
    del kc, vc
    q = torch.randn(B, H, D, device=dev).to(dtype)
    lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
    scale = D ** -0.5
    nbytes = 2 * B * ctx * kvh * D + 2 * q.numel() * q.element_size() + bt.numel() * 4 + B * 4 + 2 * ks.numel() * 4
    run = lambda: K.paged_decode_attention(q, kq, vq, bt, lens, scale, k_scale=ks, v_scale=vs)  # noqa: E731
    out = run()
    base, err = versus_ref(a, timer, out, lambda: K.paged_decode_attention_ref(q, kq, vq, bt, lens, scale,
                                                                              k_scale=ks, v_scale=vs))
    return [Row(f"decode int8 KV B={B} ctx={ctx}", timer(run), nbytes, 4 * B * H * ctx * D, base, err)]


def case_wq(a, torch, K, dev, dtype, timer, bits: int) -> list[Row]:
    """Weight-only int4 (groups of 32, scale + zero) / int8 (per row) linear, x [M, hidden] @ W^T,
    W [4 * hidden, hidden]; beside cuBLAS on the dense weight."""
    from pdcluster.engine.quant.packed import quantize_int4, quantize_int8
    N, Kd = 4 * a.hidden, a.hidden
    w = torch.randn(N, Kd, device=dev, dtype=torch.float32) * 0.02
    p = quantize_int4(w) if bits == 4 else quantize_int8(w)
    wd = w.to(dtype)
    del w
    args = (p.q, p.scale, p.zero) if bits == 4 else (p.q, p.scale)
    fn, ref = (K.w4a16_matmul, K.w4a16_matmul_ref) if bits == 4 else (K.w8a16_matmul, K.w8a16_matmul_ref)
    wbytes = sum(t.numel() * t.element_size() for t in args)
    rows = []
    for M in a.linear_rows:
        x = torch.randn(M, Kd, device=dev).to(dtype)
        out = fn(x, *args)
        base, err = versus_ref(a, timer, out, lambda: ref(x, *args))
        base["sdpa"] = timer(lambda: torch.nn.functional.linear(x, wd))
        nbytes = wbytes + (x.numel() + M * N) * x.element_size()
        rows.append(Row(f"w{bits}a16 M={M} {N}x{Kd}", timer(lambda: fn(x, *args)), nbytes, 2 * M * N * Kd, base, err))
    return rows


def case_prefill(a, torch, K, dev, dtype, timer) -> list[Row]:
    S, n, H, kvh, D = a.prefill_seqs, a.prefill_len, a.heads, a.kv_heads, a.head_dim
    kc, vc, bt = _paged(torch, S, n, kvh, D, a.block_size, dtype, dev)
    q = torch.randn(S * n, H, D, device=dev).to(dtype)
    cu = torch.arange(0, S + 1, device=dev, dtype=torch.int32) * n
    lens = torch.full((S,), n, dtype=torch.int32, device=dev)
    scale = D ** -0.5
    el = kc.element_size()
    nbytes = 2 * S * n * kvh * D * el + 2 * q.numel() * el
    flops = 4.0 * S * H * D * n * (n + 1) / 2

    def run():
        return K.paged_prefill_attention(q, kc, vc, bt, cu, lens, scale, max_seqlen_q=n)

    base, err = versus_ref(a, timer, run(), lambda: K.paged_prefill_attention_ref(q, kc, vc, bt, cu, lens, scale))
    kd = torch.randn(S, kvh, n, D, device=dev).to(dtype)
    name, sdpa = _sdpa(torch, q.view(S, n, H, D).transpose(1, 2).contiguous(), kd, kd.clone(), True, scale)
    base[name] = timer(sdpa)
    return [Row(f"prefill {S}x{n} causal", timer(run), nbytes, flops, base, err)]


def case_store_kv(a, torch, K, dev, dtype, timer) -> list[Row]:
    T, kvh, D, bs = a.tokens, a.kv_heads, a.head_dim, a.block_size
    kc = torch.zeros(-(-T // bs) * 2, bs, kvh, D, device=dev, dtype=dtype)
    vc = torch.zeros_like(kc)
    k, v = torch.randn(T, kvh, D, device=dev).to(dtype), torch.randn(T, kvh, D, device=dev).to(dtype)
    slots = torch.randperm(kc.shape[0] * bs, device=dev)[:T]
    K.store_kv(k, v, kc, vc, slots)
    kr, vr = torch.zeros_like(kc), torch.zeros_like(vc)
    base, err = versus_ref(a, timer, kc, lambda: (K.store_kv_ref(k, v, kr, vr, slots), kr)[1])
    ms = timer(lambda: K.store_kv(k, v, kc, vc, slots))
    return [Row(f"store_kv T={T}", ms, 4 * k.numel() * k.element_size() + 8 * T, 0, base, err)]


def case_rms_norm(a, torch, K, dev, dtype, timer) -> list[Row]:
    T, h = a.tokens, a.hidden
    x, r = torch.randn(T, h, device=dev).to(dtype), torch.randn(T, h, device=dev).to(dtype)
    w = torch.randn(h, device=dev).to(dtype)
    out, _ = K.rms_norm(x, w, 1e-5, residual=r)
    base, err = versus_ref(a, timer, out, lambda: K.rms_norm_ref(x, w, 1e-5, residual=r)[0])
    ms = timer(lambda: K.rms_norm(x, w, 1e-5, residual=r))
    return [Row(f"rms_norm+residual {T}x{h}", ms, 4 * x.numel() * x.element_size(), 0, base, err)]


def case_rotary(a, torch, K, dev, dtype, timer) -> list[Row]:
    T, H, kvh, D = a.tokens, a.heads, a.kv_heads, a.head_dim
    inv = 1.0 / 10000 ** (torch.arange(0, D, 2, device=dev).float() / D)
    f = torch.outer(torch.arange(8192, device=dev).float(), inv)
    cs = torch.cat([f.cos(), f.sin()], -1)
    pos = torch.randint(0, 8192, (T,), device=dev)
    fused = torch.randn(T, (H + 2 * kvh) * D, device=dev).to(dtype)
    q, k = fused[:, : H * D], fused[:, H * D:(H + kvh) * D]
    f2 = fused.clone()
    q2, k2 = f2[:, : H * D], f2[:, H * D:(H + kvh) * D]
    K.rotary_embedding(pos, q, k, cs, D)
    f2_once = None

    def ref():      # the error is taken after one application, like ours; timing re-applies it
        nonlocal f2_once
        K.rotary_embedding_ref(pos, q2, k2, cs, D)
        if f2_once is None:
            f2_once = f2.clone()
        return f2_once
    base, err = versus_ref(a, timer, fused, ref)
    ms = timer(lambda: K.rotary_embedding(pos, q, k, cs, D))
    nbytes = 2 * T * (H + kvh) * D * fused.element_size() + T * D * 4 + T * 8
    return [Row(f"rotary T={T}", ms, nbytes, 0, base, err)]


def case_pack(a, torch, K, dev, dtype, timer, unpack: bool) -> list[Row]:
    n, kvh, D, bs = a.pack_blocks, a.kv_heads, a.head_dim, a.block_size
    kc = torch.randn(4 * n, bs, kvh, D, device=dev).to(dtype)
    vc = torch.randn_like(kc)
    ids = torch.randperm(4 * n, device=dev)[:n]
    dst = torch.randperm(4 * n, device=dev)[:n]
    rows = []
    for quant in (None, "int8", "fp8"):
        buf, sc = K.pack_kv(kc, vc, ids, quant=quant)
        moved = 2 * n * bs * kvh * D * (kc.element_size() + buf.element_size())
        if unpack:
            k2, v2 = torch.zeros_like(kc), torch.zeros_like(vc)
            K.unpack_kv(buf, sc, k2, v2, dst)
            k3, v3 = torch.zeros_like(kc), torch.zeros_like(vc)
            base, err = versus_ref(a, timer, k2, lambda: (K.unpack_kv_ref(buf, sc, k3, v3, dst), k3)[1])
            ms = timer(lambda: K.unpack_kv(buf, sc, k2, v2, dst))
        else:
            base, err = versus_ref(a, timer, buf, lambda: K.pack_kv_ref(kc, vc, ids, quant=quant)[0])
            ms = timer(lambda: K.pack_kv(kc, vc, ids, quant=quant))
        rows.append(Row(f"{'unpack' if unpack else 'pack'}_kv {n} blocks {quant or 'raw'}", ms, moved, 0, base, err))
    return rows


# ---------------------------------------------------------------- report

def print_table(rows: list[Row], copy_bw: float, header: str) -> None:
    print(header)
    cols = f"{'kernel':<40} {'ms':>9} {'MB':>9} {'GB/s':>8} {'%BW':>6} {'TFLOP/s':>8} {'ref ms':>9} " \
           f"{'xref':>7} {'sdpa ms':>9} {'xsdpa':>7} {'err':>8}"
    print(cols)
    print("-" * len(cols))
    for r in rows:
        bw = r.nbytes / (r.ms * 1e-3)
        ref, sdpa = r.base.get("ref"), r.base.get("sdpa")
        fmt = (lambda v, f: format(v, f) if v is not None else "-")
        print(f"{r.name:<40} {r.ms:>9.4f} {r.nbytes / 1e6:>9.1f} {bw / 1e9:>8.1f} {100 * bw / copy_bw:>5.0f}% "
              f"{fmt(r.flops / (r.ms * 1e-3) / 1e12 if r.flops else None, '8.1f'):>8} "
              f"{fmt(ref, '9.4f'):>9} {fmt(ref / r.ms if ref else None, '7.2f'):>7} "
              f"{fmt(sdpa, '9.4f'):>9} {fmt(sdpa / r.ms if sdpa else None, '7.2f'):>7} "
              f"{fmt(r.err, '8.1e'):>8}")


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"                     # before `kernels` is first imported
        a.batch, a.context, a.heads, a.kv_heads, a.head_dim = 2, 40, 4, 2, 16
        a.hidden, a.tokens, a.prefill_seqs, a.prefill_len, a.pack_blocks = 64, 8, 2, 20, 3
        a.linear_rows = [1, 3]
        a.dtype = "float32"
    import torch

    if not a.cpu_smoke and not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 2
    import pdcluster.kernels as K

    dev = "cpu" if a.cpu_smoke else "cuda"
    dtype = getattr(torch, a.dtype)
    torch.manual_seed(0)
    timer = make_timer(dev)
    bw = copy_bandwidth(dev, timer)
    name = torch.cuda.get_device_name() if dev == "cuda" else "CPU (interpreter smoke run: numbers are meaningless)"
    cases = {"decode": case_decode, "decode_int8": case_decode_int8, "prefill": case_prefill,
             "w4a16": lambda *x: case_wq(*x, bits=4), "w8a16": lambda *x: case_wq(*x, bits=8), "store_kv": case_store_kv, "rms_norm": case_rms_norm,
             "rotary": case_rotary,
             "pack_kv": lambda *x: case_pack(*x, unpack=False), "unpack_kv": lambda *x: case_pack(*x, unpack=True)}
    rows: list[Row] = []
    for k in a.only or KERNELS:
        rows += cases[k](a, torch, K, dev, dtype, timer)
        torch.cuda.empty_cache() if dev == "cuda" else None
    print_table(rows, bw, f"{name}: copy BW {bw / 1e9:.0f} GB/s; {a.dtype}; heads {a.heads}/{a.kv_heads} "
                          f"x {a.head_dim}; block_size {a.block_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
