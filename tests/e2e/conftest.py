"""Shared heavy fixtures: the engine on the embedded model and the transformers reference."""
import pytest
import torch

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "1, 2, 3, 4,",
    "Explain why the sky is blue in one sentence.",
    "List three fruits:",
    "The quick brown fox",
    "import numpy as np\n",
    "Translate to French: Good morning, how are you?",
    "Q: What is 12 times 12?\nA:",
    "A haiku about autumn:\n",
    "In 1969, humans first",
    "The best way to learn programming is",
    "Water boils at",
    "Dear Sir or Madam,\nI am writing to",
    "Photosynthesis is the process by which plants " * 6,   # a longer prompt (~50 tokens)
]


@pytest.fixture(scope="session")
def hf_ref():
    """transformers' own GGUF load of the embedded model (independent of our loader), float32; the
    same object tests/unit/test_loader.py loaded when both run in one process."""
    from tests.hf_reference import transformers_gguf_model
    return transformers_gguf_model()


@pytest.fixture(scope="session")
def llm():
    """The float32 engine (the GGUF dequantized: quantization "none"); the packed default has its own
    tests (test_quantized_vs_hf.py) and the faults/ clusters run it."""
    from pdcluster.engine import LLM
    return LLM(dtype="float32", quantization="none", kv_cache_memory=256 * 2**20, max_num_seqs=32)


_GREEDY: dict[tuple, tuple[int, list[int]]] = {}     # (model, prompt) -> (tokens asked, tokens got)


@torch.inference_mode()
def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """The reference's greedy continuation: n tokens (fewer if it stops at EOS). Kept per (model,
    prompt) for the session: each step sees only the tokens before it, so a shorter run is a longer
    run's head, and the modules that ask for the same prompts generate them once."""
    key = (model, tuple(ids))
    asked, toks = _GREEDY.get(key, (0, []))
    if n > asked and len(toks) == asked:        # not enough, and the earlier run did not stop at EOS
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=0)
        asked, toks = n, out[0, len(ids):].tolist()
        _GREEDY[key] = asked, toks
    return toks[:n]


def _eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos) if isinstance(eos, (list, tuple)) else {eos}


@torch.inference_mode()
def check_top5(model, prompt: list[int], ours: list[int], ref: list[int], max_off: float = 0.2,
               processor=None) -> int:
    """Our greedy tokens against the reference's, token by token. Returns the number of leading
    tokens equal to the reference's greedy output `ref`. The reference, fed our own tokens so far (one
    forward over prompt + ours), judges each step:
    - every one of our tokens is in its top-5 at that step (the near-tie rule; it goes on past a
      divergence, teacher-forced, so the rest of the run is judged too, not dropped as vLLM's check does);
    - at most max(1, max_off x steps) of them are not its argmax: a near-tie is rare, and an engine
      that is never greedy (each token the runner-up) fails however close the runners-up are;
    - without a divergence, the runs end together: ours neither stops early nor runs past EOS.
    ours must not be empty (a request always gets at least one token). processor: a transformers
    LogitsProcessor the reference's generate() applied (e.g. a repetition penalty), applied per step here too."""
    assert ours, "no tokens to compare"
    logits = model(torch.tensor([prompt + ours[:-1]])).logits[0, len(prompt) - 1:]
    if processor is not None:
        logits = torch.cat([processor(torch.tensor([prompt + ours[:j]]), logits[j:j + 1]) for j in range(len(ours))])
    top5 = torch.topk(logits, 5, dim=-1).indices.tolist()
    bad = [(j, t, top5[j]) for j, t in enumerate(ours) if t not in top5[j]]
    assert not bad, f"(step, ours, reference top-5) outside the rule: {bad[:3]}"
    off = [(j, t, top5[j][0]) for j, t in enumerate(ours) if t != top5[j][0]]
    assert len(off) <= max(1, int(max_off * len(ours))), \
        f"{len(off)} of {len(ours)} tokens not the reference's argmax (step, ours, argmax): {off[:4]}"
    same = next((j for j, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
    if same == min(len(ours), len(ref)):      # no divergence: the runs end at the same step
        assert len(ours) == len(ref), f"no divergence, yet ours ends at {len(ours)}, the reference at {len(ref)}"
    eos = _eos_ids(model)
    assert not any(t in eos for t in ours[:-1]), f"a token after EOS: {ours}"
    return same


@pytest.fixture(scope="session")
def cluster():
    """One router + 1 prefill + 1 decode Ray actor for the whole session (Ray names actors uniquely).
    Drive it with cluster.run(coro): the gRPC server lives on this fixture's event loop.
    Policy least-loaded: every request prefills remotely, so these tests exercise the disaggregated
    path (KV transfer, placement.remote_prefill); the default cost model would prefill these short
    prompts on the idle decode worker. Tests of the cost model swap it in (test_cluster.py)."""
    import asyncio

    from pdcluster.deploy.config import ClusterConfig, EngineSection, ServerSection
    from pdcluster.deploy.launch import Cluster
    from pdcluster.engine.config import CacheConfig
    from pdcluster.router.config import RouterConfig
    loop = asyncio.new_event_loop()
    from tests.procs import free_port
    cfg = ClusterConfig(server=ServerSection(port=0, metrics_port=0, http_port=free_port()),
                        router=RouterConfig(policy="least-loaded"),
                        engine=EngineSection(cache=CacheConfig(kv_cache_memory=96 * 2**20),
                                             quantization="none"))    # the float engine, like `llm`
    c = loop.run_until_complete(Cluster(cfg).start())
    c.loop = loop
    c.run = loop.run_until_complete
    yield c
    loop.run_until_complete(c.stop())
    loop.close()


# the OpenAI HTTP API's client on the session cluster (test_openai_api.py, test_openai_tools.py)

def base_url(cluster) -> str:
    return f"http://127.0.0.1:{cluster.http.port}/v1"


def sync(cluster, fn):
    """Run a blocking client call while the cluster's loop (which serves HTTP) runs."""
    import asyncio
    return cluster.run(asyncio.to_thread(fn))


@pytest.fixture(scope="module")
def client(cluster):
    import openai
    return openai.OpenAI(base_url=base_url(cluster), api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(cluster, client):
    return sync(cluster, client.models.list).data[0].id
