"""The request rules the engine and the router both apply, defined once. Pure Python.

The router ends a stream by the same rule the engine stops a request by (its first token comes from
the prefill worker, so the router judges that one itself), and refuses a request no decode worker's
pool could ever hold by the engine's own admission arithmetic.
"""
from __future__ import annotations

from pdcluster.engine.sampling_params import SamplingParams


def finish_reason(token: int, num_output: int, num_tokens: int, params: SamplingParams,
                  eos_token_ids, max_model_len: int) -> str | None:
    """"stop" | "length" | None, right after `token` was appended: num_output tokens generated so
    far, num_tokens in all (prompt + output). Stop strings are the detokenizer's to judge."""
    if stops_by_token(token, params, eos_token_ids):
        return "stop"
    if num_output >= params.max_tokens or num_tokens >= max_model_len:
        return "length"
    return None


def stops_by_token(token: int, params: SamplingParams, eos_token_ids) -> bool:
    """token ends the request by itself (an EOS unless ignore_eos, or one of stop_token_ids). It stays in the
    request's token ids, but its text is not the answer's: vLLM's (include_stop_str_in_output off)."""
    return (token in eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids


def blocks_for_lifetime(num_prompt_tokens: int, max_tokens: int, block_size: int) -> int:
    """KV blocks a request holds at its longest (prompt + every output token)."""
    return -(-(num_prompt_tokens + max_tokens) // block_size)


def blocks_at_first_token(num_prompt_tokens: int, block_size: int) -> int:
    """KV blocks a request holds once its first token is sampled (prompt + 1): what placing its
    prefill takes from a pool. Never more than blocks_for_lifetime with max_tokens >= 1, so a
    request that fits a pool for its lifetime is never refused a placement for this."""
    return -(-(num_prompt_tokens + 1) // block_size)
