"""Tables on the terminal and PNG charts under bench/results/.

matplotlib is imported only when a chart is drawn: it is not one of Waybill's
dependencies, so without it a benchmark still prints and writes its JSON and
says that it skipped the picture.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import RESULTS


def fmt(value: Any, digits: int = 1) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 1) -> str:
    cells = [[fmt(c, digits) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    # Label columns (text only) line up on the left, figures on the right.
    text_cols = {
        i for i in range(len(headers)) if all(isinstance(row[i], str) for row in rows if row[i] != "")
    }

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.ljust(widths[i]) if i in text_cols else v.rjust(widths[i]) for i, v in enumerate(values)
        ).rstrip()

    out = [title, line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    text = "\n".join(out)
    print("\n" + text, flush=True)
    return text


@dataclass(frozen=True)
class Target:
    """One target of the issue: a measured ratio and the band it must stay in."""

    label: str
    value: float
    low: float | None = None  # the ratio must be at least this
    high: float | None = None  # and at most this

    @property
    def holds(self) -> bool:
        if math.isnan(self.value):
            return False
        return (self.low is None or self.value >= self.low) and (self.high is None or self.value <= self.high)

    @property
    def wanted(self) -> str:
        if self.low is not None and self.high is not None:
            return f"{self.low:g}..{self.high:g}"
        if self.low is not None:
            return f">= {self.low:g}"
        return f"<= {self.high:g}"


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    return plt


def bar_chart(
    name: str,
    title: str,
    groups: Sequence[str],
    series: Mapping[str, Sequence[float]],
    ylabel: str,
) -> Path | None:
    """Grouped bars: one group per label in ``groups``, one bar per series; returns the PNG path."""
    plt = _pyplot()
    if plt is None:
        print(f"(matplotlib is not installed: {name}.png skipped; pip install matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(groups) * max(1, len(series)) ** 0.5), 4.2))
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, [0.0 if math.isnan(v) else v for v in values], width, label=label)
        ax.bar_label(bars, labels=[fmt(v) for v in values], fontsize=7, padding=2)
    ax.set_xticks(range(len(groups)), list(groups), fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_chart(
    name: str,
    targets: Sequence[Target],
    panels: Sequence[tuple[str, str, Sequence[str], Mapping[str, Sequence[float]]]],
) -> Path | None:
    """The suite's picture: each target's ratio against its band, then one panel per figure.

    ``panels``: (title, y label, groups, series) as for :func:`bar_chart`.
    """
    plt = _pyplot()
    if plt is None:
        print(f"(matplotlib is not installed: {name}.png skipped; pip install matplotlib)")
        return None
    n = 1 + len(panels)
    cols = 2
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(13, 3.8 * rows), squeeze=False)
    flat = list(axes.flat)
    ax = flat[0]
    values = [0.0 if math.isnan(t.value) else t.value for t in targets]
    colours = ["tab:green" if t.holds else "tab:red" for t in targets]
    bars = ax.barh(range(len(targets)), values, color=colours)
    ax.bar_label(bars, labels=[fmt(t.value, 2) for t in targets], fontsize=7, padding=2)
    for i, t in enumerate(targets):
        for limit in (t.low, t.high):
            if limit is not None:
                ax.plot([limit, limit], [i - 0.4, i + 0.4], color="black", linewidth=1.5)
    ax.set_yticks(range(len(targets)), [t.label for t in targets], fontsize=7)
    ax.invert_yaxis()
    ax.set_title("targets: measured ratio (bar), limits (black); green = holds", fontsize=9)
    for ax, (title, ylabel, groups, series) in zip(flat[1:], panels, strict=False):
        width = 0.8 / max(1, len(series))
        for i, (label, series_values) in enumerate(series.items()):
            xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
            b = ax.bar(xs, [0.0 if math.isnan(v) else v for v in series_values], width, label=label)
            ax.bar_label(b, labels=[fmt(v) for v in series_values], fontsize=6, padding=1)
        ax.set_xticks(range(len(groups)), list(groups), fontsize=7)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(title, fontsize=9)
        if len(series) > 1:
            ax.legend(fontsize=7)
    for ax in flat[n:]:
        ax.axis("off")
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def get(d: dict[str, Any], *path: str) -> float:
    """A nested figure, or NaN when a benchmark failed or skipped it."""
    cur: Any = d
    for key in path:
        if not isinstance(cur, dict) or key not in cur:
            return math.nan
        cur = cur[key]
    return float(cur) if isinstance(cur, int | float) else math.nan
