"""Reading a tool answer's envelope (router/openai/tools.py) while its text grows, for streamed answers: each
call's name once it is whole, its arguments' JSON text as it comes, a content reply's characters as they decode.

The grammar that made the text is compact (json.dumps' separators, keys in schema order), so the envelope's
fixed parts are known strings and only names, arguments and the reply need scanning. A whole answer is read by
the same reader, so a streamed answer and a whole one give the same calls and argument text. Pure Python.
"""
from __future__ import annotations

import json
import uuid

CALLS = '{"tool_calls": ['
CONTENT = '{"content": "'
CALL = '{"name": "'
ARGS = '", "arguments": '


class AnswerReader:
    """feed(text) -> the delta it makes certain: {"content": str} and/or {"tool_calls": [...]} (OpenAI's stream
    shapes, each call with its index; a call's first delta has its id, type and name). state "done": the envelope
    closed; "raw": the text is not an envelope (nothing was or will be read from it)."""

    def __init__(self):
        self.buf = ""                   # every character fed
        self.pos = 0                    # buf[:pos] is read
        self.state = "start"
        self.content: str | None = None
        self.calls: list[dict] = []     # OpenAI's tool_calls, arguments as the model wrote them
        self._depth = 0                 # the arguments object's nesting, and whether the scan is inside a string
        self._in_str = self._esc = False

    def feed(self, text: str) -> dict:
        self.buf += text
        content, calls = [], {}
        try:
            while self._step(content, calls):
                pass
        except ValueError:              # not JSON after all (the grammar's text always is): read no further
            self.state = "raw"
        delta = {}
        if content:
            delta["content"] = "".join(content)
        if calls:
            delta["tool_calls"] = list(calls.values())
        return delta

    def _expect(self, fixed: str, then: str) -> bool:
        rest = self.buf[self.pos:]
        if rest.startswith(fixed):
            self.pos += len(fixed)
            self.state = then
            return True
        if not fixed.startswith(rest):
            self.state = "raw"
        return False

    def _step(self, content: list, calls: dict) -> bool:
        """One move of the reader; False when it needs more text (or has nothing more to read)."""
        s = self.state
        if s == "start":
            if self.buf.startswith(CALLS):
                self.pos, self.state = len(CALLS), "call"
                return True
            if self.buf.startswith(CONTENT):
                self.pos, self.state, self.content = len(CONTENT), "content", ""
                return True
            if not (CALLS.startswith(self.buf) or CONTENT.startswith(self.buf)):
                self.state = "raw"
            return False
        if s == "call":
            return self._expect(CALL, "name")
        if s == "name":
            end, closed = _string_end(self.buf, self.pos)
            if not closed:
                return False
            name = json.loads('"' + self.buf[self.pos:end] + '"')
            k = len(self.calls)
            call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name,
                                                                                          "arguments": ""}}
            self.calls.append(call)
            calls[k] = {"index": k} | call | {"function": dict(call["function"])}    # its own arguments to grow
            self.pos, self.state = end, "args_head"
            self._depth, self._in_str, self._esc = 0, False, False
            return True
        if s == "args_head":
            return self._expect(ARGS, "args")
        if s == "args":
            return self._args(calls)
        if s == "after_call":
            rest = self.buf[self.pos:]
            if rest.startswith("}, "):
                self.pos += 3
                self.state = "call"
                return True
            if rest.startswith("}]}"):
                self.pos += 3
                self.state = "done"
                return False
            if not ("}, ".startswith(rest) or "}]}".startswith(rest)):
                self.state = "raw"
            return False
        if s == "content":
            end, closed = _string_end(self.buf, self.pos)
            piece = json.loads('"' + self.buf[self.pos:end] + '"')
            self.content += piece
            if piece:
                content.append(piece)
            self.pos = end + closed
            if closed:
                self.state = "content_end"
            return closed
        if s == "content_end":
            return self._expect("}", "done")
        return False

    def _args(self, calls: dict) -> bool:
        """Scan the arguments object's raw text; whole once its braces balance (strings skipped)."""
        i, buf = self.pos, self.buf
        while i < len(buf):
            c = buf[i]
            i += 1
            if self._in_str:
                if self._esc:
                    self._esc = False
                elif c == "\\":
                    self._esc = True
                elif c == '"':
                    self._in_str = False
            elif c == '"':
                self._in_str = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth == 0:
                    break
        piece = buf[self.pos:i]
        self.pos = i
        if piece:
            k = len(self.calls) - 1
            self.calls[k]["function"]["arguments"] += piece
            calls.setdefault(k, {"index": k, "function": {"arguments": ""}})["function"]["arguments"] += piece
        if self._depth == 0 and piece:
            self.state = "after_call"
            return True
        return False


def _string_end(buf: str, start: int) -> tuple[int, bool]:
    """Where a JSON string's body that starts at `start` can be cut now: (index, closed). closed: buf[index] is its
    closing quote; else index is the end of what decodes whole (never inside an escape or a surrogate pair)."""
    i = start
    while i < len(buf):
        c = buf[i]
        if c == '"':
            return i, True
        if c != "\\":
            i += 1
            continue
        if i + 1 >= len(buf):
            break
        if buf[i + 1] != "u":
            i += 2
            continue
        if i + 6 > len(buf):
            break
        if 0xD800 <= int(buf[i + 2:i + 6], 16) <= 0xDBFF:     # a high surrogate: its low half decodes with it
            nxt = buf[i + 6:i + 8]
            if not nxt or (nxt[0] == "\\" and (len(nxt) < 2 or (nxt == "\\u" and i + 12 > len(buf)))):
                break                                           # not yet known whether a low half follows
            low = nxt == "\\u" and 0xDC00 <= int(buf[i + 8:i + 12], 16) <= 0xDFFF
            i += 12 if low else 6                               # a lone one decodes alone (a lone surrogate)
        else:
            i += 6
    return i, False
