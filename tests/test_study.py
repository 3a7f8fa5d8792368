"""``moshi-ttt study``: the memory comparison on a base and data a user gives (tiny model, CPU).

The base is the one ``moshi-ttt demo --quick`` trains and exports, as a new user's first hour
goes (README); the data are generated text files and generated shards (text and audio).
"""

from __future__ import annotations

import json
import math
import os
import random
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moshi_ttt.cli.app import main
from moshi_ttt.demo.corpus import CorpusSpec, _ShardWriter, read_text_corpus, tokenizer_codes
from moshi_ttt.demo.frozen import FrozenBase, base_from_arg
from moshi_ttt.demo.study import META_ROWS, STUDY_ESSENTIAL, study_rows
from moshi_ttt.format import NUM_STREAMS
from moshi_ttt.models.codec import build_tiny_tokenizer

WORDS = ("alpha", "beta", "gamma", "delta", "memory", "window", "frame", "token", "stream")


def _text_folder(root: Path, files: int = 60, size: int = 900) -> Path:
    """``files`` text files of ``size`` bytes or more, each repeating its own phrases (so a
    memory has something to find beyond the window)."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        rng = random.Random(i)
        own = " ".join(rng.choice(WORDS) for _ in range(6)) + f" id{i}. "
        parts = []
        while sum(map(len, parts)) < size:
            parts.append(own if rng.random() < 0.3 else rng.choice(WORDS) + " ")
        (root / f"doc_{i:03d}.txt").write_text("".join(parts))
    return root


def _shards_folder(root: Path, files: int = 100, frames: int = 128, text_card: int = 260) -> Path:
    """A moshi-ttt shards directory of ``files`` sequences: text tokens of the byte range and
    16 audio rows of codes < 32 (the quick demo base's vocabulary)."""
    w = _ShardWriter(root, "generated")
    for i in range(files):
        g = torch.Generator().manual_seed(i)
        codes = torch.randint(0, 32, (NUM_STREAMS, frames), generator=g, dtype=torch.int32)
        codes[0] = torch.randint(4, text_card, (frames,), generator=g, dtype=torch.int32)
        codes[:, frames // 2 :] = codes[:, : frames - frames // 2]  # a repeat beyond the window
        w.add(codes, f"conv_{i:03d}.wav")
    w.close({"kind": "shards"})
    return root


@pytest.fixture(scope="module")
def quick_base(tmp_path_factory) -> Path:
    """The base ``moshi-ttt demo --quick`` trains and exports (window 16 frames)."""
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--rows", "base", "--no-progress", "--out", str(out)]) == 0
    return out / "base"


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> Path:
    return _text_folder(tmp_path_factory.mktemp("texts") / "docs")


def test_study_on_a_text_folder_writes_every_row_marked_quick(quick_base, texts, tmp_path,
                                                              capsys):  # fmt: skip
    out = tmp_path / "study"
    argv = ["study", "--base", str(quick_base), "--data", str(texts), "--out", str(out),
            "--quick", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "study plan" in printed and "estimate: about" in printed and "memory:" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["rows"]) == set(STUDY_ESSENTIAL)
    assert results["quick"] is True and results["study"]["base"] == str(quick_base)
    assert results["study"]["text_as"] == "bytes" and results["context_frames"] == 16
    for name, row in results["rows"].items():
        assert "--quick" in row["command"] and f"--rows {name}" in row["command"]
        if name != "base":
            assert row["vs_base_beyond"]["difference"] == pytest.approx(
                row["ce_beyond"]["mean"] - results["rows"]["base"]["ce_beyond"]["mean"], abs=1e-9
            )  # row - base: negative = the memory helps
    assert all(line.startswith("[--quick") for line in results["verdict"]["lines"])
    details = results["rows"]["e2e"]["details"]
    assert details["validation_files"] >= 2 and details["validation_sequences"] >= 2
    report = (out / "report.md").read_text()
    assert "moshi-ttt study" in report and "frozen (not trained here)" in report

    # a row's recorded command recomputes it (same numbers), reusing the cached stages
    cmd = shlex.split(results["rows"]["e2e"]["command"])
    assert cmd[1] == "study"
    assert main(cmd[1:]) == 0
    again = capsys.readouterr().out
    assert "corpus: cached" in again and "setting: cached" in again
    redone = json.loads((out / "results.json").read_text())
    assert redone["rows"]["e2e"]["ce_beyond"] == results["rows"]["e2e"]["ce_beyond"]


def test_study_on_shards_scores_text_and_skips_needles(quick_base, tmp_path, capsys):
    data = _shards_folder(tmp_path / "shards")
    out = tmp_path / "study"
    argv = ["study", "--base", str(quick_base), "--data", str(data), "--out", str(out),
            "--quick", "--no-progress", "--meta-steps", "0"]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert not set(META_ROWS) & set(results["rows"])  # --meta-steps 0: no meta-trained rows
    assert results["study"]["text_as"] == "shards" and results["corpus"]["kind"] == "shards"
    assert "needles are planted as bytes" in results["recall"]["needle_error"]


def test_an_interrupted_study_keeps_its_finished_stages(quick_base, texts, tmp_path, capsys,
                                                        monkeypatch):  # fmt: skip
    from moshi_ttt.demo import study

    out = tmp_path / "study"
    argv = ["study", "--base", str(quick_base), "--data", str(texts), "--out", str(out),
            "--quick", "--no-progress", "--rows", "e2e_meta"]  # fmt: skip

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(study, "evaluate_and_report", interrupted)
    assert main(argv) == 130  # Ctrl-C: reported, not a traceback
    monkeypatch.undo()
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "corpus: cached" in printed and "setting: cached" in printed
    assert "meta-training: cached" in printed


def test_study_dry_run_prints_the_plan_and_does_nothing(quick_base, texts, tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["study", "--base", str(quick_base), "--data", str(texts), "--out", str(out),
                 "--dry-run"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "study plan" in printed and "meta-training: 150 steps" in printed
    assert not out.exists()


def _error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1
    return err


def test_study_bad_input_gets_one_paragraph_and_exit_2(quick_base, texts, tmp_path, capsys,
                                                       monkeypatch):  # fmt: skip
    out = str(tmp_path / "o")
    empty = tmp_path / "empty"
    empty.mkdir()
    common = ["--out", out, "--quick", "--no-progress"]
    err = _error(["study", "--base", str(tmp_path / "nope"), "--data", str(texts), *common], capsys)
    assert "--base" in err and "nope" in err
    err = _error(["study", "--base", str(quick_base), "--data", str(empty), *common], capsys)
    assert f"--data {empty}" in err and "usable sequences" in err
    few = _text_folder(tmp_path / "few", files=1)
    other = _text_folder(tmp_path / "other", files=6)
    err = _error(["study", "--base", str(quick_base), "--data", str(texts), "--val", str(few),
                  "--test", str(other), *common], capsys)  # fmt: skip
    assert f"--val {few}" in err and "needs 5 files or more" in err
    err = _error(["study", "--base", str(quick_base), "--data", str(texts), "--val", str(few),
                  *common], capsys)  # fmt: skip
    assert "--val and --test go together" in err
    err = _error(["study", "--base", str(quick_base), "--data", str(texts), "--val", str(few),
                  "--test", str(texts), *common], capsys)  # fmt: skip
    assert "--test" in err and "same folder as --data" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = _error(["study", "--base", "someorg/not-cached", "--data", str(texts), *common], capsys)
    assert "someorg/not-cached" in err and "HF_HUB_OFFLINE" in err
    err = _error(["study", "--base", str(quick_base), "--data", str(texts), "--rows", "scratch",
                  *common], capsys)  # fmt: skip
    assert "--rows" in err and "scratch" in err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("x")
    err = _error(["study", "--base", str(quick_base), "--data", str(texts), "--out", str(mine),
                  "--quick"], capsys)  # fmt: skip
    assert "not a previous study" in err and (mine / "thesis.tex").read_text() == "x"


def test_study_rows_and_base_sources():
    assert "e2e_meta" not in study_rows("essential", 0)
    assert study_rows("e2e_assoc", 5) == ("base", "e2e", "e2e_assoc")
    with pytest.raises(ValueError, match="--meta-steps"):
        study_rows("e2e_meta", 0)
    assert base_from_arg("tiny:3") == FrozenBase({"source": "tiny", "dtype": "auto"}, seed=3)
    assert base_from_arg("kyutai/moshiko-pytorch-bf16").model["source"] == "hf"


def test_text_through_a_tokenizer_is_one_token_per_frame(tmp_path):
    tok = build_tiny_tokenizer(64, 0)
    folder = _text_folder(tmp_path / "docs", files=30, size=400)
    out = read_text_corpus(folder, CorpusSpec(frames=32), tmp_path / "data",
                           encode=tokenizer_codes(tok))  # fmt: skip
    assert sum(out.sequences.values()) > 0
    from moshi_ttt.data.pipeline import ShardSource

    src = ShardSource(tmp_path / "data" / "train")
    name, codes = str(src.files[0]["path"]), src.codes(0)
    ids = tok.encode((folder / name.rsplit("#", 1)[0]).read_text())
    assert codes[0].tolist() == ids[:32] and bool((codes[1:] == -1).all())


def test_study_help_runs_as_a_command():
    r = subprocess.run([sys.executable, "-m", "moshi_ttt.cli", "study", "--help"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0 and "--meta-steps" in r.stdout and "--base" in r.stdout


def test_study_on_a_moshi_finetune_index_tokenizes_it_once_and_scores_audio(quick_base, tmp_path,
                                                                           capsys):  # fmt: skip
    from moshi_ttt.data.toy import write_toy_dataset

    index = write_toy_dataset(tmp_path / "talks", [6.0] * 90)  # stereo wavs + alignments
    out = tmp_path / "study"
    argv = ["study", "--base", str(quick_base), "--data", str(index), "--out", str(out),
            "--quick", "--no-progress", "--meta-steps", "0", "--rows", "e2e,assoc"]  # fmt: skip
    assert main(argv) == 0
    assert "tokenizing" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["corpus"]["kind"] == "shards" and (out / "tokenized" / "all").is_dir()
    rows = results["rows"]
    # data with audio: the headline, and every validation choice, is moshi-finetune's loss
    assert results["metric"] == "moshi_loss" and results["settings"]["metric"] == "moshi_loss"
    assert rows["e2e"]["details"]["metric"] == "moshi_loss"
    assert "moshi_loss" in rows["assoc"]["details"]["validation"][0]
    for name in ("base", "e2e", "assoc"):  # beside it: text, all codebooks, the semantic one
        row = rows[name]
        assert row["audio_ce_beyond"]["mean"] > 0 and row["cb0_beyond"]["mean"] > 0
        assert row["text_ce_beyond"]["mean"] > 0 and math.isfinite(row["ce_beyond"]["lo"])
        assert row["ce_beyond"]["mean"] > row["cb0_beyond"]["mean"] / 2  # text + audio terms
    # the recall memory mixes into the text stream only: its audio is the base's, its moshi
    # loss moves by its text term alone
    assert rows["assoc"]["audio_ce_beyond"] == rows["base"]["audio_ce_beyond"]
    assert rows["assoc"]["vs_base_beyond_audio"]["difference"] == 0
    report = (out / "report.md").read_text()
    assert "moshi-finetune's loss" in report and "text CE >= " in report
    # no cache or retrieval row: the repeated-bytes target is not compared, not failed
    assert "repeated bytes not compared" in report and "repeated bytes nan" not in report
    assert main(argv) == 0
    assert "tokenized already" in capsys.readouterr().out


def test_meta_training_finished_outside_the_study_is_used(quick_base, texts, tmp_path, capsys,
                                                          monkeypatch):  # fmt: skip
    """Ctrl-C at the meta-training, `moshi-ttt train OUT/configs/e2e_meta.yaml` (as torchrun
    would run it), then the same study: it goes on with that run."""
    from moshi_ttt.demo import study

    out = tmp_path / "study"
    argv = ["study", "--base", str(quick_base), "--data", str(texts), "--out", str(out),
            "--quick", "--no-progress", "--rows", "e2e_meta"]  # fmt: skip

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(study, "train", stop)
    assert main(argv) == 130
    monkeypatch.undo()
    assert main(["train", str(out / "configs" / "e2e_meta.yaml"), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(argv) == 0
    assert "meta-training: cached" in capsys.readouterr().out


def test_study_reads_text_through_a_checkpoints_tokenizer(tmp_path, capsys):
    """A base in moshi's format (model.safetensors, config.json, its tokenizer) made here: its
    text is read as its tokens, one per frame, and the needles are left out, saying why."""
    from safetensors.torch import save_file

    from moshi_ttt.integration.tiny import build_tiny_lm, tiny_lm_kwargs

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    kw = tiny_lm_kwargs(context=8)
    lm = build_tiny_lm(3, context=8)
    save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, ckpt / "model.safetensors")
    (ckpt / "config.json").write_text(json.dumps({**kw, "model_type": "moshi"}))
    tok = build_tiny_tokenizer(int(kw["text_card"]), 0)
    (ckpt / "tokenizer_spm_32k_3.model").write_bytes(tok.serialized_model_proto())
    texts = _text_folder(tmp_path / "docs", files=70, size=600)
    out = tmp_path / "study"
    assert main(["study", "--base", str(ckpt), "--data", str(texts), "--out", str(out), "--quick",
                 "--no-progress", "--meta-steps", "0", "--rows", "e2e"]) == 0  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert results["study"]["text_as"] == "tokens" and results["context_frames"] == 8
    assert "read through the model's tokenizer" in results["recall"]["needle_error"]
    from moshi_ttt.data.pipeline import ShardSource

    src = ShardSource(out / "data" / "train")
    path, codes = str(src.files[0]["path"]), src.codes(0)
    ids = tok.encode((texts / path.rsplit("#", 1)[0]).read_text())
    k = int(path.rsplit("#", 1)[1]) * codes.shape[1]
    assert codes[0].tolist() == ids[k : k + codes.shape[1]]


def _torchrun_study(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
           "-m", "moshi_ttt.cli", "study", *args, "--quick", "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_TORCH_COMPILE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_a_study_under_torchrun_meta_trains_on_every_rank_and_reports_on_rank_0(
    quick_base, texts, tmp_path
):
    """One command on 2 processes: rank 0 runs the study, rank 1 waits and joins the
    meta-training (both in one process group), rank 0 evaluates. Rerun: the cached run, rank 1
    is told there is nothing to train. A rank-0 error stops the study with its message."""
    out = tmp_path / "study"
    args = ["--base", str(quick_base), "--data", str(texts), "--out", str(out), "--rows",
            "e2e_meta", "--meta-steps", "2"]  # fmt: skip
    first = _torchrun_study(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "rank 1: meta-training done; rank 0 evaluates" in first.stdout
    assert first.stdout.count("study plan") == 1  # rank 0 alone plans and reports
    (log,) = out.glob("runs/*/train.log")
    assert "2 process(es)" in log.read_text()
    results = json.loads((out / "results.json").read_text())
    assert results["rows"]["e2e_meta"]["ce_beyond"]["mean"] > 0
    again = _torchrun_study(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "meta-training: cached" in again.stdout and "rank 1: meta-training" not in again.stdout
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {k: r["ce_beyond"] for k, r in rows.items()} == {
        k: r["ce_beyond"] for k, r in results["rows"].items()}  # fmt: skip
    few = _text_folder(tmp_path / "few", files=3)
    bad = _torchrun_study("--base", str(quick_base), "--data", str(few), "--out",
                          str(tmp_path / "bad"))  # fmt: skip
    assert bad.returncode != 0  # rank 1 is not left waiting (torchrun also stops it)
    assert f"moshi-ttt study: error: --data {few}" in bad.stderr, bad.stderr[-3000:]
    assert "exitcode  : 2" in bad.stderr and "[rank0]: Traceback" not in bad.stderr


def test_a_waiting_rank_reads_only_this_launchs_message_and_stops_on_rank_0s_error(
    tmp_path, monkeypatch
):
    """``_Handoff``: a file left by an earlier launch is not this one's message; rank 0's error
    stops the other ranks with it (launchers that do not stop them: srun, mpirun)."""
    import threading

    from moshi_ttt.demo import study

    monkeypatch.setenv("MASTER_PORT", "1111")
    study._Handoff(tmp_path).tell(config=None)  # an earlier launch
    monkeypatch.setenv("MASTER_PORT", "2222")
    late = threading.Timer(0.3, lambda: study._Handoff(tmp_path).tell(error="no usable file"))
    late.start()
    with pytest.raises(ValueError, match="rank 0 stopped the study: no usable file"):
        study._follow(FrozenBase({"source": "tiny"}), tmp_path, 1, [])
    late.join()
