"""Incremental detokenization on the embedded tokenizer: whole characters only, equal to a full
decode, stop strings cut and never partly emitted."""
import pytest

from pdcluster.engine.detokenizer import Detokenizer
from pdcluster.engine.loader import load_model_config
from pdcluster.engine.tokenizer import load_tokenizer

TEXTS = ["Hello, world! Ünïcödé façade — naïve café.", "日本語のテキストと絵文字 🎉🚀👍 mixed in.",
         "  leading spaces\n\tand tabs, then 123,456.78"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(load_model_config(None))


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_equals_full_decode(tok, text):
    prompt = tok.encode("Prompt:", add_special_tokens=False)
    ids = tok.encode(text, add_special_tokens=False)
    d = Detokenizer(tok, prompt)
    pieces = [d.push([t]) for t in ids] + [d.flush()]
    assert all("\ufffd" not in p for p in pieces)
    full = tok.decode(prompt + ids, skip_special_tokens=True)[len(tok.decode(prompt, skip_special_tokens=True)):]
    assert "".join(pieces) == full


def test_stop_string_is_cut_and_never_partly_emitted(tok):
    ids = tok.encode(" alpha beta STOP gamma", add_special_tokens=False)
    d = Detokenizer(tok, [], stop=("STOP",))
    out = []
    for t in ids:
        out.append(d.push([t]))
        assert "ST" not in "".join(out)
        if d.stopped:
            break
    out.append(d.flush())
    assert d.stopped and "".join(out) == " alpha beta "
