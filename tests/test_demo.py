"""The end-to-end demo runs and writes a report with finite numbers."""

from __future__ import annotations

import json
import math

from moshi_ttt.cli import main


def test_demo_writes_report(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["parameters_unchanged"] is True
    assert report["parallel_vs_streaming_max_abs_diff"] < 1e-3
    for losses in report["inner_loss_mean"].values():
        assert all(math.isfinite(v) for v in losses.values())
    assert (tmp_path / "report.md").read_text().startswith("# moshi-ttt demo")
