"""Honest statistics (issue 26, item 1): no bootstrap interval or p-value from fewer than
``MIN_UNITS`` (5) files or groups; below it the value stands alone with "n = N: no interval",
in the returned dicts, in ``eval compare``'s printed lines and in its report. 1, 2 and 30
units."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from moshi_ttt.cli import main
from moshi_ttt.eval.compare import compare_lines, compare_reports, write_compare_report
from moshi_ttt.eval.stats import (
    MIN_UNITS,
    fmt_interval,
    mean_interval,
    paired_difference,
    ratio_difference,
    ratio_interval,
)

KEYS = {"n", "lo", "hi", "method", "level"}


def files(n: int, seed: int = 0, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-file CE sums and token counts of ``n`` files (about 2 + ``shift`` nats per token)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(50, 200, n).astype(float)
    return counts * (2.0 + shift + 0.1 * rng.normal(size=n)), counts


@pytest.mark.parametrize("n", [1, 2])
def test_too_few_units_give_no_interval_and_no_p_value(n):
    assert MIN_UNITS == 5
    s, c = files(n)
    note = f"n = {n}: no interval (fewer than 5 files)"
    r = ratio_interval(s, c)
    assert KEYS | {"mean", "note"} <= set(r) and r["n"] == n and r["note"] == note
    assert r["mean"] == pytest.approx(s.sum() / c.sum())
    assert math.isnan(r["lo"]) and math.isnan(r["hi"]) and "bootstrap over files" in r["method"]
    s2, c2 = files(n, seed=1, shift=0.5)
    d = ratio_difference(s2, c2, s, c)
    assert KEYS | {"difference", "p_value", "note"} <= set(d) and d["note"] == note
    assert d["difference"] == pytest.approx(s2.sum() / c2.sum() - s.sum() / c.sum())
    assert all(math.isnan(d[k]) for k in ("lo", "hi", "p_value"))
    assert "bootstrap over files" in d["method"]
    p = paired_difference(s2 / c2, s / c, unit="groups")
    assert p["note"] == f"n = {n}: no interval (fewer than 5 groups)"
    assert math.isnan(p["p_value"]) and math.isnan(p["lo"]) and math.isfinite(p["difference"])
    assert "paired bootstrap over groups" in p["method"]
    m = mean_interval(s / c, unit="groups")
    assert math.isnan(m["lo"]) and math.isnan(m["se"])
    assert m["mean"] == pytest.approx(np.mean(s / c))
    assert "bootstrap over groups" in m["method"] and m["note"].startswith(f"n = {n}: ")
    # printed: the value and "n = N: no interval", never a zero-width interval
    assert fmt_interval(r, 1, 4) == f"{r['mean']:.4f} (n = {n}: no interval)"
    assert fmt_interval(d, 1, 4, "difference") == f"{d['difference']:+.4f} (n = {n}: no interval)"


def test_files_without_a_token_do_not_count():
    s, c = files(8)
    c[2:] = 0  # only 2 files reach past the context
    s[2:] = 0
    assert ratio_interval(s, c)["note"].startswith("n = 2: ")
    d = ratio_difference(s, c, s, c)
    assert d["n"] == 2 and math.isnan(d["p_value"])


def test_thirty_units_give_an_interval_and_a_p_value():
    s, c = files(30)
    r = ratio_interval(s, c)
    assert "note" not in r and r["n"] == 30 and r["lo"] < r["mean"] < r["hi"]
    assert r["method"].startswith("bootstrap over files")
    s2, c2 = s + c * (0.2 + 0.1 * np.random.default_rng(5).normal(size=30)), c  # 0.2 worse
    d = ratio_difference(s2, c2, s, c)
    assert "note" not in d and 0 < d["lo"] < d["difference"] < d["hi"] and d["p_value"] < 0.01
    same = ratio_difference(s, c, s, c)
    assert same["difference"] == 0 and same["p_value"] == 1.0
    p = paired_difference(s2 / c2, s / c)
    assert "note" not in p and p["p_value"] < 0.01
    m = mean_interval(s / c)
    assert "note" not in m and m["lo"] < m["mean"] < m["hi"] and math.isfinite(m["se"])
    assert "[" in fmt_interval(d, 1, 4, "difference")
    assert ratio_interval(*files(5))["lo"] < ratio_interval(*files(5))["hi"]  # 5 is enough


def long_context_report(n: int, shift: float, path: str) -> dict:
    """A minimal long-context report.json with per-file CE sums of ``n`` files."""
    part = {}
    for i, name in enumerate(("beyond_context", "within_context", "all")):
        s, c = files(n, seed=i, shift=shift)
        part[name] = {"audio_ce": {"sum": s.tolist(), "count": c.tolist()}}
    per_file = {"names": [f"f{i}.wav" for i in range(n)], **part}
    result = {"primary": "ttt", "metric": "audio_ce", "context_frames": 12,
              "per_file": {"ttt": per_file}}  # fmt: skip
    return {"_path": path, "result": result, "long_context": {}}


@pytest.mark.parametrize("n", [1, 2, 30])
def test_compare_prints_no_interval_below_the_minimum(n, tmp_path, capsys):
    a, b = long_context_report(n, 0.3, "a"), long_context_report(n, 0.0, "b")
    c = compare_reports(a, b)
    lines = "\n".join(compare_lines(c))
    report = write_compare_report(c, tmp_path / "cmp")
    md = (tmp_path / "cmp" / "report.md").read_text()
    if n < MIN_UNITS:
        assert f"nats (n = {n}: no interval)" in lines
        assert "p = " not in lines and "[" not in lines.split("\n", 1)[1]
        assert f"(n = {n}: no interval)" in md
        beyond = report.data["parts"]["beyond_context"]
        assert beyond["note"] == f"n = {n}: no interval (fewer than 5 files)"
    else:
        assert "no interval" not in lines + md and "p = " in lines
        assert "bootstrap over files" in c["parts"]["beyond_context"]["method"]
    # the command, from report.json files (NaN written as null)
    for name, data in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps(data))
    assert main(["eval", "compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    printed = capsys.readouterr().out
    assert (f"(n = {n}: no interval)" in printed) == (n < MIN_UNITS)
    assert ("p = " in printed) == (n >= MIN_UNITS)


def pairs_report(groups: int, path: str, right: float) -> dict:
    keys = [f"v/{i}" for i in range(2 * groups)]
    rng = np.random.default_rng(len(path))
    return {
        "_path": path,
        "benchmark": "sblimp",
        "subsets": {"all": {}},
        "reduction": "mean",
        "protocol": {},
        "items": {
            "key": keys,
            "group": [str(i // 2) for i in range(2 * groups)],
            "subsets": ["all"] * len(keys),
            "outcome_mean": [float(x) for x in rng.random(len(keys)) < right],
        },
    }


@pytest.mark.parametrize("groups", [1, 2, 30])
def test_pair_comparison_over_groups(groups):
    c = compare_reports(pairs_report(groups, "a", 0.9), pairs_report(groups, "bb", 0.3))
    s = c["subsets"]["all"]
    assert s["n"] == groups and "over groups" in s["method"]
    line = compare_lines(c)[1]
    if groups < MIN_UNITS:
        assert math.isnan(s["p_value"]) and f"points (n = {groups}: no interval)" in line
    else:
        assert s["lo"] < s["difference"] < s["hi"] and "p = " in line


def test_one_file_eval_says_no_interval(tmp_path, capsys):
    import sphn
    from moshi.utils.compile import no_compile

    t = np.arange(3 * 24000) / 24000
    wav = tmp_path / "one.wav"
    sphn.write_wav(str(wav), (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 24000)
    out = tmp_path / "lc"
    args = ["--tiny", "--device", "cpu", "--no-progress", "--speedup-frames", "0"]
    with no_compile():
        assert main(["eval", "long-context", str(wav), "--out", str(out), *args]) == 0
    printed = capsys.readouterr().out
    assert "n = 1: no interval (fewer than 5 files): the differences above have no 95 % CI" in (
        printed
    )
    assert "p = 0" not in printed and "95 % CI [" not in printed
    md = (out / "report.md").read_text()
    assert "(n = 1: no interval)" in md and "p = 0" not in md


def test_a_bootstrap_p_below_its_resolution_is_never_printed_as_zero():
    from moshi_ttt.eval.stats import N_BOOT, format_p, paired_difference

    d = paired_difference(np.full(30, -1.0) + np.linspace(0, 0.1, 30), np.zeros(30))
    assert d["p_value"] == 0  # no resample on the other side of 0
    assert format_p(d["p_value"]) == f"< {2 / N_BOOT:.2g}" == "< 0.001"
    assert format_p(0.0123) == "0.0123" and format_p(float("nan")) == "-" and format_p(None) == "-"
    assert format_p(0.0, bootstrap=False) == "0"  # an exact test's p is printed as it is
