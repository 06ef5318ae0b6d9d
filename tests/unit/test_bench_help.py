"""Every `python -m pdcluster.bench.<module>` script and `python -m pdcluster.deploy.local_start` keeps
the README's promise: `--help` documents each option and shows its default (the project's HelpFormatter).

Each module runs under `__main__` with `--help`, but parse_args / parse_known_args are patched to
record the parser and stop before anything parses or runs: no benchmark, model load or network."""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import runpy
import sys
from pathlib import Path

import pytest

from pdcluster.deploy.cli import HelpFormatter

BENCH = Path(__file__).resolve().parents[2] / "bench"
MODULES = sorted(f"pdcluster.bench.{f.stem}" for f in BENCH.glob("*.py")
                 if "ArgumentParser(" in f.read_text()) + ["pdcluster.deploy.local_start"]


class _Captured(Exception):
    """Raised instead of parsing: the parser is built, nothing has run."""


def _capture(mod: str, monkeypatch) -> argparse.ArgumentParser:
    got: list[argparse.ArgumentParser] = []

    def grab(self, *a, **k):
        got.append(self)
        raise _Captured

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", grab)
    monkeypatch.setattr(sys, "argv", [mod, "--help"])
    env = dict(os.environ)      # some set HF_HUB_OFFLINE at import: keep this process's environment as it was
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(_Captured, SystemExit):
            runpy.run_module(mod, run_name="__main__", alter_sys=False)
    finally:
        os.environ.clear()
        os.environ.update(env)
    assert got, f"{mod}: no parser reached parse_args"
    return got[0]


def _walk(p: argparse.ArgumentParser, name: str):
    yield name, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub, sp in a.choices.items():
                yield from _walk(sp, f"{name} {sub}")


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")    # runpy on an imported module
@pytest.mark.parametrize("mod", MODULES)
def test_help_shows_each_option_and_default(mod, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")
    bad = []
    for name, p in _walk(_capture(mod, monkeypatch), mod):
        if not (isinstance(p.formatter_class, type) and issubclass(p.formatter_class, HelpFormatter)):
            bad.append(f"{name}: formatter_class {p.formatter_class!r} is not pdcluster.deploy.cli.HelpFormatter")
            continue
        text = p.format_help()
        fmt = p._get_formatter()
        for a in p._actions:
            if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            opt = "/".join(a.option_strings) or a.dest
            if not (a.help and a.help.strip()):
                bad.append(f"{name} {opt}: no help text")
                continue
            if not a.option_strings or a.default is False or a.default is argparse.SUPPRESS or a.required:
                continue
            n = fmt._get_help_string(a).replace("%(default)s", "").lower().count("default")
            if a.default is None:
                if n != 1:
                    bad.append(f"{name} {opt}: unset by default, help mentions 'default' {n} times (want 1)")
                continue
            if f"default: {a.default}" not in text:
                bad.append(f"{name} {opt}: 'default: {a.default}' not in --help")
            if n != 1:
                bad.append(f"{name} {opt}: help mentions 'default' {n} times (want 1): {a.help!r}")
    assert not bad, "\n".join(bad)
