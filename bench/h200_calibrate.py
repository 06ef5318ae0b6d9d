"""Measure a GPU's roofline figures for the simulator's hardware profile (sim/hardware.py): bf16 GEMM and
a Llama-3-8B-shaped model's prefill (random weights: timing needs shapes, not values), decode-step
linears as one CUDA graph (weight reads at batch 1..256), and GQA decode attention over a KV cache.

Prints JSON: achieved FLOP/s and bytes/s, and the fractions of the profile's peaks (mfu, bw_eff).
Needs torch with CUDA and transformers; run on the GPU whose profile it calibrates.
"""
from __future__ import annotations

import argparse
import json
import time


def timed(fn, warm: int = 3, iters: int = 10) -> float:
    """Seconds per call (CUDA events, after warm-up)."""
    import torch
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / 1e3 / iters


def main(argv=None) -> None:
    from pdcluster.deploy.cli import HelpFormatter
    ap = argparse.ArgumentParser(prog="python -m pdcluster.bench.h200_calibrate", description=__doc__.split("\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--profile", default="H200", help="sim/hardware.py profile whose peaks the fractions use")
    ap.add_argument("--out", default=None, help="write the JSON here too")
    a = ap.parse_args(argv)
    import torch
    import torch.nn.functional as F
    from pdcluster.sim.hardware import hardware
    from pdcluster.sim.models import model as model_profile
    hw, m = hardware(a.profile), model_profile("llama-3-8b")
    dev, dt = "cuda", torch.bfloat16
    out: dict = {"device": torch.cuda.get_device_name(), "profile": hw.name, "peak_flops": hw.peak_flops,
                 "mem_bw": hw.mem_bw}
    # 1. GEMM at prefill shapes (MLP up projection)
    g = {}
    for t in (512, 2048, 8192):
        x, w = torch.randn(t, 4096, device=dev, dtype=dt), torch.randn(14336, 4096, device=dev, dtype=dt)
        g[t] = 2 * t * 4096 * 14336 / timed(lambda: x @ w.T)
    out["gemm_flops"] = g
    # 2. decode-step linears (32 layers of Llama-3-8B + the head) as one CUDA graph, per batch size
    shapes = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)]
    ws = [[torch.randn(o, i, device=dev, dtype=dt) for o, i in shapes] for _ in range(m.layers)]
    head = torch.randn(m.vocab, 4096, device=dev, dtype=dt)
    nbytes = sum(w.numel() for layer in ws for w in layer) * 2 + head.numel() * 2
    dec = {}
    for b in (1, 8, 32, 64, 128, 256):
        x, x2 = torch.randn(b, 4096, device=dev, dtype=dt), torch.randn(b, 14336, device=dev, dtype=dt)

        def step():
            for layer in ws:
                for w in layer:
                    (x2 if w.shape[1] == 14336 else x) @ w.T
            x @ head.T
        step()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        s = timed(graph.replay)
        dec[b] = {"s": s, "bytes_per_s": nbytes / s, "flops": 2 * b * nbytes / 2 / s}
    out["decode_linears"] = {"weight_bytes": nbytes, "by_batch": dec}
    del ws, head
    torch.cuda.empty_cache()
    # 3. decode attention: one layer's GQA over b sequences of ctx tokens (32 q heads, 8 kv heads, dim 128)
    att = {}
    for b, ctx in ((32, 4096), (64, 8192), (16, 32768)):
        q = torch.randn(b, 32, 1, 128, device=dev, dtype=dt)
        k, v = (torch.randn(b, 8, ctx, 128, device=dev, dtype=dt) for _ in range(2))
        s = timed(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        att[f"{b}x{ctx}"] = {"s_per_layer": s, "kv_bytes_per_s": 2 * k.numel() * 2 / s}
        del q, k, v
    out["decode_attention"] = att
    # 4. the whole model's prefill, random weights, one sequence, head on the last token only
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=m.vocab, hidden_size=4096, intermediate_size=14336, num_hidden_layers=m.layers,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                      attn_implementation="sdpa")
    t0 = time.perf_counter()
    with torch.device(dev):
        torch.set_default_dtype(dt)
        net = LlamaForCausalLM(cfg).eval()
    out["model_build_s"] = time.perf_counter() - t0
    pre = {}
    with torch.no_grad():
        for t in (1024, 4096, 16384):
            ids = torch.randint(0, m.vocab, (1, t), device=dev)
            s = timed(lambda: net(input_ids=ids, logits_to_keep=1, use_cache=False), warm=2, iters=5)
            flops = 2 * m.layer_params * t + 2 * m.head_params + 4 * m.layers * m.q_dim * t * t / 2
            pre[t] = {"s": s, "tokens_per_s": t / s, "flops": flops / s, "mfu": flops / s / hw.peak_flops}
    out["prefill"] = pre
    out["mfu_gemm_8192"] = g[8192] / hw.peak_flops
    out["bw_eff_decode_b1"] = dec[1]["bytes_per_s"] / hw.mem_bw
    print(json.dumps(out, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
