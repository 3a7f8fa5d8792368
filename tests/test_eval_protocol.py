"""Protocol choices of the pair benchmarks (issue 14, point 4): text fills (zero, pad, greedy =
Inner Monologue), scored streams (audio, text+audio), and ``--protocol-sweep``, on the tiny
model with synthetic sBLIMP pairs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_eval_pairs import FrameCodec, _run, make_syntactic

from moshi_ttt.eval.likelihood import (
    ScoringConfig,
    build_codes,
    greedy_text,
    loglik_batch,
)
from moshi_ttt.eval.pair_report import protocol_grid
from moshi_ttt.integration.tiny import build_tiny_lm


@pytest.fixture(scope="module")
def tiny():
    from moshi_ttt.integration import TTTConfig, apply_ttt

    lm = build_tiny_lm(0)
    apply_ttt(lm, TTTConfig())
    return lm.eval()


def _items(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # longer than the tiny model's 12-frame attention context, and of different lengths
    return [torch.randint(0, 32, (8, 20), generator=g), torch.randint(0, 32, (8, 13), generator=g)]


def _step_by_step_greedy(lm, item: torch.Tensor) -> torch.Tensor:
    """Reference Inner Monologue: for each frame t, one plain teacher-forced forward over frames
    0..t with the text chosen so far, the argmax of the text logits at t appended."""
    text = torch.full((item.shape[-1],), -1, dtype=torch.long)
    for t in range(item.shape[-1]):
        codes = build_codes(lm, [item[:, : t + 1]], ScoringConfig())
        codes[0, 0, :t] = text[:t]
        text[t] = lm(codes).text_logits[0, 0, t].argmax()
    return text


def test_text_fills_give_the_expected_text_input(tiny):
    lm, items = tiny, _items()
    zero = build_codes(lm, items, ScoringConfig(text="zero"))
    assert (zero[:, 0] == -1).all()
    pad = build_codes(lm, items, ScoringConfig(text="pad"))
    assert (pad[0, 0] == 3).all() and (pad[1, 0, :13] == 3).all() and (pad[1, 0, 13:] == -1).all()
    greedy = greedy_text(lm, items, ScoringConfig(text="greedy"))
    assert [g.shape[-1] for g in greedy] == [20, 13]
    for item, g in zip(items, greedy):  # batched streaming pass == step-by-step reference
        assert torch.equal(g, _step_by_step_greedy(lm, item))
    assert len({int(t) for g in greedy for t in g}) > 1  # not a constant: a real check
    codes = build_codes(lm, items, ScoringConfig(text="greedy"), texts=greedy)
    assert torch.equal(codes[0, 0], greedy[0]) and torch.equal(codes[1, 0, :13], greedy[1])
    assert (codes[1, 0, 13:] == -1).all()
    assert torch.equal(codes[:, 1:], zero[:, 1:])  # the audio is placed the same way
    with pytest.raises(ValueError, match="greedy"):
        build_codes(lm, items, ScoringConfig(text="greedy"))


def test_text_log_likelihood_per_fill(tiny):
    lm, items = tiny, _items(1)
    zero = loglik_batch(lm, items, ScoringConfig(text="zero"))
    assert list(zero["text_n"]) == [0, 0] and list(zero["text_ll"]) == [0, 0]
    pad = loglik_batch(lm, items, ScoringConfig(text="pad"))
    assert list(pad["text_n"]) == [20, 13] and np.all(pad["text_ll"] < 0)
    greedy = loglik_batch(lm, items, ScoringConfig(text="greedy", score="text+audio"))
    assert list(greedy["text_n"]) == [20, 13]
    # the greedy tokens are the argmax of the teacher-forced text logits too: their log p is
    # the max log p of each frame, so no text can be more likely frame by frame
    codes = build_codes(lm, items, ScoringConfig(text="greedy"), texts=greedy["texts"])
    with torch.no_grad():
        logp = F.log_softmax(lm(codes).text_logits[:, 0].float(), -1).max(-1).values
    best = [float(logp[0].sum()), float(logp[1, :13].sum())]
    np.testing.assert_allclose(greedy["text_ll"], best, rtol=1e-5)
    assert np.all(greedy["text_ll"] >= pad["text_ll"] - 1e-6)
    # the audio scores depend on the text fill (the text is an input)
    assert not np.allclose(greedy["ll"], zero["ll"])


def test_invalid_combination_is_refused(tmp_path):
    with pytest.raises(ValueError, match="text fill 'zero'"):
        ScoringConfig(text="zero", score="text+audio")
    with pytest.raises(ValueError, match="score: expected one of"):
        ScoringConfig(text="pad", score="text")
    with pytest.raises(ValueError, match="text fill 'zero'"):  # before loading any model
        _run(["sblimp", str(tmp_path), "--tiny", "--out", str(tmp_path / "o"), "--score",
              "text+audio"])  # fmt: skip
    grid = protocol_grid(ScoringConfig(), "mean", 8)
    assert not [r for r in grid if r["text"] == "zero" and r["score"] == "text+audio"]
    assert len(grid) == 20 and len({r["label"] for r in grid}) == 20
    assert [r["label"] for r in grid if r["reference"]] == ["text zero, cb 0, mean, audio"]
    # a codebook set outside the standard ones joins the grid
    assert len(protocol_grid(ScoringConfig(codebooks=(0, 1)), "sum", 8)) == 30


def test_protocol_sweep_table_and_reference_row(tmp_path, monkeypatch):
    monkeypatch.setattr(  # codes that follow the audio: pairs do not all tie
        "moshi_ttt.models.load.load_codec", lambda model, device: (FrameCodec(), None)
    )
    data_dir = tmp_path / "zr"
    make_syntactic(data_dir)
    common = [str(data_dir), "--tiny", "--no-progress", "--device", "cpu"]

    def run(*argv: str) -> dict:
        torch.manual_seed(0)  # the --tiny model's TTT layers draw from the global RNG
        return _run(["sblimp", *common, *argv])

    plain = run("--out", str(tmp_path / "plain"))
    out = tmp_path / "sweep"
    data = run("--out", str(out), "--protocol-sweep")
    sweep = json.loads((out / "report.json").read_text())["sweep"]
    rows = sweep["rows"]
    assert len(rows) == len(protocol_grid(ScoringConfig(), "mean", 8)) == 20
    assert {(r["text"], r["score"]) for r in rows} == {
        ("zero", "audio"),
        ("pad", "audio"),
        ("pad", "text+audio"),
        ("greedy", "audio"),
        ("greedy", "text+audio"),
    }
    (ref,) = [r for r in rows if r["reference"]]
    assert (ref["text"], ref["codebooks"], ref["reduction"], ref["score"]) == (
        "zero",
        [0],
        "mean",
        "audio",
    )
    assert ref["accuracy"] == plain["accuracy"] == data["accuracy"] and ref["delta"] == 0
    accs = [r["accuracy"] for r in rows]
    assert sweep["spread"] == pytest.approx(max(accs) - min(accs))
    for r in rows:
        assert r["delta"] == pytest.approx(r["accuracy"] - ref["accuracy"])
        assert r["n_pairs"] == 8 and 0 <= r["accuracy"] <= 1
        assert {"lo", "hi"} <= set(r["interval"]) and set(r["subsets"]) >= {"all", "agreement"}
    assert set(sweep["wall_s"]) == {"pad", "greedy"}  # the run's own fill is reused
    assert sweep["greedy_text"]["tokens"] > 0
    md = (out / "report.md").read_text()
    assert "## Protocol sweep" in md and "zero (this run)" in md and "Spread" in md
    # a sweep row equals a plain run under that protocol (greedy, text+audio, all, sum)
    other = run(
        "--out", str(tmp_path / "im"), "--text-fill", "greedy", "--score", "text+audio",
        "--codebooks", "0-7", "--reduction", "sum",
    )  # fmt: skip
    (row,) = [
        r
        for r in rows
        if (r["text"], r["score"], r["codebooks"], r["reduction"])
        == ("greedy", "text+audio", list(range(8)), "sum")
    ]
    assert row["accuracy"] == other["accuracy"]
    assert other["protocol"]["text"] == "greedy" and other["protocol"]["score"] == "text+audio"
    assert "greedy_text" in other
    md = (tmp_path / "im" / "report.md").read_text()
    assert "text fill greedy" in md and "Inner Monologue" in md
