"""The reports' plots: one colour and marker per row across a report's plots (one style map),
the demo's difference-to-base plot with its intervals, a loss plot a reader can use, eval
summary's audio and text CE on separate axes; and the demo report's counts."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matplotlib.collections import LineCollection, PolyCollection
from matplotlib.colors import to_hex
from matplotlib.container import ErrorbarContainer

from moshi_ttt.demo.realdata_report import counted, write_report
from moshi_ttt.eval.compare import _plot_long_context
from moshi_ttt.eval.long_context import FileLosses, PositionLosses
from moshi_ttt.eval.report import Report, row_styles

ROWS = ("base", "dyneval", "e2e", "e2e_meta", "cache", "assoc")
C = 16


@pytest.fixture
def figures(monkeypatch):
    """Every figure a ``Report`` saves, by file name, inspected before it is closed."""
    seen: dict[str, dict] = {}
    real = Report.add_figure

    def keep(self, fig, filename, caption):
        fig.tight_layout()
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        seen[filename] = {
            "size": tuple(fig.get_size_inches()),
            "axes": [
                {
                    "title": ax.get_title(),
                    "ylabel": ax.get_ylabel(),
                    "box": ax.get_window_extent(renderer),
                    "legend": (
                        ax.get_legend().get_window_extent(renderer) if ax.get_legend() else None
                    ),
                    "legend_labels": (
                        [t.get_text() for t in ax.get_legend().get_texts()]
                        if ax.get_legend()
                        else []
                    ),
                    "lines": {
                        ln.get_label(): (to_hex(ln.get_color()), ln.get_marker()) for ln in ax.lines
                    },  # fmt: skip
                    "bands": sum(isinstance(c, PolyCollection) for c in ax.collections),
                    "bars": [c for c in ax.collections if isinstance(c, LineCollection)],
                    "errorbars": {
                        c.get_label(): (to_hex(c.lines[0].get_color()), c.lines[0].get_marker())
                        for c in ax.containers
                        if isinstance(c, ErrorbarContainer) and c.lines[0] is not None
                    },
                }
                for ax in fig.axes
            ],
            "suptitle": fig._suptitle.get_text() if fig._suptitle else "",
            "caption": caption,
        }
        return real(self, fig, filename, caption)

    monkeypatch.setattr(Report, "add_figure", keep)
    return seen


def _curve(level: float, files: int = 6, frames: int = 48) -> PositionLosses:
    """Text-only losses: ``level`` + noise per position, one sequence per file."""
    curve = PositionLosses(block_frames=8)
    g = torch.Generator().manual_seed(int(level * 100))
    for i in range(files):
        text = level + 0.1 * torch.rand(frames, generator=g)
        mask = torch.ones(frames, dtype=torch.bool)
        audio, amask = torch.zeros(8, frames), torch.zeros(8, frames, dtype=torch.bool)
        curve.add(FileLosses(text, mask, audio, amask), f"f{i}.py#0")
    return curve


def _row(d_within: float, d_beyond: float) -> dict:
    def ci(d: float) -> dict:
        return {"n": 6, "difference": d, "lo": d - 0.05, "hi": d + 0.04, "p_value": 0.01}

    return {
        "ce_within": {"mean": 2.0, "lo": 1.9, "hi": 2.1},
        "ce_beyond": {"mean": 2.0 + d_beyond, "lo": 1.9, "hi": 2.1},
        "vs_base_within": ci(d_within),
        "vs_base_beyond": ci(d_beyond),
        "train_seconds": None,
        "ms_per_frame": 1.0,
        "state_bytes_moshi7b": {"45000": 2**30},
    }


def _fake_demo(tmp_path, details_keys: dict) -> tuple:
    levels = dict(zip(ROWS, (2.0, 1.9, 1.8, 1.6, 1.85, 1.7)))
    curves = {name: _curve(v) for name, v in levels.items()}
    rows = {name: _row(0.0, 0.0) if name == "base" else _row(-0.01, v - 2.0)
            for name, v in levels.items()}  # fmt: skip
    rows["base"]["vs_base_within"] = rows["base"]["vs_base_beyond"] = None
    validation = [{"label": "lr 0.1", "text_ce": 1.9, "hidden": 64, "lr": 0.1, "chunk": 8}]
    rows["dyneval"]["details"] = {"label": "lr 0.1", "validation": validation, **details_keys}
    rows["e2e"]["details"] = {"label": "w 64", "validation": validation, "ms_per_update": 1.0,
                              "rollbacks": 0, **details_keys}  # fmt: skip
    rows["assoc"]["details"] = {"label": "Dk 64", "on": "base", **details_keys}

    def share(v: float) -> dict:
        return {"share": v, "lo": v - 0.1, "hi": v + 0.1, "ce_inside": 5.0, "ce_base_floor": 6.0}

    ci = {"mean": 2.0, "lo": 1.9, "hi": 2.1, "tokens": 10.0}
    recall = {
        "repeat_n": 8,
        "needle": {"distances": [2, 4], "key_len": 6, "value_len": 6, "lead": 4},
        "repeat": {
            n: {
                "recallable": ci | {"vs_reference": {"difference": -0.1, "lo": -0.2, "hi": 0.0}},
                "other": ci,
            }
            for n in ROWS
        },  # fmt: skip
        "needle_shares": {
            n: {"2x": share(0.1 * i), "4x": share(0.05 * i)} for i, n in enumerate(ROWS)
        },  # fmt: skip
        "needle_files": 6,
        "not_scored": [],
    }
    results = {
        "recall": recall,
        "corpus": {
            "root": "x",
            "kind": "text",
            "sequences": {"train": 9, "val": 3, "test": 6},
            "skipped": {},
            "capped": None,
        },  # fmt: skip
        "held_out_sequences": 6,
        "held_out_files": 6,
        "rows": rows,
        "verdict": {"lines": ["x"]},
    }
    s = SimpleNamespace(context=C, frames=48, model={"num_layers": 4}, base_steps=10,
                        bin_frames=8)  # fmt: skip
    return s, results, curves


def test_demo_plots_share_one_style_map_and_show_intervals(tmp_path, figures):
    s, results, curves = _fake_demo(tmp_path, {"validation_files": 1, "validation_sequences": 3})
    write_report(tmp_path, s, results, curves, {})
    styles = row_styles(ROWS)
    assert len({st["color"] for st in styles.values()}) == len(ROWS)  # one colour per row
    assert len({st["marker"] for st in styles.values()}) == len(ROWS)  # and one marker
    # the loss plot: every row in its colour and marker; a usable size; legend outside
    loss = figures["loss_vs_position.png"]
    (ax,) = loss["axes"]
    for name in ROWS:
        assert ax["lines"][name] == (styles[name]["color"], styles[name]["marker"]), name
    assert loss["size"][0] >= 10 and loss["size"][1] >= 5
    legend, box = ax["legend"], ax["box"]
    assert legend.x0 >= box.x1 or legend.y1 <= box.y0  # the legend is beside the data
    # bands: the base and the two rows lowest beyond the window only (e2e_meta, assoc)
    assert ax["bands"] == 3
    assert "for base, e2e_meta, assoc" in loss["caption"]
    # the difference plot: the same colour and marker per row, intervals, no "Gain of base"
    vs = figures["vs_base.png"]
    assert "gain_vs_position.png" not in figures
    assert "Gain of" not in vs["suptitle"] and "negative: the row helps" in vs["suptitle"]
    assert "95 % interval" in vs["suptitle"]
    for panel, key in zip(vs["axes"], ("vs_base_within", "vs_base_beyond")):
        assert "base" not in panel["errorbars"]  # the reference is not a row of the plot
        for name in ROWS[1:]:
            assert panel["errorbars"][name] == (styles[name]["color"], styles[name]["marker"])
        spans = sorted(
            tuple(sorted((seg[0][0], seg[1][0])))
            for bars in panel["bars"]
            for seg in bars.get_segments()
        )  # fmt: skip
        want = sorted(
            (results["rows"][n][key]["lo"], results["rows"][n][key]["hi"]) for n in ROWS[1:]
        )
        np.testing.assert_allclose(spans, want)  # each row's 95 % interval, drawn
    md = (tmp_path / "report.md").read_text()
    assert "![" in md and "vs_base.png" in md
    # counts: sequences from files
    assert "Dynamic evaluation setting chosen on 3 validation sequences from 1 files" in md
    assert "End-to-end memory: setting chosen on 3 validation sequences from 1 files" in md
    assert "Memory settings chosen on 3 validation sequences from 1 files" in md
    # the needle plot: the same colour and marker per row
    (needles,) = figures["needle_recall.png"]["axes"]
    for name in ROWS:
        assert needles["lines"][name] == (styles[name]["color"], styles[name]["marker"])


def test_counts_of_older_results_say_sequences():
    # results.json before validation_sequences: validation_files counted sequences
    assert counted({"validation_files": 3}, "validation") == "3 validation sequences"
    assert counted({"validation_files": 1, "validation_sequences": 3}, "validation") == (
        "3 validation sequences from 1 files"
    )
    assert counted({}, "validation") == "the validation sequences"


def test_row_styles_fixed_for_known_rows_and_distinct_for_others():
    a = row_styles(["base", "e2e", "x", "y"])
    b = row_styles(["e2e", "base"])
    assert a["base"] == b["base"] and a["e2e"] == b["e2e"]
    assert a["base"]["color"] == "#000000"
    assert len({v["color"] for v in a.values()}) == 4


def test_eval_summary_puts_audio_and_text_ce_on_separate_axes(tmp_path, figures):
    def report(path: str, metric: str) -> dict:
        curve = {"start": [0, 8, 16], "end": [8, 16, 24], "audio_ce": [math.nan] * 3,
                 "text_ce": [math.nan] * 3}  # fmt: skip
        curve[metric] = [3.0, 2.9, 2.8]
        band = {"lo": [v - 0.1 for v in curve[metric]], "hi": [v + 0.1 for v in curve[metric]]}
        return {"_path": path, "result": {"metric": metric, "context_frames": 12,
                                          "curves": {"ttt": curve, "no_ttt": dict(curve)},
                                          "curve_intervals": {"ttt": band}}}  # fmt: skip

    longs = [report("a", "audio_ce"), report("b", "text_ce")]
    page = Report("summary", tmp_path)
    _plot_long_context(page, longs, {"a": "model A", "b": "model B"})
    fig = figures["long_context.png"]
    assert [ax["title"] for ax in fig["axes"]] == ["audio CE", "text CE"]
    assert [ax["ylabel"] for ax in fig["axes"]] == ["audio CE (nats)", "text CE (nats)"]
    audio, text = ({k for k in ax["lines"] if not k.startswith("_")} for ax in fig["axes"])
    assert audio == {"model A: ttt", "model A: no_ttt"}
    assert text == {"model B: ttt", "model B: no_ttt"}
    assert set(fig["axes"][-1]["legend_labels"]) == audio | text  # one legend names every curve
