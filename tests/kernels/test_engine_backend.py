"""The engine on the Triton kernels (interpreted on CPU) matches its torch path, step by step, through
chunked prefill, a prefix-cache hit and batched decodes. A tiny random Llama keeps the interpreter quick."""
import torch

from pdcluster.engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdcluster.engine.kv_cache_manager import KVCacheManager
from pdcluster.engine.llama import LlamaModel
from pdcluster.engine.model_runner import ModelRunner
from pdcluster.engine.request import Request
from pdcluster.engine.sampling_params import SamplingParams
from pdcluster.engine.scheduler import Scheduler

from .kernel_testlib import llama_weights

CFG = ModelConfig(name="tiny", path="-", vocab_size=96, hidden_size=48, intermediate_size=64, num_layers=2,
                  num_heads=6, num_kv_heads=2, head_dim=8, max_position_embeddings=256, tie_word_embeddings=True)


def weights(seed=0):
    return llama_weights(CFG, seed)


def run(backend: str, device: str, kv_cache_dtype: str = "auto"):
    cfg = EngineConfig(model=CFG, cache=CacheConfig(block_size=16, num_blocks=24),
                       sched=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=40), attention_backend=backend,
                       kv_cache_dtype=kv_cache_dtype, device=device)
    model = LlamaModel(CFG, weights(), device, torch.float32, backend)     # both paths on the kernels' device
    assert model.triton == (backend == "triton")
    kv = KVCacheManager(24, 16)
    sched = Scheduler(cfg.sched, kv, 256)
    runner = ModelRunner(cfg, model, 24)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (1, 21, 50, 17)]
    prompts.append(prompts[2][:40] + [5, 6, 7])            # shares 2 full blocks with prompt 2
    reqs = [Request(p, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), block_size=16) for p in prompts]
    for r in reqs[:4]:
        sched.add(r)
    hidden_log = []
    step = 0
    while sched.has_work() or step == 0:
        if step == 3:
            sched.add(reqs[4])
        b = sched.schedule()
        ids, pos, meta, rows = runner.prepare(b)
        h = model.forward(ids, pos, meta, runner.k_caches, runner.v_caches)
        hidden_log.append(h)
        logits = model.logits(h[rows])
        sched.update(b, [int(logits[i].argmax()) if b.samples(i) else None for i in range(len(b))])
        step += 1
    assert reqs[4].num_cached_tokens == 32
    return [r.output_token_ids for r in reqs], hidden_log


def test_triton_backend_matches_torch_path(device):
    t_out, t_h = run("torch", device)
    k_out, k_h = run("triton", device)
    assert t_out == k_out
    for a, b in zip(t_h, k_h):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (a - b).abs().max()


def test_triton_backend_matches_torch_path_over_an_int8_kv_cache(device):
    """The same engine over an int8 KV cache (engine/kv_quant.py): llama's Triton path hands the
    kernels codes + scales. Prefill chunks attend over their own fresh float K/V on the torch path
    but read them back quantized in the Triton kernel, so hidden states agree to the quantization's
    error, not to 1e-4; the float run is the control that this tolerance still separates."""
    t_out, t_h = run("torch", device, "int8")
    k_out, k_h = run("triton", device, "int8")
    f_out, f_h = run("torch", device)
    assert t_out == k_out
    rel = lambda x, y: max(float((a - b).norm() / b.norm()) for a, b in zip(x, y))   # noqa: E731
    err, quant_err = rel(k_h, t_h), rel(t_h, f_h)
    print(f"triton vs torch over int8 KV: {err:.2e}; int8 vs float KV (torch): {quant_err:.2e}")
    assert 1e-4 < quant_err and err < 0.05, (err, quant_err)
