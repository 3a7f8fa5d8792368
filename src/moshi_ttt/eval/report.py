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
