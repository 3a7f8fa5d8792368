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
