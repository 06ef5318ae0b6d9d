"""engine/sampling_params.py SamplingParams: what a vLLM user passes, read as vLLM reads it, and a
ValueError naming the field for anything else (never a TypeError from deep inside)."""
import numpy as np
import pytest

from pdcluster.engine.sampling_params import SamplingParams


def test_vllm_spellings_are_read_as_vllm_reads_them():
    assert SamplingParams(stop="###").stop == ("###",)        # one bare stop string, not its characters
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(top_k=-1).top_k == 0                # vLLM's "off"
    p = SamplingParams(max_tokens=np.int64(5), stop_token_ids=[np.int32(3)])
    assert (type(p.max_tokens), p.stop_token_ids) == (int, (3,))
    # numpy's numbers for the seed and logit_bias too: refused before, the in-range np.float64(1.0) as out of range
    p = SamplingParams(seed=np.int64(3), logit_bias={np.int64(5): np.float64(1.0), 6: np.float32(-2)})
    assert type(p.seed) is int and p.logit_bias == ((5, 1.0), (6, -2.0)) and type(p.logit_bias[0][0]) is int
    p = SamplingParams(logprobs=np.int64(2), prompt_logprobs=np.int32(1))      # (refused before)
    assert (type(p.logprobs), type(p.prompt_logprobs)) == (int, int)


@pytest.mark.parametrize("kw, field", [
    (dict(temperature="0.5"), "temperature"), (dict(temperature=None), "temperature"), (dict(top_p="1"), "top_p"),
    (dict(min_p=None), "min_p"), (dict(stop=None), "stop"), (dict(stop=""), "stop"), (dict(max_tokens=True), "max_tokens"),
    (dict(max_tokens=3.0), "max_tokens"), (dict(stop_token_ids=[1.7]), "stop_token_ids"), (dict(top_k=None), "top_k"),
    (dict(stop_token_ids=5), "stop_token_ids"), (dict(repetition_penalty=True), "repetition_penalty"),
    (dict(seed=True), "seed"), (dict(logit_bias={5: True}), "logit_bias"),          # a bool is no number here
    (dict(ignore_eos="false"), "ignore_eos"),       # truthy: it generated to max_tokens, past the EOS
])
def test_a_wrong_type_is_a_value_error_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw)


@pytest.mark.parametrize("top_p", [0, 0.0, -0.1, 1.5])
def test_top_p_is_in_vllm_s_range(top_p):
    """0 is not "off" here (vLLM refuses it too): it sampled the whole distribution, the opposite of the
    narrowest nucleus asked for. The gRPC wire's 0 ("unset") is mapped to 1 at the edge (router/validate.py)."""
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        SamplingParams(top_p=top_p)
    assert SamplingParams(top_p=1e-9).top_p == 1e-9
