"""The real-data benchmark (``moshi-ttt demo``, shortened): every row on the same held-out
files, results.json fields, the cached base, a row recomputed by its command, bad --data."""

from __future__ import annotations

import json
import math
import shlex

import pytest

from moshi_ttt.cli import main
from moshi_ttt.demo.realdata import ESSENTIAL, ROWS


def make_corpus(root, n: int = 120) -> str:
    for i in range(n):
        d = root / f"pkg{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        name = f"value_{i}"
        body = "".join(f"def f{j}({name}):\n    return {name} + {j}\n" for j in range(8))
        (d / f"m{i}.py").write_text(body)
    (root / "blob.bin").write_bytes(b"\x00" * 300)
    return str(root)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def quick(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("rd")
    argv = ["demo", "--quick", "--data", corpus, "--out", str(out), "--rows", "all",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    return out


def test_every_row_is_written_with_intervals_and_costs(quick):
    results = json.loads((quick / "results.json").read_text())
    rows = results["rows"]
    assert set(rows) == set(ROWS)
    assert results["corpus"]["skipped"] == {"not_text": 1}
    assert results["held_out_files"] >= 5  # enough units for intervals (eval.stats.MIN_UNITS)
    for name, r in rows.items():
        for part in ("ce_within", "ce_beyond"):
            ci = r[part]
            assert math.isfinite(ci["mean"]) and ci["lo"] <= ci["mean"] <= ci["hi"], name
            assert ci["n"] == results["held_out_files"]
        if name != "base":
            d = r["vs_base_beyond"]
            assert d["lo"] <= d["difference"] <= d["hi"]
        assert r["command"].split()[1:3] == ["demo", "--data"]
        assert r["state_bytes_moshi7b"]["45000"] >= r["state_bytes_moshi7b"]["3000"] > 0
    assert rows["retrofit_gate0"]["ce_beyond"]["mean"] == rows["base"]["ce_beyond"]["mean"]
    assert rows["base"]["vs_base_beyond"] is None
    chosen = rows["dyneval"]["details"]
    assert chosen["validation_files"] > 0 and chosen["validation"]  # chosen on validation
    assert rows["dyneval"]["train_seconds"] == 0.0 and rows["retrofit"]["train_seconds"] > 0
    e2e = rows["e2e"]["details"]
    assert e2e["validation_files"] > 0 and e2e["validation"] and e2e["updates"] > 0
    assert rows["e2e"]["train_seconds"] == 0.0 and rows["e2e_meta"]["train_seconds"] > 0
    assert rows["e2e_meta"]["details"]["inner_lr_learned"][0] > 0
    assert set(results["verdict"]) >= {"no_harm", "helps", "e2e_at_least_dyneval",
                                       "e2e_meta_gain_ratio", "lines"}  # fmt: skip
    md = (quick / "report.md").read_text()
    assert "does a memory help on real data" in md and "dyneval" in md.lower()
    report = json.loads((quick / "report.json").read_text())
    assert "loss_vs_position.png" in report["plots"]
    # the test files are held out: none of them is in the training split
    train = {f["path"].split("#")[0] for f in json.loads(
        (quick / "data" / "train" / "shards.json").read_text())["files"]}  # fmt: skip
    test = {f["path"].split("#")[0] for f in json.loads(
        (quick / "data" / "test" / "shards.json").read_text())["files"]}  # fmt: skip
    assert test and not train & test


def test_a_rows_command_recomputes_it_with_the_cached_base(quick, capsys):
    results = json.loads((quick / "results.json").read_text())
    argv = shlex.split(results["rows"]["dyneval"]["command"])
    assert argv[-1] == "--quick"  # the row's command reproduces the quick run it came from
    assert main(argv[1:]) == 0
    out = capsys.readouterr().out  # --no-progress hides the progress, not the result
    assert "done in" in out and "[--quick: a smoke test" in out
    assert results["quick"] is True and all(
        x.startswith("[--quick") for x in results["verdict"]["lines"])  # fmt: skip
    assert "not a measurement" in (quick / "report.md").read_text()
    again = json.loads((quick / "results.json").read_text())["rows"]
    assert set(again) == {"base", "dyneval"}
    for name in again:
        assert again[name]["ce_beyond"]["mean"] == pytest.approx(
            results["rows"][name]["ce_beyond"]["mean"], abs=1e-6)  # fmt: skip
    assert set(ESSENTIAL) <= set(ROWS)


@pytest.mark.parametrize("case", ["missing", "empty", "binary"])
def test_bad_data_is_one_paragraph_and_exit_2(tmp_path, capsys, case):
    data = tmp_path / "data"
    if case != "missing":
        data.mkdir()
    if case == "binary":
        for i in range(30):
            (data / f"{i}.bin").write_bytes(b"\x00" * 500)
    assert main(["demo", "--quick", "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(data) in err and "Traceback" not in err and "expected" in err


def test_option_mixups_are_refused(tmp_path, capsys):
    assert main(["demo", "--task", "markov", "--data", "x", "--out", str(tmp_path / "o")]) == 2
    assert main(["demo", "--stream", "audio", "--out", str(tmp_path / "o")]) == 2
    assert main(["demo", "--rows", "bse", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--rows" in err and "--task markov" in err


def test_sequences_of_one_file_are_one_unit():
    import torch

    from moshi_ttt.demo.corpus import source_file
    from moshi_ttt.eval.long_context import FileLosses, PositionLosses

    curve = PositionLosses(8, 4)
    for name, v in (("a#0", 1.0), ("a#1", 3.0), ("b#0", 2.0)):
        text = torch.full((8,), v)
        curve.add(FileLosses(text, torch.ones(8, dtype=torch.bool), torch.zeros(8, 8),
                             torch.zeros(8, 8, dtype=torch.bool)), name)  # fmt: skip
    units = curve.grouped(source_file)
    assert units.file_names == ["a", "b"] and curve.file_names == ["a#0", "a#1", "b#0"]
    assert units.totals(4)["text_ce"] == curve.totals(4)["text_ce"] == pytest.approx(2.0)
    per_file = units.file_totals(4)["text_ce"]
    assert list(per_file["sum"]) == [16.0, 8.0] and list(per_file["count"]) == [8.0, 4.0]
