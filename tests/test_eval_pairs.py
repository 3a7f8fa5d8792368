"""Pairwise benchmarks (sWUGGY, sBLIMP, StoryCloze): layouts, pairing by id, ties, bad files,
batch-independent scores and the CLI reports, on the tiny model with synthetic 16 kHz audio."""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import sphn
import torch

from moshi_ttt.cli.eval_pairs import add_pair_parsers
from moshi_ttt.eval.likelihood import (
    Score,
    ScoringConfig,
    build_codes,
    parse_codebooks,
    score_audio,
)
from moshi_ttt.eval.pairs import (
    pair_accuracy,
    read_storycloze,
    read_zerospeech_lexical,
    read_zerospeech_syntactic,
)
from moshi_ttt.integration.tiny import build_tiny_lm
from moshi_ttt.models.codec import build_tiny_mimi

SR = 16000


def write_wav(path: Path, seconds: float, seed: int, kind: str = "sine") -> Path:
    """A mono 16 kHz wav: a sine (frequency from ``seed``) or white noise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = int(seconds * SR)
    if kind == "sine":
        x = 0.3 * np.sin(2 * np.pi * (150 + 40 * seed) * np.arange(n) / SR)
    else:
        x = 0.1 * np.random.default_rng(seed).standard_normal(n)
    sphn.write_wav(str(path), x.astype(np.float32), SR)
    return path


def write_gold(path: Path, rows: list[dict], seed: int = 0) -> None:
    rows = rows[:]
    random.Random(seed).shuffle(rows)  # pairing must not depend on the row order
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def make_lexical(root: Path, ids=("1", "2", "3"), voices=("Alex", "Bea")) -> Path:
    """ZeroSpeech ``lexical/dev``: word (sine) and non-word (noise) per (voice, id)."""
    split = root / "lexical" / "dev"
    freqs = {"1": "0", "2": "3", "3": "150", "4": "7", "5": "2", "6": "1"}
    rows = []
    for i, id_ in enumerate(ids):
        for v, voice in enumerate(voices):
            for correct in (1, 0):
                name = f"f{id_}{voice[0]}{correct}"  # ids random-looking in the real set
                rows.append(
                    {
                        "filename": name,
                        "word": f"w{id_}" if correct else "",
                        "phones": "b r ih k",
                        "length": "4",
                        "frequency": freqs[id_] if correct else "0",
                        "voice": voice,
                        "id": id_,
                        "correct": correct,
                    }
                )
                kind = "sine" if correct else "noise"
                write_wav(split / f"{name}.wav", 0.3 + 0.1 * v, 10 * i + v, kind)
    write_gold(split / "gold.csv", rows)
    return split


def make_syntactic(root: Path) -> Path:
    split = root / "syntactic" / "dev"
    rows = []
    n = 0
    for type_, sub in (("agreement", "a1"), ("island", "i1")):
        for id_ in ("0", "1"):
            for voice in ("Alex", "Bea"):
                for correct in (1, 0):
                    name = f"s{n:03d}"
                    n += 1
                    rows.append(
                        {
                            "filename": name,
                            "type": type_,
                            "subtype": sub,
                            "transcription": "dogs eat meat",
                            "voice": voice,
                            "id": id_,
                            "correct": correct,
                        }
                    )
                    write_wav(split / f"{name}.wav", 0.4, n, "sine" if correct else "noise")
    write_gold(split / "gold.csv", rows, seed=1)
    return split


def make_storycloze(root: Path) -> Path:
    for sub, k in (("sSC", 0), ("tSC", 3)):
        for n in range(3):
            stem = f"{n}_{k + n:04x}aa-uuid"
            write_wav(root / sub / f"{stem}_correct.wav", 0.5, k + n, "sine")
            write_wav(root / sub / f"{stem}_incorrect.wav", 0.6, k + n, "noise")
    return root


class FrameCodec(torch.nn.Module):
    """A stand-in for Mimi whose codes follow the audio: per 80 ms frame (1920 samples at
    24 kHz), codebook k codes the frame's level and zero-crossing rate. (The tiny random Mimi
    gives almost the same codes for any audio, which would make every pair a tie.)"""

    sample_rate, frame_size = 24000, 1920

    def __init__(self, card: int = 32) -> None:
        super().__init__()
        self.card = card
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # a device for the caller

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        frames = -(-x.shape[-1] // self.frame_size)
        x = torch.nn.functional.pad(x, (0, frames * self.frame_size - x.shape[-1]))
        x = x.view(x.shape[0], frames, self.frame_size)
        level = (x.abs().mean(-1) * 300).long()
        crossings = ((x[..., 1:] * x[..., :-1]) < 0).sum(-1)
        k = torch.arange(8)[None, :, None]
        return (level[:, None] * (k + 1) + crossings[:, None] // 4 * (k + 3)) % self.card


@pytest.fixture(scope="module")
def tiny():
    from moshi_ttt.integration import TTTConfig, apply_ttt

    lm = build_tiny_lm(0)
    apply_ttt(lm, TTTConfig())
    return lm.eval(), FrameCodec(lm.card)


def _run(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser()
    add_pair_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


# -- layouts and pairing ----------------------------------------------------------------------
def test_lexical_pairs_by_voice_and_id_with_shuffled_csv(tmp_path):
    split = make_lexical(tmp_path)
    for data in (tmp_path, tmp_path / "lexical", split):  # root, part or split directory
        pairs = read_zerospeech_lexical(data)
        assert len(pairs.pairs) == 6 and not pairs.problems
    for pair in pairs.pairs:
        voice, id_ = pair.key.split("/")
        assert pair.positive.name == f"f{id_}{voice[0]}1.wav"
        assert pair.negative.name == f"f{id_}{voice[0]}0.wav"
        assert pair.group == id_
    by_id = {p.group: p.subsets for p in pairs.pairs}
    assert by_id["1"] == ("all", "oov")
    assert by_id["2"] == ("all", "in-vocab", "1-5")
    assert by_id["3"] == ("all", "in-vocab", ">100")


def test_syntactic_pairs_and_unpaired_rows(tmp_path):
    split = make_syntactic(tmp_path)
    with open(split / "gold.csv", "a", newline="") as f:  # a lone row: unpaired, not fatal
        f.write("s999,agreement,a1,x,Alex,7,1\n")
    pairs = read_zerospeech_syntactic(tmp_path)
    assert len(pairs.pairs) == 8 and pairs.subsets == ["all", "agreement", "island"]
    assert len(pairs.problems) == 1 and "s999" in pairs.problems[0]
    with open(split / "gold.csv") as f:
        rows = {r["filename"]: r for r in csv.DictReader(f)}
    for pair in pairs.pairs:
        pos, neg = rows[pair.positive.stem], rows[pair.negative.stem]
        assert (pos["correct"], neg["correct"]) == ("1", "0")
        for col in ("voice", "type", "subtype", "id"):
            assert pos[col] == neg[col]


def test_storycloze_subsets_by_directory(tmp_path):
    make_storycloze(tmp_path)
    (tmp_path / "sSC" / "9_lonely_correct.wav").write_bytes(b"")
    pairs = read_storycloze(tmp_path)
    assert len(pairs.pairs) == 6 and pairs.subsets == ["all", "sSC", "tSC"]
    assert len(pairs.problems) == 1 and "9_lonely" in pairs.problems[0]
    for pair in pairs.pairs:
        assert pair.positive.name.replace("_correct", "_incorrect") == pair.negative.name
    assert read_storycloze(tmp_path / "tSC").subsets == ["all"]


def test_user_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_zerospeech_lexical(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="gold.csv"):
        read_zerospeech_lexical(tmp_path)
    gold = tmp_path / "gold.csv"
    gold.write_text("")
    with pytest.raises(ValueError, match=f"{gold}: empty"):
        read_zerospeech_lexical(tmp_path)
    gold.write_text("filename,voice,id,correct\n")
    with pytest.raises(ValueError, match="no rows"):
        read_zerospeech_lexical(tmp_path)
    gold.write_text("filename,word,voice\na,b,c\n")  # a sBLIMP/other layout
    with pytest.raises(ValueError, match="missing column.*id, correct"):
        read_zerospeech_lexical(tmp_path)
    with pytest.raises(FileNotFoundError, match="_correct.wav"):
        read_storycloze(tmp_path)
    with pytest.raises(ValueError, match="codebooks"):
        parse_codebooks("0-9")


# -- accuracy ---------------------------------------------------------------------------------
def _score(v: float, n: int = 4) -> Score:
    return Score(n, np.array([v * n] + [0.0] * 7), np.array([n] + [0] * 7))


def test_ties_count_half_and_voices_average_per_id(tmp_path):
    pairs = read_zerospeech_lexical(make_lexical(tmp_path))
    by_key = {p.key: p for p in pairs.pairs}
    values = {  # (positive, negative) mean log-likelihoods
        "Alex/1": (-1.0, -2.0),
        "Bea/1": (-2.0, -1.0),  # id 1: 0.5 (oov)
        "Alex/2": (-1.0, -1.0),
        "Bea/2": (-1.0, -1.0),  # id 2: ties, 0.5
        "Alex/3": (-1.0, -3.0),
        "Bea/3": (-1.0, -3.0),  # id 3: 1.0
    }
    scores = {}
    for key, (vp, vn) in values.items():
        scores[str(by_key[key].positive)] = _score(vp)
        scores[str(by_key[key].negative)] = _score(vn)
    acc = pair_accuracy(pairs.pairs, scores, "mean", (0,), pairs.subsets)
    assert acc["outcomes"]["Alex/2"] == 0.5
    assert acc["subsets"]["all"] == {"accuracy": pytest.approx(2 / 3), "n_pairs": 6, "n_groups": 3}
    assert acc["subsets"]["in-vocab"]["accuracy"] == pytest.approx(0.75)
    assert acc["subsets"]["oov"]["accuracy"] == 0.5
    del scores[str(by_key["Bea/3"].negative)]  # a bad file drops its pair only
    scores[str(by_key["Alex/3"].negative)] = Score(0, np.zeros(8), np.zeros(8, dtype=int))
    acc = pair_accuracy(pairs.pairs, scores, "mean", (0,))
    assert acc["dropped_pairs"] == 2 and acc["subsets"]["all"]["n_groups"] == 2
    assert acc["subsets"]["all"]["accuracy"] == 0.5


# -- scoring ----------------------------------------------------------------------------------
def test_scores_do_not_depend_on_batching_and_bad_files_are_counted(tmp_path, tiny):
    lm, mimi = tiny
    paths = [write_wav(tmp_path / f"{i}.wav", 0.2 + 0.15 * i, i, "noise") for i in range(4)]
    bad = [tmp_path / "missing.wav", tmp_path / "short.wav", tmp_path / "broken.flac"]
    write_wav(bad[1], 0.05, 0)
    bad[2].write_bytes(b"fLaC not really")
    config = ScoringConfig(codebooks=tuple(range(8)))
    one, bad1 = score_audio(lm, mimi, paths + bad, config, batch_size=1, progress=False)
    many, _ = score_audio(lm, mimi, paths, config, batch_size=4, progress=False)
    assert set(bad1) == {str(p) for p in bad}
    assert bad1[str(bad[0])] == "missing" and "shorter than one frame" in bad1[str(bad[1])]
    assert bad1[str(bad[2])].startswith("unreadable")
    for p in paths:
        a, b = one[str(p)], many[str(p)]
        samples_16k = len(sphn.read(str(p))[0][0])
        assert a.frames == math.ceil(samples_16k * 1.5 / 1920)
        assert list(a.n) == [a.frames] + [a.frames - 1] * 7  # acoustic: 1-frame delay
        np.testing.assert_allclose(a.ll, b.ll, rtol=1e-5, atol=1e-5)
        assert np.all(a.ll < 0)
    assert len({round(s.value("mean", (0,)), 6) for s in one.values()}) == len(paths)
    # the tiny random Mimi (the --tiny codec) encodes too: codes [8, T] in [0, card)
    mimi = build_tiny_mimi(0, card=lm.card)
    scores, _ = score_audio(lm, mimi, paths[:2], config, batch_size=2, progress=False)
    assert [s.frames for s in scores.values()] == [one[str(p)].frames for p in paths[:2]]


def test_stream_and_fill_options(tmp_path, tiny):
    lm, mimi = tiny
    item = torch.randint(0, 32, (8, 5))
    silence = lambda t: torch.full((8, t), 7)  # noqa: E731
    codes = build_codes(
        lm, [item, item[:, :3]], ScoringConfig(other_stream="silence", text="pad"), silence
    )
    assert torch.equal(codes[0, 1:9], item) and (codes[0, 9:] == 7).all()
    assert (codes[0, 0] == 3).all()
    assert (codes[1, :, 3:] == -1).all()
    with pytest.raises(ValueError, match="dep_q"):
        score_audio(lm, mimi, [], ScoringConfig(stream="user"), progress=False)
    lm16 = build_tiny_lm(0, dep_q=16)  # a model that also predicts the user stream
    path = write_wav(tmp_path / "a.wav", 0.4, 1)
    scores, _ = score_audio(lm16, mimi, [path], ScoringConfig(stream="user"), progress=False)
    assert scores[str(path)].n[0] == 5 and math.isfinite(scores[str(path)].value("mean", (0,)))


# -- CLI --------------------------------------------------------------------------------------
def test_cli_swuggy_report_with_bad_files(tmp_path):
    split = make_lexical(tmp_path / "zr", ids=("1", "2", "3", "4", "5", "6"))
    (split / "f4A1.wav").unlink()  # listed in gold.csv, absent
    (split / "f5A0.wav").write_bytes(b"RIFF garbage")  # unreadable
    write_wav(split / "f6B1.wav", 0.05, 3)  # shorter than one frame
    out = tmp_path / "out"
    data = _run(
        [
            "swuggy",
            str(tmp_path / "zr"),
            "--tiny",
            "--out",
            str(out),
            "--no-progress",
            "--batch-size",
            "5",
            "--device",
            "cpu",
        ]
    )
    saved = json.loads((out / "report.json").read_text())
    assert saved["accuracy"] == pytest.approx(data["accuracy"]) and 0 <= saved["accuracy"] <= 1
    assert saved["n_pairs"] == 9 and saved["n_groups"] == 6 and saved["dropped_pairs"] == 3
    assert saved["n_bad_files"] == 3 and saved["bad_files"][str(split / "f4A1.wav")] == "missing"
    assert set(saved["subsets"]) >= {"all", "in-vocab", "oov"}
    assert set(saved["accuracy_by_reduction"]) == {"mean", "sum"}
    assert saved["protocol"]["codebooks"] == [0] and saved["protocol"]["stream"] == "moshi"
    md = (out / "report.md").read_text()
    assert "## Protocol" in md and "f5A0.wav" in md and "in-vocab" in md
    assert (out / "accuracy.png").stat().st_size > 0 and (out / "scores.csv").is_file()


def test_cli_sblimp_and_storycloze(tmp_path, monkeypatch):
    make_syntactic(tmp_path / "zr")
    out = tmp_path / "sb"
    data = _run(
        [
            "sblimp",
            str(tmp_path / "zr"),
            "--tiny",
            "--out",
            str(out),
            "--no-progress",
            "--codebooks",
            "all",
            "--other-stream",
            "silence",
            "--text",
            "pad",
            "--reduction",
            "sum",
            "--max-items",
            "4",
        ]
    )
    assert data["accuracy"] == data["accuracy_by_reduction"]["sum"]
    assert data["n_pairs"] == 4 and data["n_groups"] == 2 and data["n_bad_files"] == 0
    assert json.loads((out / "report.json").read_text())["protocol"]["codebooks"] == list(range(8))

    # codes that follow the audio, so that only identical audio ties
    monkeypatch.setattr(
        "moshi_ttt.models.load.load_codec", lambda model, device: (FrameCodec(), None)
    )
    root = make_storycloze(tmp_path / "sc")
    # a tie: identical audio on both sides
    same = root / "sSC" / "7_same_correct.wav"
    write_wav(same, 0.5, 2)
    same.with_name("7_same_incorrect.wav").write_bytes(same.read_bytes())
    out = tmp_path / "sc_out"
    data = _run(
        ["storycloze", str(root), "--tiny", "--out", str(out), "--no-progress", "--batch-size", "1"]
    )
    assert data["n_pairs"] == 7 and set(data["subsets"]) == {"all", "sSC", "tSC"}
    assert data["subsets"]["sSC"]["n_pairs"] == 4
    assert data["n_ties"] == {"mean": 1, "sum": 1}
    assert data["provenance"]["label"] == "tiny:0 (no weights file)"
    assert "- provenance: tiny:0 (no weights file)" in (out / "report.md").read_text()
    with pytest.raises(FileNotFoundError, match="nowhere"):
        _run(["storycloze", str(tmp_path / "nowhere"), "--tiny", "--out", str(out)])
