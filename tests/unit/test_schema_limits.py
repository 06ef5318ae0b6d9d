"""engine/schema_limits.py: a JSON schema's regexes are bounded before xgrammar compiles them. A
40-character pattern, ([a-z]{1,50}){1,50}, compiled for 89 s on the router's one tokenizing thread
(every client's tokenization waited); the bounds refuse it and its kin, and keep the usual patterns."""
import json

import pytest

from pdcluster.engine.schema_limits import nested_cost, schema_patterns
from pdcluster.engine.structured import StructuredOutput

USUAL = [r"^\d{4}-\d{2}-\d{2}$", r"^(\d{1,3}\.){3}\d{1,3}$", "^[0-9a-f]{8}-([0-9a-f]{4}-){3}[0-9a-f]{12}$",
         r"^[^@\s]+@[^@\s]+\.[a-z]{2,6}$", r"^\+?\d{1,3}[- ]?\(?\d{3}\)?[- ]?\d{3}[- ]?\d{4}$", "^[A-Z][a-z]*$",
         "^(foo|bar)+$", "^x{$", r"\{1,5\}", "[{]{2}", "^.{0,1000}$"]


def schema(*patterns):
    return json.dumps({"type": "object", "properties": {f"p{i}": {"type": "string", "pattern": p}
                                                        for i, p in enumerate(patterns)}})


@pytest.mark.parametrize("pattern, weight", [
    ("^[a-z]{1,1000}$", 0),                          # no nesting
    (r"^(\d{1,3}\.){3}\d{1,3}$", 2),                 # delimited by "\.": an eighth of 9, rounded up
    ("^([a-z]{1,5}){1,5}$", 25),                     # undelimited: the product
    ("^(([a-z]{1,3}){1,3}){1,3}$", 9 + 27),          # each chain
    ("^([a-z]{1,32})*$", 64),                        # "*" counts 2
    ("^(a|[a-z]{1,5}){1,5}$", 25),                   # an alternation is no delimiter
    ("^(a?[a-z]{1,5}){1,5}$", 25),                   # nor a literal that may be absent
    ("^(?:[a-z]{1,16}){1,16}$", 256),                # a group's "?:" is no delimiter (8.3 s to compile)
    ("^(?P<w>[a-z]{1,5}){1,5}$", 25),
    ("^(?=[a-z]{1,5}){1,5}$", 25),
    ("^(?i:[a-z]{1,5}){1,5}$", 25),
    (r"^(?:\d{1,3}\.){3}\d{1,3}$", 2),              # a real delimiter still counts
])
def test_nested_weights(pattern, weight):
    assert nested_cost(pattern)[0] == weight


def test_the_usual_patterns_pass_together():
    StructuredOutput("json_schema", schema(*USUAL)).validate()
    StructuredOutput("json_schema", schema(*USUAL * 3)).validate()


@pytest.mark.parametrize("patterns, says", [
    (["^([a-z]{1,50}){1,50}$"], "nest repeats too deeply"),                  # 89 s to compile
    (["^([a-z]{1,10}){1,100}$"], "nest repeats too deeply"),                 # 40 s
    (["^([a-z]{1,5}){1,5}$", "^([a-z]{1,5}){1,5}$"], "nest repeats too deeply"),   # each alone passes
    (["^[a-z]{1,5000}$"], "at most 1000"),                                   # 1.8 s
    (["^[a-z]{99999999999}$"], "at most 1000"),
    (["^[a-z]{1,1000}$"] * 5, "more than 4000 times"),
])
def test_costly_patterns_are_refused(patterns, says):
    with pytest.raises(ValueError, match=says):
        StructuredOutput("json_schema", schema(*patterns)).validate()


def test_patterns_are_found_wherever_they_are():
    s = {"properties": {"pattern": {"type": "string", "pattern": "^a$"}},       # a property named "pattern"
         "patternProperties": {"^k{1,2}$": {"type": "integer"}},
         "items": [{"propertyNames": {"pattern": "^b+$"}}]}
    assert sorted(schema_patterns(s)) == ["^a$", "^b+$", "^k{1,2}$"]
