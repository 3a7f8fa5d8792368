"""Evaluation reports: ``OUT/report.md`` (for people), ``OUT/report.json`` (for programs) and
PNG plots beside them. Every ``moshi-ttt eval ...`` command writes one through ``Report``.

    report = Report("Long-context loss", out_dir)
    report.add_text("## Setup\n...")
    report.add_table(["model", "loss"], [["ttt", 2.31]])
    fig, ax = report.figure()
    ax.plot(...)
    report.add_figure(fig, "loss_vs_position.png", "Loss against position")
    report.data["headline"] = {...}
    report.write()          # report.md + report.json, atomically
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402


class Report:
    """A markdown document, a JSON record and plots, written to ``out_dir``."""

    def __init__(self, title: str, out_dir: str | Path) -> None:
        self.title = title
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.parts: list[str] = []
        self.data: dict[str, Any] = {"title": title, "plots": []}

    def add_text(self, text: str) -> None:
        self.parts.append(text.rstrip() + "\n")

    def add_table(self, header: list[str], rows: list[list[Any]], digits: int = 4) -> None:
        """A markdown table; floats are printed with ``digits`` significant digits."""
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in rows:
            lines.append("| " + " | ".join(fmt(v, digits) for v in row) + " |")
        self.add_text("\n".join(lines))

    @staticmethod
    def figure(width: float = 7.0, height: float = 4.0, **kwargs: Any) -> tuple[Any, Any]:
        """A new matplotlib figure and axes (``plt.subplots``)."""
        return plt.subplots(figsize=(width, height), **kwargs)

    def add_figure(self, fig: Any, filename: str, caption: str) -> Path:
        """Save ``fig`` as ``out_dir/filename`` (PNG), close it, link it in the markdown."""
        path = self.out / filename
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        self.parts.append(f"![{caption}]({filename})\n\n*{caption}*\n")
        self.data["plots"].append(filename)
        return path

    def write(self) -> Path:
        """Write ``report.md`` and ``report.json`` (NaN/inf become null); returns report.md."""
        md = f"# {self.title}\n\n" + "\n".join(self.parts)
        _atomic_write(self.out / "report.json", json.dumps(jsonable(self.data), indent=1))
        return _atomic_write(self.out / "report.md", md)


# Curves are told apart by line style and marker as well as colour, so curves that coincide
# (e.g. two gate values with the same loss) stay visible: each later one is drawn thinner, with
# a smaller hollow marker, on top of the earlier ones.
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
FEW_POINTS = 20  # up to this many points a curve gets markers (a single point stays visible)


def curve_style(index: int, points: int) -> dict[str, Any]:
    """``ax.plot`` keyword arguments for the ``index``-th curve of an axes with ``points``
    points: its own line style, and with few points (<= ``FEW_POINTS``) its own hollow marker,
    smaller for later curves so one drawn over another leaves it visible."""
    style: dict[str, Any] = {
        "linestyle": LINESTYLES[index % len(LINESTYLES)],
        "linewidth": max(0.8, 2.0 - 0.3 * index),
    }
    if points <= FEW_POINTS:
        style |= {
            "marker": MARKERS[index % len(MARKERS)],
            "markersize": max(3.0, 9.0 - 1.5 * index),
            "fillstyle": "none" if index else "full",
        }
    return style


# One colour and one marker per row, the same in every plot of a report (the demos' loss, difference
# and needle plots, eval long-context's loss and difference plots, eval summary): the rows the
# project names get fixed ones (``base`` black circles), any other name the next free pair in
# the order it comes. ``row_styles`` is the one home of this map.
KNOWN_ROWS = (
    "base", "dyneval", "e2e", "e2e_meta", "e2e_meta_static", "cache", "retrieval", "assoc",
    "e2e_assoc", "e2e_meta_assoc", "window_plain", "window_ntk", "window_yarn", "retrofit",
    "retrofit_reset", "retrofit_gate0", "retrofit_forced", "lora_long", "full_attention",
    "full_attention_4x", "scratch", "oracle_full", "oracle_window", "ttt", "no_ttt",
)  # fmt: skip
ROW_COLORS = (
    "#000000", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
    "#17becf", "#bcbd22", "#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5",
    "#c49c94", "#f7b6d2", "#9edae5", "#dbdb8d", "#393b79", "#637939", "#8c6d31", "#843c39",
)  # fmt: skip
ROW_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")


def row_styles(names: Any) -> dict[str, dict[str, str]]:
    """``{name: {"color", "marker"}}`` for the rows ``names`` (any iterable of names): a
    known row (``KNOWN_ROWS``) its own colour and marker in every plot and every report,
    ``base`` black circles; other names (``reset_every_16``, ``gate=0``, a model label) the
    next unused pair in order. No two names of one call share a colour."""
    names = list(dict.fromkeys(names))
    out: dict[str, dict[str, str]] = {}
    used: set[int] = set()
    nxt = len(KNOWN_ROWS)
    for name in names:
        if name in KNOWN_ROWS:
            i = KNOWN_ROWS.index(name)
        else:
            i, nxt = nxt, nxt + 1
        while i % len(ROW_COLORS) in used and len(used) < len(ROW_COLORS):
            i += 1
        used.add(i % len(ROW_COLORS))
        out[name] = {"color": ROW_COLORS[i % len(ROW_COLORS)],
                     "marker": ROW_MARKERS[i % len(ROW_MARKERS)]}  # fmt: skip
    return out


def row_line_style(row: dict[str, str], index: int, points: int) -> dict[str, Any]:
    """``ax.plot`` keyword arguments for a row's curve: its colour and marker (``row_styles``),
    the line style and width of the ``index``-th curve of the axes (``curve_style``: curves
    that coincide stay visible); on a curve of many points a marker every ~1/12 of them."""
    style = curve_style(index, points)
    style |= {
        "color": row["color"],
        "marker": row["marker"],
        "markersize": style.get("markersize", 5.0),
        "fillstyle": style.get("fillstyle", "full"),
    }
    if points > FEW_POINTS:
        style["markevery"] = max(1, points // 12)
    return style


def legend_outside(ax: Any, fontsize: float = 8, axes: Any = None) -> Any:
    """The legend of ``ax`` to the right of its data area (never over the curves); with
    ``axes``, of the labelled curves of all of them (each label once)."""
    entries: dict[str, Any] = {}
    for a in axes if axes is not None else [ax]:
        for handle, label in zip(*a.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    return ax.legend(list(entries.values()), list(entries), fontsize=fontsize,
                     loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)  # fmt: skip


def coincidence_labels(curves: dict[str, Any]) -> dict[str, str]:
    """Legend labels for named curves (sequences of numbers): a curve equal to an earlier one
    (same length, equal within 1e-9 relative, NaN where it is NaN) is labelled
    ``"name (= earlier)"``, so coinciding curves are named as such."""
    labels: dict[str, str] = {}
    seen: list[tuple[str, np.ndarray]] = []
    for name, values in curves.items():
        a = np.asarray(values, dtype=float)
        same = next(
            (
                other
                for other, b in seen
                if a.shape == b.shape
                and a.size
                and np.allclose(a, b, rtol=1e-9, atol=0.0, equal_nan=True)
            ),
            None,
        )
        labels[name] = f"{name} (= {same})" if same else name
        seen.append((name, a))
    return labels


def plot_bin_frames(requested: int, longest: int, min_bins: int = 4) -> int:
    """The position bin of the curves: ``requested``, unless it leaves fewer than ``min_bins``
    bins on the longest file (``longest`` frames), then a bin that gives that file about
    ``2 * min_bins`` bins (a 96-frame file: 12-frame bins instead of one 250-frame dot)."""
    if requested < 1 or longest <= 0 or math.ceil(longest / requested) >= min_bins:
        return requested
    return max(1, math.ceil(longest / (2 * min_bins)))


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: floats with ``digits`` significant digits, NaN as ``-``."""
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.{digits}g}"
    return str(value)


def jsonable(value: Any) -> Any:
    """``value`` with tensors/arrays as lists and non-finite floats as None (strict JSON)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def _atomic_write(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
