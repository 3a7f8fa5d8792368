"""Uncertainty, equal-length curves, the reviewer's controls, `eval compare` and `eval summary`,
on synthetic data where the answer is known (numpy and the tiny model)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from moshi.utils.compile import no_compile

from moshi_ttt.cli import main
from moshi_ttt.eval.compare import compare_reports, summarize
from moshi_ttt.eval.long_context import (
    FileLosses,
    PositionLosses,
    attention_context,
    auto_equal_length,
    evaluate_long_context,
    splice_history,
    write_long_context_report,
)
from moshi_ttt.eval.pairs import Pair, pair_accuracy
from moshi_ttt.eval.stats import (
    mcnemar_exact,
    mean_interval,
    paired_difference,
    ratio_difference,
    ratio_interval,
)
from moshi_ttt.integration import TTTConfig, apply_ttt, build_tiny_lm


# -- statistics ---------------------------------------------------------------------------------
def test_mcnemar_exact_known_values():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(10, 0) == pytest.approx(2 * 0.5**10)
    assert mcnemar_exact(3, 7) == mcnemar_exact(7, 3)
    # binomial(10, 1/2): P[X <= 3] = (1 + 10 + 45 + 120) / 1024
    assert mcnemar_exact(3, 7) == pytest.approx(2 * 176 / 1024)
    assert mcnemar_exact(500, 500) == 1.0 and mcnemar_exact(400, 600) < 1e-8


def test_bootstrap_interval_covers_the_truth_at_its_nominal_rate():
    rng = np.random.default_rng(1)
    p, n, reps = 0.6, 120, 300
    covered = 0
    for r in range(reps):
        ci = mean_interval(rng.random(n) < p, n_boot=400, seed=r)
        covered += ci["lo"] <= p <= ci["hi"]
    assert 0.90 <= covered / reps <= 0.99  # nominal 0.95
    # ratio intervals over files: token-weighted mean with files of unequal sizes
    covered = 0
    for r in range(150):
        counts = rng.integers(50, 500, 40).astype(float)
        sums = np.array([rng.normal(2.0, 1.0, int(c)).sum() for c in counts])
        ci = ratio_interval(sums, counts, n_boot=400, seed=r)
        covered += ci["lo"] <= 2.0 <= ci["hi"]
    assert 0.88 <= covered / 150 <= 0.995


def test_paired_tests_on_identical_models_give_no_difference():
    x = np.random.default_rng(0).random(50)
    d = paired_difference(x, x)
    assert d["difference"] == 0 and d["lo"] == d["hi"] == 0 and d["p_value"] == 1.0
    s, c = np.random.default_rng(1).random(20) * 100, np.full(20, 50.0)
    d = ratio_difference(s, c, s, c)
    assert d["difference"] == 0 and d["p_value"] == 1.0
    d = ratio_difference(s + 25, c, s, c)  # +0.5 nats per token on every file
    assert d["difference"] == pytest.approx(0.5) and d["lo"] > 0 and d["p_value"] < 0.01


# -- equal-length curves ------------------------------------------------------------------------
def _file(T: int, seed: int, level: float = 1.0) -> FileLosses:
    g = torch.Generator().manual_seed(seed)
    audio = level + torch.rand(8, T, generator=g)
    mask = torch.ones(8, T, dtype=torch.bool)
    mask[1:, -1] = False
    return FileLosses(torch.rand(T, generator=g), torch.ones(T, dtype=torch.bool), audio, mask)


def test_equal_length_curve_equals_the_plain_one_on_files_of_equal_length():
    curve = PositionLosses(block_frames=5)
    for i in range(3):
        curve.add(_file(40, i), f"f{i}")
    eq = curve.equal_length(40)
    a, b = curve.binned(10), eq.binned(10)
    for key in ("audio_ce", "cb0", "cb1_7", "text_ce", "files", "audio_tokens"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-12)
    assert curve.totals(15)["audio_ce"] == pytest.approx(eq.totals(15)["audio_ce"])
    # per-file totals add up to the totals
    ft = curve.file_totals(15)["audio_ce"]
    assert ft["sum"].sum() / ft["count"].sum() == pytest.approx(curve.totals(15)["audio_ce"])


def test_equal_length_curve_keeps_one_population():
    curve = PositionLosses(block_frames=5)
    # short files are easy (CE ~1.5), long files hard (~3.5): the plain curve jumps at 20
    for i in range(3):
        curve.add(_file(20, i, level=1.0), f"short{i}")
        curve.add(_file(60, 10 + i, level=3.0), f"long{i}")
    plain = curve.binned(10)["cb0"]
    assert plain[2] - plain[1] > 0.8  # a change of population, not of position
    eq = curve.equal_length(40)
    assert eq.files.tolist() == [3] * 40 and eq.file_names == ["long0", "long1", "long2"]
    assert np.ptp(eq.binned(10)["cb0"]) < 0.5
    assert auto_equal_length([20, 20, 60, 60, 60], 10) == 60
    assert auto_equal_length([20], 10) == 0


# -- pairs: intervals and per-item data ---------------------------------------------------------
def test_pair_accuracy_intervals_and_breakdown(tmp_path):
    from moshi_ttt.eval.likelihood import Score

    def score(v: float) -> Score:
        return Score(4, np.array([4 * v] + [0.0] * 7), np.array([4] + [0] * 7))

    pairs, scores = [], {}
    rng = np.random.default_rng(0)
    for i in range(60):
        pos, neg = tmp_path / f"{i}p.wav", tmp_path / f"{i}n.wav"
        pairs.append(Pair(str(i), pos, neg, str(i), ("all",), (f"length {3 + i % 3}",)))
        scores[str(pos)], scores[str(neg)] = score(rng.normal()), score(rng.normal())
    acc = pair_accuracy(pairs, scores)
    ci = acc["intervals"]["all"]
    assert ci["lo"] <= acc["subsets"]["all"]["accuracy"] <= ci["hi"] and ci["n"] == 60
    assert list(acc["breakdown"]) == ["length 3", "length 4", "length 5"]
    assert sum(v["n_pairs"] for v in acc["breakdown"].values()) == 60


def _pairs_report(outcomes: list[float], path: str) -> dict:
    n = len(outcomes)
    return {
        "_path": path,
        "benchmark": "sblimp",
        "subsets": {"all": {}},
        "reduction": "mean",
        "protocol": {"stream": "moshi"},
        "items": {
            "key": [f"v/{i}" for i in range(n)],
            "group": [str(i // 2) for i in range(n)],  # two voices per group
            "subsets": ["all|agreement" if i < n // 2 else "all|island" for i in range(n)],
            "outcome_mean": outcomes,
        },
    }


def test_compare_pairs_identical_and_better():
    rng = np.random.default_rng(0)
    base = [float(x) for x in rng.random(400) < 0.6]
    c = compare_reports(_pairs_report(base, "a"), _pairs_report(base, "b"))
    assert c["subsets"]["all"]["difference"] == 0 and c["subsets"]["all"]["p_value"] == 1.0
    assert c["mcnemar"]["p_value"] == 1.0 and c["same_protocol"]
    better = [1.0 if rng.random() < 0.5 else x for x in base]  # fixes about half the errors
    c = compare_reports(_pairs_report(better, "a"), _pairs_report(base, "b"))
    s = c["subsets"]["all"]
    assert s["difference"] > 0.1 and s["lo"] > 0 and s["p_value"] < 0.01
    assert c["mcnemar"]["a_wrong_b_right"] == 0 and c["mcnemar"]["p_value"] < 1e-6
    assert set(c["subsets"]) == {"all", "agreement", "island"}
    with pytest.raises(ValueError, match="no per-pair data"):
        compare_reports({**_pairs_report(base, "a"), "items": None}, _pairs_report(base, "b"))


# -- the controls and the commands on the tiny model ---------------------------------------------
def _ttt_lm():
    lm = build_tiny_lm(0)
    torch.manual_seed(0)
    apply_ttt(
        lm, TTTConfig(layers="1,3", kind="mlp", mini_batch_size=4, chunk_size=6, gate_init=0.5)
    )
    return lm.eval()


def _codes(lm, T: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, lm.card, (17, T), generator=g)
    codes[0] = torch.randint(0, lm.text_card, (T,), generator=g)
    return codes


def test_controls_window_and_foreign_history_then_compare_and_summary(tmp_path, capsys):
    lm = _ttt_lm()
    ctx = attention_context(lm)
    files = [(f"f{i}", _codes(lm, 36, i)) for i in range(3)]
    with no_compile():
        res = evaluate_long_context(
            lm, files, chunk_frames=6, controls=("no_ttt", "window", "foreign"), window=4,
            foreign_history=ctx, bin_frames=6, progress=False, equal_lengths=[36],
        )  # fmt: skip
    assert attention_context(lm) == ctx  # the window is restored
    assert list(res.variants) == [
        "ttt", "no_ttt", "window_4", "no_ttt_window_4", f"foreign_history_{ctx}"
    ]  # fmt: skip
    full, window = res.variants["ttt"], res.variants["window_4"]
    assert not np.allclose(full.audio_sum, window.audio_sum)
    foreign = res.variants[f"foreign_history_{ctx}"]
    assert foreign.audio_count[:, :ctx].sum() == 0 and foreign.text_count[:ctx].sum() == 0
    assert sorted(foreign.file_names) == ["f0", "f1", "f2"]
    spliced = splice_history(files[1][1], files[0][1], ctx)
    assert torch.equal(spliced[:, :ctx], files[0][1][:, :ctx])
    assert torch.equal(spliced[:, ctx:], files[1][1][:, ctx:])
    summary = res.summary()
    iv = summary["intervals"]["difference"]["no_ttt"]["beyond_context"]
    assert math.isnan(iv["lo"]) and iv["note"] == "n = 3: no interval (fewer than 5 files)"
    assert "beyond_foreign_history" in summary["intervals"]["difference"][f"foreign_history_{ctx}"]

    out = tmp_path / "lc"
    report = write_long_context_report(res, out)
    md = (out / "report.md").read_text()
    assert "95 % CI" in md and "perplexity = exp(CE)" in md and "Equal-length curves" in md
    assert "= the base model" in md and "attention window 4 frames" in md
    assert (out / "eq36_loss_vs_position.png").is_file()
    data = json.loads((out / "report.json").read_text())
    assert data["result"]["per_file"]["ttt"]["names"] == ["f0", "f1", "f2"]
    assert report.data["long_context"]["perplexity"]["ttt"]["all"] == pytest.approx(
        math.exp(full.totals()[res.chosen_metric()])
    )
    eq = data["eq36_long_context"]["curves"]["ttt"]  # files of equal length: the same curve
    np.testing.assert_allclose(eq["audio_ce"], data["long_context"]["curves"]["ttt"]["audio_ce"])

    # a report compared with itself: no difference; against another variant: the gain
    assert main(["eval", "compare", str(out), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "beyond_context:" in printed and "= +0.0000 nats (n = 3: no interval)" in printed
    c = compare_reports(json.loads((out / "report.json").read_text()) | {"_path": "a"},
                        json.loads((out / "report.json").read_text()) | {"_path": "b"},
                        variant_b="no_ttt")  # fmt: skip
    expect = summary["difference"]["no_ttt"]["beyond_context"]
    assert c["parts"]["beyond_context"]["difference"] == pytest.approx(-expect)
    # moshi-finetune's loss (two terms per file) compares the same way
    m = compare_reports(json.loads((out / "report.json").read_text()) | {"_path": "a"},
                        json.loads((out / "report.json").read_text()) | {"_path": "b"},
                        variant_b="no_ttt", metric="moshi_loss")  # fmt: skip
    loss = {k: res.variants[k].totals(ctx)["moshi_loss"] for k in ("ttt", "no_ttt")}
    part = m["parts"]["beyond_context"]
    assert (part["ce_a"], part["ce_b"]) == pytest.approx((loss["ttt"], loss["no_ttt"]))
    assert part["difference"] == pytest.approx(loss["ttt"] - loss["no_ttt"])

    page = summarize([tmp_path], tmp_path / "summary")
    md = (tmp_path / "summary" / "report.md").read_text()
    assert "## Long context" in md and "no_ttt" in md and page.data["reports"]
    assert (tmp_path / "summary" / "long_context.png").is_file()
    assert main(["eval", "summary", str(tmp_path / "nowhere"), "--out", str(tmp_path / "s2")]) == 2


# -- a sum of token-weighted means: moshi-finetune's loss per file ------------------------------
def test_a_sum_of_token_weighted_means_is_bootstrapped_on_the_same_files():
    """``[terms, files]``: one term gives the 1-d result exactly; two terms give the sum of their
    ratios, resampled on the same files (a plain loop), and a term with no token counts 0."""
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 50, (2, 12)).astype(float)
    sums = counts * rng.uniform(1, 3, (2, 12))
    assert ratio_interval(sums[:1], counts[:1]) == ratio_interval(sums[0], counts[0])
    ci = ratio_interval(sums, counts, n_boot=300, seed=4)
    assert ci["mean"] == pytest.approx(sum(sums[t].sum() / counts[t].sum() for t in range(2)))
    idx = np.random.default_rng(4).integers(0, 12, size=(300, 12))
    boot = [sum(sums[t, i].sum() / counts[t, i].sum() for t in range(2)) for i in idx]
    assert (ci["lo"], ci["hi"]) == pytest.approx(tuple(np.quantile(boot, [0.025, 0.975])))
    d = ratio_difference(sums + 0.5 * counts, counts, sums, counts)  # +0.5 on each term
    assert d["difference"] == pytest.approx(1.0) and d["lo"] == pytest.approx(1.0)
    empty = np.zeros_like(counts)
    empty[0] = counts[0]
    assert ratio_interval(sums * (empty > 0), empty)["mean"] == pytest.approx(
        sums[0].sum() / counts[0].sum())  # fmt: skip
    with pytest.raises(ValueError, match=r"\[terms, files\]"):
        ratio_interval(np.zeros((2, 3, 4)), np.zeros((2, 3, 4)))


def test_moshi_loss_of_a_file_equals_the_training_loss():
    """The per-file ``moshi_loss`` of the evaluation (streamed, unweighted CE + PAD/EPAD marks)
    equals ``train.loss``'s L_text + L_audio (PAD/EPAD x0.5, codebook 0 x100) on the same codes
    through ``LMModel.forward``: the definition, on the tiny Moshi."""
    from moshi_ttt.eval.long_context import MOSHI_LOSS, binned_intervals, stream_losses
    from moshi_ttt.train.loss import compute_loss_terms

    lm = build_tiny_lm(seed=0).eval()
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 32, (17, 40), generator=g)
    codes[0] = torch.randint(0, 64, (40,), generator=g)
    codes[0, ::3], codes[0, 1::5] = 3, 0  # PAD and EPAD
    codes[9:, 30:] = -1  # the user stream ends early
    with no_compile(), torch.no_grad():
        terms = compute_loss_terms(lm(codes[None]), codes[None], first_codebook_weight=100.0,
                                   text_padding_weight=0.5)  # fmt: skip
        losses = stream_losses(lm, codes, chunk_frames=7)
    assert int(losses.text_padding.sum()) > 10
    curve = PositionLosses(lm.dep_q, block_frames=5)
    curve.add(losses, "f")
    ft = curve.file_totals(0)[MOSHI_LOSS]
    assert ft["sum"].shape == (2, 1)
    text, audio = (ft["sum"][:, 0] / ft["count"][:, 0]).tolist()
    expected = terms.metrics()
    assert text == pytest.approx(expected["text_loss"], rel=1e-5)
    assert audio == pytest.approx(expected["audio_loss"], rel=1e-5)
    assert ratio_interval(ft["sum"], ft["count"])["mean"] == pytest.approx(
        float(terms.loss()), rel=1e-5)  # fmt: skip
    # the per-position curve gives the same: its totals, one bin over the file, its band
    assert curve.totals()[MOSHI_LOSS] == pytest.approx(float(terms.loss()), rel=1e-5)
    assert curve.binned(40)[MOSHI_LOSS] == pytest.approx([float(terms.loss())], rel=1e-5)
    band = binned_intervals(curve, 40, MOSHI_LOSS)
    for k in ("lo", "hi"):  # one file: every resample is that file
        assert band[k] == pytest.approx([float(terms.loss())], rel=1e-5)
    assert band["n_files"] == [1]


def test_a_curve_with_new_text_keeps_its_audio_and_padding():
    """``with_text`` (a recall memory mixed into the text stream): the same text gives the same
    per-file totals; new text changes the text metrics only; PAD/EPAD stay marked."""
    curve = PositionLosses(block_frames=5)
    for i in range(3):
        f = _file(23, i)
        curve.add(FileLosses(f.text, f.text_mask, f.audio, f.audio_mask,
                             torch.arange(23) % 4 == 0), f"f{i}")  # fmt: skip
    same = curve.with_text(curve.file_text)
    for start in (0, 10):
        a, b = curve.file_totals(start), same.file_totals(start)
        for m in a:
            for k in ("sum", "count"):
                np.testing.assert_allclose(a[m][k], b[m][k], rtol=1e-6)
    np.testing.assert_allclose(curve.text_sum, same.text_sum, rtol=1e-6)
    halved = curve.with_text([(ce / 2, mask) for ce, mask in curve.file_text])
    a, b = curve.file_totals(0), halved.file_totals(0)
    assert b["text_ce"]["sum"] == pytest.approx(a["text_ce"]["sum"] / 2)
    for m in ("audio_ce", "cb0", "cb1_7"):
        for k in ("sum", "count"):
            assert np.array_equal(a[m][k], b[m][k]), (m, k)
    assert b["moshi_loss"]["sum"][0] == pytest.approx(a["moshi_loss"]["sum"][0] / 2)
    assert np.array_equal(a["moshi_loss"]["sum"][1], b["moshi_loss"]["sum"][1])
    # PAD/EPAD weighed 0.5: 6 of the 23 positions (0, 4, ..., 20) in each file
    assert a["moshi_loss"]["count"][0].tolist() == [23 - 0.5 * 6] * 3
    with pytest.raises(ValueError, match="positions"):
        curve.with_text([(ce[:-1], mask[:-1]) for ce, mask in curve.file_text])
    # a curve of per-position sums only (the Markov demo's oracle): every metric, no PAD
    ones = np.ones(4)
    analytic = PositionLosses.of_positions(2 * ones, ones, np.zeros((8, 4)), np.zeros((8, 4)), ones)
    assert analytic.totals()["text_ce"] == analytic.totals()["moshi_loss"] == 2.0
    with pytest.raises(ValueError, match="4 positions"):
        PositionLosses.of_positions(ones, ones[:3], np.zeros((8, 4)), np.zeros((8, 4)), ones)
