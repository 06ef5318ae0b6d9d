"""Bounds on a JSON schema's regular expressions, checked before xgrammar compiles them. Pure Python.

The regexes are `pattern` strings and `patternProperties` keys; one pass over each.

A short pattern can cost xgrammar seconds to minutes (it runs on the router's one tokenizing thread and
on a worker's engine thread). Measured with the embedded model's tokenizer (bench/RESULTS.md):
  - one counted repeat grows about quadratically: [a-z]{1,1000} 0.05 s, {1,5000} 1.8 s, {1,10000} 7.2 s;
  - nested variable repeats blow up: ([a-z]{1,5}){1,5} 0.2 s, ([a-z]{1,8}){1,8} 1.1 s,
    ([a-z]{1,10}){1,100} 40 s, ([a-z]{1,50}){1,50} 89 s (a 40-character pattern).
A delimiter in the repeated group makes it far cheaper: ([a-z]{1,8}\\.){1,8} 0.07 s, ([a-z]{1,10}-){1,100} 1.5 s.
So a counted bound is at most MAX_REPEAT, and over the whole schema the weights of the chains of nested
repeats (nested_cost) add up to at most MAX_NESTED. The usual patterns stay far inside both: a UUID's
([0-9a-f]{4}-){3} weighs 2, an IPv4 address's (\\d{1,3}\\.){3} 2.
"""
from __future__ import annotations

MAX_REPEAT = 1000       # largest m or n in {m}, {m,}, {m,n} (a longer string: maxLength)
MAX_NESTED = 32         # sum over a schema's chains of nested repeats of their weights (nested_cost)
MAX_REPEAT_SUM = 4000   # sum over a schema's counted repeats of their bounds (many patterns of {1,1000})


def schema_patterns(schema) -> list[str]:
    """Every regular expression in a parsed schema: `pattern` strings and `patternProperties` keys."""
    out, stack = [], [schema]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            if isinstance(v.get("pattern"), str):
                out.append(v["pattern"])
            if isinstance(v.get("patternProperties"), dict):
                out.extend(v["patternProperties"])
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return out


def check_schema_patterns(schema) -> None:
    """ValueError when a schema's patterns are past MAX_REPEAT or, together, past MAX_NESTED or
    MAX_REPEAT_SUM."""
    nested = bounds = 0
    for p in schema_patterns(schema):
        weight, counted = nested_cost(p)
        nested, bounds = nested + weight, bounds + counted
        if bounds > MAX_REPEAT_SUM:
            raise ValueError(f"response_format json_schema's patterns repeat more than {MAX_REPEAT_SUM} times in "
                             "all: the grammar would take seconds to compile")
        if nested > MAX_NESTED:
            raise ValueError(f"response_format json_schema's patterns nest repeats too deeply (nested repeat "
                             f"bounds multiply past {MAX_NESTED}): the grammar would take seconds to compile")


def nested_cost(pattern: str) -> tuple[int, int]:
    """(the sum over the pattern's chains of nested repeats of their weights, the sum of its counted
    repeats' bounds); ValueError for a counted bound past MAX_REPEAT. A chain is a repeat of a group that holds a repeat; its weight is the product
    of the bounds (`*` and `+` count 2, `?` 1), an eighth of it when the group also matches a literal
    character once (a delimiter, as `-` in ([0-9a-f]{4}-){3}: far fewer ways to split a string,
    measured about 15x cheaper) and has no alternation. Each group's frame: [the largest product inside
    it, the chains' weights, has it a delimiter, has it a "|"]."""
    frames = [[1, 0, False, False]]
    counted = 0
    last = None         # (product inside, delimited) of the element a quantifier would apply to (None: none)
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        bound = None
        if c == "\\":
            literal = pattern[i + 1:i + 2] not in ("d", "D", "w", "W", "s", "S", "b", "B", "")
            _atom(frames, literal and _unquantified(pattern, i + 2))
            last, i = (1, False), i + 2
            continue
        if c == "[":
            i = _class_end(pattern, i)
            last = (1, False)
            continue
        if c == "(":
            frames.append([1, 0, False, False])
            last = None
            if pattern.startswith("?", i + 1):     # (?:  (?=  (?!  (?<=  (?<!  (?P<name>  (?<name>  (?i)  (?i:
                i = _group_body(pattern, i + 2)    # its prefix is neither an atom (a delimiter) nor a quantifier
                continue
        elif c == ")":
            if len(frames) > 1:
                inner, chains, delimited, alt = frames.pop()
                frames[-1][1] += chains
                last = (inner, delimited and not alt)
            else:
                last = (1, False)       # an unbalanced ")" is xgrammar's to refuse
        elif c == "|":
            frames[-1][3] = True
            last = None
        elif c in "*+":
            bound = 2
        elif c == "?":
            bound = 1
        elif c == "{" and (q := _counted(pattern, i)) is not None:
            bound, i = q[0], q[1] - 1
            counted += bound
        else:                           # a literal, "." or an anchor
            _atom(frames, c not in ".^$" and _unquantified(pattern, i + 1))
            last = (1, False)
        if bound is not None and last is not None:
            inner, delimited = last
            product = bound * inner
            if inner > 1:               # a repeat of something that repeats: a chain
                frames[-1][1] += -(-product // 8) if delimited else product
            frames[-1][0] = max(frames[-1][0], product)
            last = None                 # a second quantifier (lazy "?", possessive "+") modifies this one
        i += 1
    return sum(f[1] for f in frames), counted


def _group_body(p: str, j: int) -> int:
    """The index where a group's body starts, p[j:] following its "(?"."""
    if p.startswith(("<=", "<!"), j):
        return j + 2
    if p.startswith(("P<", "<"), j):
        end = p.find(">", j)
        return len(p) if end < 0 else end + 1
    if j < len(p) and p[j] in ":=!":
        return j + 1
    while j < len(p) and p[j] not in ":)":       # inline flags, (?P=name): up to its ":" or ")"
        j += 1
    return j + 1 if j < len(p) and p[j] == ":" else j


def _atom(frames: list, delimiter: bool) -> None:
    if delimiter:
        frames[-1][2] = True


def _unquantified(p: str, j: int) -> bool:
    """Is the element ending just before p[j] matched exactly once (no quantifier follows)?"""
    return j >= len(p) or p[j] not in "*+?" and not (p[j] == "{" and _counted(p, j) is not None)


def _class_end(p: str, i: int) -> int:
    """The index just past the character class opening at p[i] ("[")."""
    j = i + 1
    if j < len(p) and p[j] == "^":
        j += 1
    if j < len(p) and p[j] == "]":
        j += 1
    while j < len(p) and p[j] != "]":
        j += 2 if p[j] == "\\" else 1
    return j + 1


def _digits(s: str) -> bool:
    return s.isascii() and s.isdigit()


def _counted(p: str, i: int) -> tuple[int, int] | None:
    """(the bound, the index past "}") of a counted repeat {m}, {m,} or {m,n} at p[i]; None if p[i] starts
    no such repeat (a literal "{"). The bound is n, or m for {m} (and at least 2 for {m,})."""
    j = p.find("}", i)
    if j < 0:
        return None
    body = p[i + 1:j].split(",")
    if len(body) > 2 or not _digits(body[0]) or (len(body) == 2 and body[1] and not _digits(body[1])):
        return None
    nums = [MAX_REPEAT + 1 if len(x) > 7 else int(x) for x in body if x]
    if max(nums) > MAX_REPEAT:
        raise ValueError(f"response_format json_schema's pattern repeats {p[i:j + 1][:20]} times: at most "
                         f"{MAX_REPEAT} (a longer string: maxLength)")
    bound = nums[-1] if len(body) == 2 and body[1] else max(nums[0], 2 if len(body) == 2 else 1)
    return bound, j + 1
