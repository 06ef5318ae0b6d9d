"""Incremental detokenization with stop strings.

Text is released only in whole UTF-8 characters: a byte-level BPE token can end inside a
character, which decodes to U+FFFD until the rest arrives. While stop strings are set, the last
(max stop length - 1) characters are held back so a stop string is never partly emitted. With min_tokens, a
stop string counts only where it ends past the text of the first min_tokens tokens (to a whole character).
"""
from __future__ import annotations


def _rust_decoder(tokenizer):
    """A plain fast tokenizer's Rust half, which decodes as tokenizer.decode(ids, skip_special_tokens=True,
    clean_up_tokenization_spaces=False) does in a tenth of its time (~4 us, twice per token here);
    None for a tokenizer whose class decodes its own way."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    for name in ("decode", "_decode"):
        owner = next((c for c in type(tokenizer).__mro__ if name in vars(c)), None)
        if owner is None or not owner.__module__.startswith("transformers.tokenization_utils"):
            return None
    return backend


class Detokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: tuple[str, ...] = (), min_tokens: int = 0):
        self.tok = tokenizer
        self.min_tokens = min_tokens
        self.num_out = 0        # output tokens pushed so far
        self.floor = 0          # characters of text from the first min_tokens tokens: no stop string ends there
        self._floor_due = 0     # the floor a first-min_tokens token that ended inside a character owes (0: none)
        self._backend = _rust_decoder(tokenizer)
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        # Decode windows, not the whole output: ids[prefix:read] were already turned into text; a new
        # step decodes ids[prefix:] and keeps what extends the previous window's text. A few prompt
        # tokens of left context make leading spaces come out as in a full decode; none that end inside a
        # character (the output's bytes completing it vanished: window and context decoded as long)
        self.ids: list[int] = list(prompt_ids[-4:])     # (trimmed at the first push: _trim_context)
        self.prefix = 0
        self.read = len(self.ids)
        self.text = ""          # all complete text so far (stop string excluded once matched)
        self.emitted = 0        # characters of self.text already returned
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=True)
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_ids: list[int]) -> str:
        """Add tokens; return newly releasable text. Sets self.stopped when a stop string matched."""
        if self.stopped:
            return ""
        if self.num_out == 0:
            self._trim_context()
        self.num_out += len(token_ids)
        self.ids += token_ids
        prefix = self._decode(self.ids[self.prefix:self.read])
        window, end = self._decode(self.ids[self.prefix:]), len(self.ids)
        if window.endswith("\ufffd"):  # an incomplete character: wait for more bytes
            if end - self.read < 4:
                if self.num_out <= self.min_tokens:     # its text (to the whole character) is under the floor
                    self._floor_due = len(self.text) + len(window.rstrip("\ufffd")) - len(prefix) + 1
                elif self.stop:     # a stop string the whole characters before it complete ends it now (else
                    whole = self.text + window.rstrip("\ufffd")[len(prefix):]     # the tokens after it went out)
                    j = self._find_stop(whole, max(0, len(self.text) - self.hold - 1), max(self.floor, self._floor_due))
                    if j is not None:
                        self.text, self.stopped = whole[:j], True
                        return self._release(final=True)
                return ""
            # 4 tokens on and still no whole character: the bytes before the last 3 tokens (an incomplete
            # character has at most 3 of its bytes) are what they are, invalid ones U+FFFD as in a full decode.
            # Release up to the latest cut that ends whole. (Waiting on, a token that is no UTF-8 at all,
            # repeated, re-decoded the whole run at every token: quadratic, on the router's event loop.)
            for end in range(end - 1, end - 4, -1):
                window = self._decode(self.ids[self.prefix:end])
                if not window.endswith("\ufffd"):
                    break
        return self._extend(window[len(prefix):], end)

    def _trim_context(self) -> None:
        """Drop context tokens that end inside a character (decoded alone they end in U+FFFD: a window
        would decode as long as its context once the output completed it, and the character vanished)."""
        while self.ids and self._decode(self.ids).endswith("\ufffd"):
            del self.ids[-1]
        self.read = len(self.ids)

    def _extend(self, text: str, end: int) -> str:
        """text (what ids[read:end] add) joins self.text; the stop strings are looked for; what may go out now."""
        start = max(0, len(self.text) - self.hold - 1)
        self.text += text
        self.prefix, self.read = self.read, end
        if self.num_out <= self.min_tokens:
            self.floor = len(self.text)
        elif self._floor_due:               # the character the last of them began, completed now
            self.floor = max(self.floor, min(self._floor_due, len(self.text)))
        self._floor_due = 0
        j = self._find_stop(self.text, start, self.floor)
        if j is not None:
            self.text, self.stopped = self.text[:j], True
        return self._release(final=self.stopped)

    def _find_stop(self, text: str, start: int, floor: int) -> int | None:
        """Where the earliest stop string in text (from `start`, ending past `floor`: the min_tokens floor)
        begins: the earliest, whatever the list's order (a stop matched later in the list but starting
        earlier was partly emitted)."""
        hits = [j for s in self.stop if (j := text.find(s, max(start, floor - len(s) + 1))) != -1]
        return min(hits) if hits else None

    def flush(self) -> str:
        """Everything not yet released (at finish), the bytes of a character that never completed included
        (U+FFFD, as a full decode has them)."""
        out = ""
        if not self.stopped and len(self.ids) > self.read:
            prefix = self._decode(self.ids[self.prefix:self.read])
            out = self._extend(self._decode(self.ids[self.prefix:])[len(prefix):], len(self.ids))
        return out + self._release(final=True)

    def _release(self, final: bool) -> str:
        end = len(self.text) if final or not self.stop else max(self.emitted, len(self.text) - self.hold)
        out = self.text[self.emitted:end]
        self.emitted = end
        return out
