"""Comparison figure of several benchmark results (run_benchmark's dicts), one PNG.

Layout (2 x 3): latency CDFs of TTFT, TPOT, ITL, E2EL (ms), one line per named result;
then output token throughput (tok/s) and request throughput / goodput (req/s) bars.
Uses a bare matplotlib Figure (Agg canvas), so no pyplot state or display is involved.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

_CDFS = (("ttfts", "TTFT"), ("tpots", "TPOT"), ("itls", "ITL"), ("e2els", "E2E latency"))


def ratio_bars(ax, ratios: dict[str, float], title: str) -> None:
    """One bar per engine measurement: the baseline's median time over the candidate's, 1.0 marked."""
    ax.bar(list(ratios), list(ratios.values()), color="tab:green")
    ax.axhline(1.0, color="grey", lw=1)
    ax.set(title=title, ylabel="ratio of median times")


def ratio_figure(rows: list[dict], ylabel: str, title: str, engine: dict | None, engine_title: str, path: str,
                 xlabel: str = "rows per call") -> None:
    """A per-call ratio against the rows (rows: dicts with "rows" and "ratio"), beside the engine's ratio bars
    (engine: a result with "ratio", or None), one PNG."""
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    ax, ax2 = fig.subplots(1, 2, width_ratios=(2, 1))
    ax.plot([r["rows"] for r in rows], [r["ratio"] for r in rows], marker="o")
    ax.axhline(1.0, color="grey", lw=1)
    ax.set(xscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if engine:
        ratio_bars(ax2, engine["ratio"], engine_title)
    fig.savefig(path, dpi=100)


def plot_comparison(results: dict[str, dict[str, Any]], path: str) -> None:
    fig = Figure(figsize=(15, 8), layout="constrained")
    axes = fig.subplots(2, 3)
    for ax, (key, title) in zip(axes.flat, _CDFS):
        for name, result in results.items():
            values = np.sort(np.asarray(result[key], dtype=float))  # ms
            if values.size:
                ax.plot(values, np.arange(1, values.size + 1) / values.size, label=name)
        ax.set(title=f"{title} CDF", xlabel="ms", ylabel="fraction of samples", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    names = list(results)
    x = np.arange(len(names))
    tok = axes.flat[4]
    tok.bar(x, [results[n]["output_throughput"] for n in names])
    tok.set(title="Output token throughput", ylabel="tok/s", xticks=x, xticklabels=names)
    req = axes.flat[5]
    width = 0.4
    req.bar(x - width / 2, [results[n]["request_throughput"] for n in names], width, label="throughput")
    req.bar(x + width / 2, [results[n]["request_goodput"] or 0.0 for n in names], width, label="goodput")
    req.set(title="Requests", ylabel="req/s", xticks=x, xticklabels=names)
    req.legend()
    fig.savefig(path, dpi=100)
