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


@pytest.mark.parametrize("kw, field", [
    (dict(temperature="0.5"), "temperature"), (dict(temperature=None), "temperature"), (dict(top_p="1"), "top_p"),
    (dict(min_p=None), "min_p"), (dict(stop=None), "stop"), (dict(stop=""), "stop"), (dict(max_tokens=True), "max_tokens"),
    (dict(max_tokens=3.0), "max_tokens"), (dict(stop_token_ids=[1.7]), "stop_token_ids"), (dict(top_k=None), "top_k"),
    (dict(stop_token_ids=5), "stop_token_ids"), (dict(repetition_penalty=True), "repetition_penalty"),
])
def test_a_wrong_type_is_a_value_error_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw)
