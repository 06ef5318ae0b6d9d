"""Builders and comparisons shared by the kernel tests (small float32 shapes for the interpreter)."""
from __future__ import annotations

import torch

NAN = float("nan")


def assert_rel(out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4, what: str = "") -> None:
    """max|out - ref| / max|ref| < tol, and no NaN/inf anywhere in out (poisoned = unwritten)."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: {int((~torch.isfinite(out)).sum())} non-finite (unwritten?) elements"
    assert torch.isfinite(ref).all(), f"{what}: reference has non-finite elements"
    err = (out.double() - ref.double()).abs().max().item() if out.numel() else 0.0
    denom = max(ref.double().abs().max().item() if ref.numel() else 0.0, 1e-30)
    assert err / denom < tol, f"{what}: relative error {err / denom:.3e} >= {tol:.0e}"


def make_paged(seq_lens: list[int], block_size: int, num_kv_heads: int, head_dim: int,
               spare_blocks: int = 3, device: str = "cpu"):
    """A one-layer paged cache holding `seq_lens` tokens per sequence in shuffled blocks.

    Every position that no sequence owns (free blocks, rows past a sequence's length) is NaN and
    block_tables entries past a sequence's blocks are out of range: a kernel that reads anything it
    should not produces NaN or faults.
    Returns k_cache, v_cache [num_blocks, bs, kvh, D], block_tables int32 [S, max_blocks].
    """
    need = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(need) + spare_blocks
    width = max(need + [1]) + 1                                  # one never-used column
    perm = torch.randperm(num_blocks).tolist()
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), NAN, device=device)
    v_cache = torch.full_like(k_cache, NAN)
    block_tables = torch.full((len(seq_lens), width), num_blocks + 1000, dtype=torch.int32)
    for s, n in enumerate(seq_lens):
        ids = [perm.pop() for _ in range(need[s])]
        block_tables[s, : need[s]] = torch.tensor(ids, dtype=torch.int32)
        for t in range(n):                                        # small shapes: a loop is fine
            b, r = ids[t // block_size], t % block_size
            k_cache[b, r] = torch.randn(num_kv_heads, head_dim)
            v_cache[b, r] = torch.randn(num_kv_heads, head_dim)
    return k_cache, v_cache, block_tables.to(device)


def gather_seq(cache: torch.Tensor, block_tables: torch.Tensor, s: int, n: int) -> torch.Tensor:
    """Positions 0..n-1 of sequence s, one token at a time (the definition, for naive references)."""
    bs = cache.shape[1]
    rows = [cache[int(block_tables[s, t // bs]), t % bs] for t in range(n)]
    return torch.stack(rows) if rows else cache.new_zeros((0,) + tuple(cache.shape[2:]))


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: list[int], scale: float):
    """q [n, H, D] at absolute positions q_pos, k/v [L, kvh, D]; causal; float64 loops over heads."""
    n, H, D = q.shape
    group = H // k.shape[1]
    out = torch.zeros(n, H, D, dtype=torch.float64)
    for i in range(n):
        L = q_pos[i] + 1
        for h in range(H):
            kk, vv = k[:L, h // group].double(), v[:L, h // group].double()
            p = torch.softmax(kk @ q[i, h].double() * scale, dim=0)
            out[i, h] = p @ vv
    return out


def llama_weights(cfg, seed: int = 0, std: float = 0.2, head_scale: float | None = None) -> dict[str, torch.Tensor]:
    """A random Llama state dict for ModelConfig `cfg` (HF names), N(0, std) weights, norms near 1.
    head_scale: an untied LM head (cfg.tie_word_embeddings False) and embedding scaled by it, so greedy
    logits are peaked and not the input token's own row."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * std  # noqa: E731
    c = cfg
    sd = {"model.embed_tokens.weight": r(c.vocab_size, c.hidden_size) * (head_scale or 1),
          "model.norm.weight": 1 + r(c.hidden_size)}
    if head_scale is not None:
        sd["lm_head.weight"] = r(c.vocab_size, c.hidden_size) * head_scale
    for i in range(c.num_layers):
        p = f"model.layers.{i}"
        sd |= {f"{p}.self_attn.q_proj.weight": r(c.q_size, c.hidden_size),
               f"{p}.self_attn.k_proj.weight": r(c.kv_size, c.hidden_size),
               f"{p}.self_attn.v_proj.weight": r(c.kv_size, c.hidden_size),
               f"{p}.self_attn.o_proj.weight": r(c.hidden_size, c.q_size),
               f"{p}.mlp.gate_proj.weight": r(c.intermediate_size, c.hidden_size),
               f"{p}.mlp.up_proj.weight": r(c.intermediate_size, c.hidden_size),
               f"{p}.mlp.down_proj.weight": r(c.hidden_size, c.intermediate_size),
               f"{p}.input_layernorm.weight": 1 + r(c.hidden_size),
               f"{p}.post_attention_layernorm.weight": 1 + r(c.hidden_size)}
    return sd
