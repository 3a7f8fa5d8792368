"""The end-to-end demo (shortened) runs through the real trainer and evaluation and writes a
report with finite numbers."""

from __future__ import annotations

import json
import math

from moshi_ttt.cli import main


def test_quick_demo_writes_report_with_finite_numbers(tmp_path):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    summary = report["summary"]
    for row in summary["loss"].values():
        assert math.isfinite(row["inside"]) and math.isfinite(row["beyond"])
    assert math.isfinite(summary["gain_beyond_pct"])
    assert set(summary["checks"]) == {
        "ttt_at_least_10pct_below_baseline_beyond_window",
        "state_reset_gives_back_most_of_the_gain",
        "gate_not_collapsed",
    }
    assert all(math.isfinite(v) for v in summary["gates"].values())
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# moshi-ttt demo") and "Bar " in md
    for plot in report["plots"]:
        assert (tmp_path / plot).stat().st_size > 1000
    assert {"loss_vs_position.png", "training_loss.png"} <= set(report["plots"])
    # both models went through the real trainer: checkpoints and metrics exist
    for run in report["runs"].values():
        assert list((tmp_path / "runs").glob("*/checkpoints/step_*"))
        assert (tmp_path / "runs").exists() and run
    assert (tmp_path / "configs" / "ttt.yaml").is_file()


def test_quick_demo_is_deterministic(tmp_path):
    runs = []
    for name in ("a", "b"):
        assert main(["demo", "--quick", "--out", str(tmp_path / name), "--no-progress"]) == 0
        runs.append(json.loads((tmp_path / name / "report.json").read_text())["summary"])
    assert runs[0]["loss"] == runs[1]["loss"] and runs[0]["gates"] == runs[1]["gates"]
