"""Every option of every command has help text and shows its default (flags and unset options aside)."""
import argparse

import pytest

from pdcluster.deploy import cli


def parsers() -> dict:
    out = {}

    def walk(p, name):
        out[name] = p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub, sp in a.choices.items():
                    walk(sp, f"{name} {sub}")
    walk(cli.build_parser(), "pdcluster")
    return out


@pytest.mark.parametrize("name", ["pdcluster serve", "pdcluster generate", "pdcluster bench serve",
                                  "pdcluster bench scenario"])
def test_every_option_has_help_and_its_default(name, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")       # no wrapping inside a default
    p = parsers()[name]
    text = p.format_help()
    for a in p._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        assert a.help and a.help.strip(), (name, a.option_strings or a.dest)
        shown = a.option_strings and not (a.default is None or a.default is False)
        if shown:
            assert f"default: {a.default}" in text, (name, a.option_strings, a.default)
