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


@pytest.mark.parametrize("step", [1, 3, 5])
def test_pushes_of_several_tokens_end_mid_character_and_still_equal_the_full_decode(tok, step):
    """Speculative steps push several tokens; a push may end inside a character (byte tokens)."""
    prompt = tok.encode("Prompt:", add_special_tokens=False)
    ids = tok.encode(TEXTS[1] * 3, add_special_tokens=False)
    d = Detokenizer(tok, prompt)
    pieces = [d.push(ids[i:i + step]) for i in range(0, len(ids), step)] + [d.flush()]
    full = tok.decode(prompt + ids, skip_special_tokens=True)[len(tok.decode(prompt, skip_special_tokens=True)):]
    assert "".join(pieces) == full and all("\ufffd" not in p for p in pieces)


def test_a_token_that_is_never_utf_8_is_released_not_re_decoded_forever(tok):
    """Token 111 is the byte 0xA1 alone: never a whole character. A client can ask for thousands (logit_bias);
    the pending run stays a few tokens long (it grew without bound: every push re-decoded it all) and the text is
    the full decode's."""
    bad = tok.convert_tokens_to_ids(tok.convert_ids_to_tokens([111]))[0]
    assert tok.decode([bad]) == "\ufffd"
    d = Detokenizer(tok, [])
    pieces, longest = [], 0
    for _ in range(500):
        pieces.append(d.push([bad]))
        longest = max(longest, len(d.ids) - d.prefix)
    pieces.append(d.flush())
    assert longest <= 9 and "".join(pieces) == tok.decode([bad] * 500)


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


def test_stop_strings_are_matched_only_after_min_tokens(tok):
    ids = tok.encode(" STOP alpha STOP beta", add_special_tokens=False)
    first = next(j for j in range(1, len(ids) + 1) if "STOP" in tok.decode(ids[:j]))
    d = Detokenizer(tok, [], stop=("STOP",), min_tokens=first)       # the first STOP's tokens are inside
    out = "".join(d.push([t]) for t in ids if not d.stopped) + d.flush()
    assert d.stopped and out == " STOP alpha "
    for min_tokens in (0, first - 1):                                  # the first STOP ends past the floor
        d = Detokenizer(tok, [], stop=("STOP",), min_tokens=min_tokens)
        assert "".join(d.push([t]) for t in ids if not d.stopped) + d.flush() == " "


def test_a_plain_fast_tokenizer_decodes_through_its_rust_half_and_a_custom_one_does_not(tok):
    """The Rust decode stands in for tokenizer.decode(skip_special_tokens=True, no clean-up) only
    where the tokenizer's class adds nothing to it: same text, special tokens dropped."""
    from pdcluster.engine.detokenizer import _rust_decoder
    assert _rust_decoder(tok) is tok.backend_tokenizer
    for text in TEXTS:
        ids = [1] + tok.encode(text, add_special_tokens=False) + [2]        # <|im_start|> ... <|im_end|>
        assert Detokenizer(tok, [])._decode(ids) == tok.decode(ids, skip_special_tokens=True,
                                                                clean_up_tokenization_spaces=False)

    class Custom(type(tok)):
        def _decode(self, *args, **kwargs):
            return "custom"
    custom = Custom.__new__(Custom)
    custom.__dict__.update(tok.__dict__)
    assert _rust_decoder(custom) is None and Detokenizer(custom, [])._decode([5, 6]) == "custom"


def test_the_router_sends_no_token_past_the_one_that_completes_a_stop_string(tok):
    """router/lifecycle/run.py: a decode worker's item may carry several tokens (its queue merges
    them); the router keeps those up to the stop, as the engine does, so token_ids and the usage do
    not depend on how the tokens were batched."""
    from types import SimpleNamespace

    from pdcluster.engine.sampling_params import SamplingParams
    from pdcluster.router.lifecycle.log import Trace
    from pdcluster.router.lifecycle.run import RequestRun
    ids = tok.encode(" alpha beta STOP gamma delta", add_special_tokens=False)
    stop_at = next(i for i in range(len(ids)) if "STOP" in tok.decode(ids[:i + 1]))
    for split in (1, len(ids)):                         # token by token, or all in one item
        run = RequestRun(SimpleNamespace(tokenizer=tok, eos=(2,)), "r", [1, 2],
                         SamplingParams(max_tokens=20, stop=("STOP",)),
                         None, Trace(0.0))
        sent, text = [], ""
        for k in range(0, len(ids), split):
            toks, t = run._push_until_stop(ids[k:k + split])
            sent += toks
            text += t
            if run.detok.stopped:
                break
        assert sent == ids[:stop_at + 1] and run.out == sent and text + run.detok.flush() == " alpha beta "


def test_min_tokens_floor_covers_a_character_its_last_token_began(tok):
    """The first min_tokens tokens end inside a character ('日' is three byte tokens, the first with a
    space): the stop string ' ' their text holds must not match. Before, the floor was left behind while
    the character was incomplete and the stop matched inside the first min_tokens tokens."""
    text = " — 日本 wörld"
    ids = tok.encode(text, add_special_tokens=False)
    pieces = [tok.decode(ids[:k], skip_special_tokens=True) for k in range(1, len(ids) + 1)]
    k = next(k for k, p in enumerate(pieces, 1) if p.endswith("\ufffd"))     # ' —', ' ' + '日''s first byte
    d = Detokenizer(tok, tok.encode("Say:", add_special_tokens=False), stop=(" ",), min_tokens=k)
    out = "".join(d.push([t]) for t in ids) + d.flush()
    assert k == 2 and d.stopped and out == " — 日本"                     # cut at the first ' ' past ' — 日'


@pytest.mark.parametrize("stop", [(">", "</answer>"), ("</answer>", ">")])
def test_overlapping_stops_cut_at_the_earliest_whatever_their_order(tok, stop):
    """One token completing two stops: the cut followed the list's order, so with (">", "</answer>") most of
    "</answer>" went out ("...42</answer"), and the answer depended on how the client listed them."""
    d = Detokenizer(tok, tok.encode("Q:", add_special_tokens=False), stop)
    ids = tok.encode("The answer is 42</answer> and more", add_special_tokens=False)
    got = "".join(d.push([t]) for t in ids if not d.stopped) + d.flush()
    assert got == "The answer is 42" and d.stopped


def test_a_stop_completed_by_a_token_ending_mid_character_stops_at_that_token(tok):
    """' \\xc3' completes ". " and begins "ñ": the stop waited for the character, so the tokens after it
    were sent and counted, and at max_tokens the text was cut but the reason said "length"."""
    ids = tok.encode("Hello. ñ world", add_special_tokens=False)
    d = Detokenizer(tok, tok.encode("Say:", add_special_tokens=False), (". ",))
    out, pushed = "", 0
    for t in ids:
        out += d.push([t])
        pushed += 1
        if d.stopped:
            break
    assert (out, d.stopped) == ("Hello", True)
    assert tok.decode(ids[:pushed]).endswith(". \ufffd")      # the token that completed it ends mid-character


def test_a_prompt_ending_mid_character_loses_none_of_the_outputs_bytes(tok):
    """The context (the prompt's last tokens) ended inside 🚀; the output's bytes completing it vanished:
    ' launch' came out. Now the output reads as its own decode (the stray bytes as U+FFFD)."""
    ids = tok.encode("Rocket 🚀 launch", add_special_tokens=False)
    cut = next(i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith("\ufffd"))
    d = Detokenizer(tok, ids[:cut])
    got = "".join(d.push([t]) for t in ids[cut:]) + d.flush()
    assert got == tok.decode(ids[cut:], skip_special_tokens=True) and got.endswith(" launch") and "\ufffd" in got


def test_the_engine_reports_stop_for_a_stop_the_last_tokens_bytes_complete():
    """Real LLMEngine, its forward pass forced to emit 'Hello. ñ world' token by token, max_tokens 3: the
    third token completes ". " mid-character; finish_reason was "length" for a text cut at the stop."""
    from pdcluster.engine.llm_engine import LLMEngine, build_config
    from pdcluster.engine.sampling_params import SamplingParams
    e = LLMEngine(build_config(None, speculative="off", num_threads=1, kv_cache_memory=16 << 20))
    forced = e.tokenizer.encode("Hello. ñ world", add_special_tokens=False)
    e.runner.run = lambda batch, hook=None, wait=None, drop=None: (
        [forced[r.num_output_tokens] if batch.samples(i) else None for i, r in enumerate(batch.reqs)],
        [None] * len(batch))
    for max_tokens in (3, 10):
        r = e.add_request(e.tokenizer.encode("Say:", add_special_tokens=False),
                          SamplingParams(max_tokens=max_tokens, temperature=0, stop=(". ",)))
        text, reason = "", None
        while not r.is_finished:
            for o in e.step():
                text, reason = text + o.new_text, o.finish_reason or reason
        assert (text, reason, r.num_output_tokens) == ("Hello", "stop", 3)
