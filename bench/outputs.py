"""The --out / --plot / --replot arguments the per-op bench scripts share, and what they do with a result."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

Plot = Callable[[dict, str], None]      # plot(result, png path)


def add_args(ap: argparse.ArgumentParser, out: str | None = None, plot_help: str = "PNG of the ratios") -> None:
    ap.add_argument("--out", default=out, help="JSON results")
    ap.add_argument("--plot", default=None, help=plot_help)
    ap.add_argument("--replot", default=None, metavar="JSON", help="only draw --plot from an earlier --out")


def replotted(a: argparse.Namespace, plot: Plot, default_png: str) -> bool:
    """With --replot: draw --plot (default_png without it) from that earlier result and say True (main is done)."""
    if not a.replot:
        return False
    plot(json.loads(Path(a.replot).read_text()), a.plot or default_png)
    return True


def save(a: argparse.Namespace, result: dict, plot: Plot, draw: bool = True) -> None:
    """result to --out as JSON, and --plot drawn from it (draw=False: nothing to draw)."""
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    if a.plot and draw:
        plot(result, a.plot)


class Listed(list):
    """A list default that --help shows the way it is typed (`1 8 32`; `none` when empty), not as a Python list."""

    def __str__(self) -> str:
        return " ".join(map(str, self)) or "none"
