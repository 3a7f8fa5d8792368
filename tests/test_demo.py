"""The end-to-end demo (shortened): base -> export -> frozen retrofit -> eval, through the real
trainer, exporter and evaluation; results.json rows are recomputed by their commands."""

from __future__ import annotations

import json
import math
import re
import shlex

import pytest

from moshi_ttt.cli import main


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--task", "markov", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out


def test_quick_demo_writes_results_and_report(quick):
    results = json.loads((quick / "results.json").read_text())
    rows = results["rows"]
    assert {"base", "oracle_full", "retrofit", "retrofit_reset", "retrofit_gate0",
            "scratch", "e2e", "e2e_meta"} <= set(rows)  # fmt: skip
    assert rows["e2e"]["frozen_base"] and rows["e2e_meta"]["frozen_base"]
    assert results["e2e_choice"]["validation"] and results["e2e_choice"]["validation_files"] > 0
    base, oracle = rows["base"]["ce_beyond"], rows["oracle_full"]["ce_beyond"]
    assert results["available_gain"] == pytest.approx(base - oracle)
    for name, row in rows.items():
        assert math.isfinite(row["ce_within"]) and math.isfinite(row["ce_beyond"])
        want = (base - row["ce_beyond"]) / (base - oracle)
        assert row["gain_share"] == pytest.approx(want), name
    assert rows["base"]["gain_share"] == 0.0 and rows["oracle_full"]["gain_share"] == 1.0
    assert rows["retrofit"]["frozen_base"] and not rows["base"]["frozen_base"]
    assert rows["oracle_full"]["command"] is None
    # gate forced to 0 on the frozen base is the base itself, bit for bit
    assert rows["retrofit_gate0"]["ce_beyond"] == base
    assert 0 < rows["retrofit"]["gate"] <= 1
    assert results["target_met"] == (rows["retrofit"]["gain_share"] >= 0.5)
    md = (quick / "report.md").read_text()
    assert md.startswith("# moshi-ttt demo") and "frozen" in md
    report = json.loads((quick / "report.json").read_text())
    for plot in report["plots"]:
        assert (quick / plot).stat().st_size > 1000
    assert {"loss_vs_position.png", "training.png"} <= set(report["plots"])
    # the retrofit trained on the exported base, frozen, with the shorter training window
    cfg = (quick / "configs" / "retrofit.yaml").read_text()
    assert "source: local" in cfg and "train_base: false" in cfg and "train_context: 4" in cfg
    assert (quick / "base" / "model.safetensors").is_file()


@pytest.mark.parametrize("row", ["base", "retrofit", "retrofit_reset", "retrofit_gate0"])
def test_results_commands_reproduce_the_rows(quick, row, capsys, monkeypatch):
    results = json.loads((quick / "results.json").read_text())
    entry = results["rows"][row]
    argv = shlex.split(entry["command"])
    assert argv[0].endswith("moshi-ttt")
    monkeypatch.chdir(quick.parent)  # the paths are absolute here; any directory works
    assert main(argv[1:]) == 0
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if "beyond the context" in x)
    values = dict(re.findall(r"(\w+) (-?\d+\.\d{4})", line))
    assert float(values[entry["variant"]]) == pytest.approx(entry["ce_beyond"], abs=1e-4)


def test_quick_demo_is_deterministic(quick, tmp_path):
    argv = ["demo", "--task", "markov", "--quick", "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    a = json.loads((quick / "results.json").read_text())["rows"]
    b = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {k: v["ce_beyond"] for k, v in a.items()} == {k: v["ce_beyond"] for k, v in b.items()}
    assert a["retrofit"]["gate"] == b["retrofit"]["gate"]


def test_quick_demo_audio_stream(tmp_path):
    assert main(["demo", "--task", "markov", "--quick", "--stream", "audio", "--out", str(tmp_path),
                 "--no-progress"]) == 0  # fmt: skip
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["metric"] == "cb0"
    assert all(math.isfinite(r["ce_beyond"]) for r in results["rows"].values())
