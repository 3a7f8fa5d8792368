"""Bad inputs and faults, each built here: refused with one clear line (exit 2), no pickle ever
runs, nothing a user made is replaced, skipped data is counted exactly and listed."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sphn
import torch
from moshi.utils.compile import no_compile
from safetensors.torch import save_file

from moshi_ttt.cli import main
from moshi_ttt.data.files import BadFile, DataError, ToyEncoder, ToyTokenizer, read_alignments
from moshi_ttt.data.pipeline import WindowLoader, open_source
from moshi_ttt.data.toy import write_toy_dataset
from moshi_ttt.integration.tiny import tiny_lm_kwargs
from moshi_ttt.models.files import no_pickle_loads
from moshi_ttt.models.load import load_base_lm
from moshi_ttt.train.config import TrainConfig

TTT = {"layers": "1", "kind": "linear", "mini_batch_size": 4}


def one_error(capsys, *names: str) -> str:
    """The stderr of a refused command: one line, no traceback, naming ``names``."""
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err and "error:" in err, err
    for name in names:
        assert str(name) in err, (name, err)
    return err


def wav(path: Path, seconds: float = 1.0, value: float | None = None) -> str:
    """A mono 24 kHz sine; with ``value``, a 32-bit float wav holding that sample (NaN/Inf)."""
    x = 0.3 * np.sin(np.arange(int(seconds * 24000)) / 10.0).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    if value is None:
        sphn.write_wav(str(path), x, 24000)
        return str(path)
    x[100] = value
    data = x.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, 24000, 24000 * 4, 4, 32)  # IEEE float, mono
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data"
    path.write_bytes(b"RIFF" + struct.pack("<I", 4 + 24 + 8 + len(data)) + body
                     + struct.pack("<I", len(data)) + data)  # fmt: skip
    return str(path)


# -- 1. pickles are refused unexecuted on every loading path --------------------------------
class Evil:
    """Unpickling it creates ``marker`` (a pickle's code running)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def evil_file(path: Path, marker: Path) -> Path:
    torch.save(Evil(marker), path)
    return path


def test_the_test_pickle_runs_code_when_unpickled(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    torch.load(evil_file(tmp_path / "x.pt", marker))  # what moshi's .pt branch would do
    assert marker.exists()
    marker.unlink()
    with no_pickle_loads(), pytest.raises(ValueError, match="refusing to unpickle"):
        torch.load(tmp_path / "x.pt")
    assert not marker.exists()


def base_dir(root: Path, marker: Path, kind: str) -> Path:
    """A local base whose ``kind`` file is a pickle (or a pickle named .safetensors)."""
    root.mkdir(parents=True)
    config = dict(tiny_lm_kwargs())
    save_file({"x": torch.zeros(1)}, root / "model.safetensors")
    if kind == "moshi_pt":
        config["moshi_name"] = evil_file(root / "model.pt", marker).name
    elif kind == "moshi_disguised":
        evil_file(root / "model.safetensors", marker)
    elif kind == "mimi_pt":
        config["mimi_name"] = evil_file(root / "mimi.pt", marker).name
    elif kind == "lora_pt":
        config["lora_name"] = evil_file(root / "lora.pt", marker).name
    (root / "config.json").write_text(json.dumps(config))
    return root


@pytest.mark.parametrize("env", ["1", None])
@pytest.mark.parametrize("kind", ["moshi_pt", "moshi_disguised", "mimi_pt", "lora_pt"])
def test_pickle_weights_in_a_base_are_refused_unexecuted(tmp_path, monkeypatch, capsys, kind, env):
    if env:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", env)
    marker = tmp_path / "pwned"
    base = base_dir(tmp_path / "base", marker, kind)
    with pytest.raises(ValueError, match="safetensors"):
        load_base_lm(base, dtype=torch.float32)
    inp = wav(tmp_path / "in.wav")
    commands = [
        ["generate", "--base", str(base), "--input", inp, "--output", str(tmp_path / "o.wav")],
        ["eval", "long-context", inp, "--base", str(base), "--out", str(tmp_path / "ev")],
        ["tokenize", str(write_toy_dataset(tmp_path / "d", [1.0])), str(tmp_path / "sh"),
         "--base", str(base)],
    ]  # fmt: skip
    if kind != "mimi_pt":  # tokenize needs only Mimi: the LM's files are not its concern
        for argv in commands:
            assert main(argv) == 2, argv
            one_error(capsys, "safetensors")
    else:
        assert main(commands[0]) == 2
        one_error(capsys, "mimi.pt")
    assert not marker.exists()


def tiny_run(root: Path, data: Path, **top) -> Path:
    """A 2-step tiny run with a checkpoint per step; returns its config YAML."""
    cfg = {
        "run_dir": str(root / "run"), "max_steps": 2, "duration_sec": 0.64, "batch_size": 1,
        "ckpt_every": 1, "keep_last": 3, "ttt": TTT, "lora": {"enable": True, "rank": 2},
        "model": {"gradient_checkpointing": False, "tiny_overrides": {"num_layers": 2}},
        "data": {"train": [str(data)], "num_workers": 0}, **top,
    }  # fmt: skip
    path = root / "cfg.yaml"
    TrainConfig.from_dict(cfg).to_yaml(path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """``(config yaml, run dir)`` of a finished 2-step run (copy it before changing it)."""
    root = tmp_path_factory.mktemp("trained")
    data = write_toy_dataset(root / "data", [1.28, 1.28])
    cfg = tiny_run(root, data)
    with no_compile():
        assert main(["train", str(cfg), "--no-progress"]) == 0
    return cfg, root / "run"


def copy_run(trained, tmp_path: Path) -> tuple[Path, Path]:
    cfg, run = trained
    new_run = tmp_path / "run"
    shutil.copytree(run, new_run)
    data = TrainConfig.load(cfg).data.train[0]
    return tiny_run(tmp_path, Path(data)), new_run


@pytest.mark.parametrize("env", ["1", None])
def test_pickles_in_adapters_checkpoints_and_shards_are_refused(
    trained, tmp_path, monkeypatch, capsys, env
):
    if env:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", env)
    marker = tmp_path / "pwned"
    cfg, run = copy_run(trained, tmp_path)
    step2 = run / "checkpoints" / "step_000002"
    # an adapter whose weights are a pickle (checksum updated to match)
    adapter = tmp_path / "adapter"
    shutil.copytree(step2, adapter)
    evil_file(adapter / "adapter.safetensors", marker)
    meta = json.loads((adapter / "adapter.json").read_text())
    import hashlib

    meta["sha256"] = hashlib.sha256((adapter / "adapter.safetensors").read_bytes()).hexdigest()
    (adapter / "adapter.json").write_text(json.dumps(meta))
    inp = wav(tmp_path / "in.wav")
    out = ["--input", inp, "--output", str(tmp_path / "o.wav")]
    assert main(["generate", "--adapter", str(adapter), *out]) == 2
    one_error(capsys, "adapter.safetensors")
    # a checkpoint whose trainable / optimizer state is a pickle
    evil_file(step2 / "optimizer.safetensors", marker)
    assert main(["train", str(cfg), "--resume", "--no-progress"]) == 2
    one_error(capsys, "optimizer.safetensors", "step_000001")
    evil_file(step2 / "trainable.safetensors", marker)
    assert main(["generate", "--run", str(step2), *out]) == 2
    one_error(capsys, "trainable.safetensors")
    assert main(["export", str(run), "--out", str(tmp_path / "exp")]) == 2
    one_error(capsys, "trainable.safetensors")
    # shards: a listed .pt shard and a pickle named .safetensors are skipped, never unpickled
    shards = tmp_path / "shards"
    shards.mkdir()
    evil_file(shards / "000000.pt", marker)
    evil_file(shards / "000001.safetensors", marker)
    files = [{"shard": "000000.pt", "frames": 5}, {"shard": "000001.safetensors", "frames": 5}]
    (shards / "shards.json").write_text(json.dumps({"files": files}))
    loader = WindowLoader(open_source(shards), frames=4, batch_size=1, loop=False)
    assert list(loader) == [] and loader.stats.bad["unreadable"] == 2
    assert not marker.exists()


# -- 2. bad-data accounting -------------------------------------------------------------------
@pytest.mark.parametrize("bad_first", [True, False])
def test_bad_fraction_is_exact_whatever_the_order(tmp_path, bad_first):
    bad = {f"b{i}": "empty" for i in range(11)}
    index = write_toy_dataset(tmp_path, [1.0, 1.0], bad=bad)
    lines = index.read_text().splitlines()
    index.write_text("\n".join(lines[2:] + lines[:2] if bad_first else lines) + "\n")
    src = open_source(index, ToyEncoder(), ToyTokenizer())
    loader = WindowLoader(src, frames=4, batch_size=1, shuffle=False, max_bad_fraction=0.1)
    with pytest.raises(DataError, match=r"2 of 13 files are unusable"):
        for _ in loader:
            pass
    assert [f["reason"] for f in loader.stats.files] == ["empty", "empty"]
    # exactly at the limit is fine: 1 bad of 10
    index = write_toy_dataset(tmp_path / "ok", [1.0] * 9, bad={"b": "empty"})
    src = open_source(index, ToyEncoder(), ToyTokenizer())
    loader = WindowLoader(src, frames=4, batch_size=1, loop=False, max_bad_fraction=0.1)
    assert len(list(loader)) > 0 and loader.stats.num_bad == 1


def test_train_stops_on_bad_data_and_lists_the_skipped_files(tmp_path, capsys):
    bad = {f"b{i}": kind for i, kind in enumerate(["empty", "corrupt", "mono"] * 3 + ["short"])}
    data = write_toy_dataset(tmp_path / "data", [1.28, 1.28], bad=bad)
    cfg = tiny_run(tmp_path, data)
    assert main(["train", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "stopped" in err and "max_bad_fraction" in err and "bad_files.json" in err
    listed = json.loads((tmp_path / "run" / "bad_files.json").read_text())
    assert listed["files_bad"] >= 2 and all(f["reason"] for f in listed["bad_files"])
    assert "skipped " in (tmp_path / "run" / "train.log").read_text()


def test_tokenize_and_eval_print_the_skipped_files(tmp_path, capsys):
    data = write_toy_dataset(tmp_path / "data", [1.28], bad={"broken": "corrupt"})
    assert main(["tokenize", str(data), str(tmp_path / "sh"), "--tiny", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 of 2 files" in out and "broken.wav: unreadable" in out
    assert json.loads((tmp_path / "sh" / "bad_files.json").read_text())["files_bad"] == 1
    audio = tmp_path / "audio"
    wav(audio / "a.wav", 2.0)
    (audio / "b.wav").write_bytes(b"RIFF garbage" * 20)
    argv = ["eval", "long-context", str(audio), "--tiny", "--out", str(tmp_path / "ev"),
            "--no-progress", "--speedup-frames", "0", "--controls", "none"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "skipped 1 of 2 files" in out and "b.wav: unreadable" in out


def test_negative_or_non_finite_alignment_times_are_bad_alignments(tmp_path):
    for times in ([-0.5, 0.2], [0.1, float("nan")], [0.1, -1.0]):
        path = tmp_path / "a.json"
        path.write_text(json.dumps({"alignments": [["w", times, "SPEAKER_MAIN"]]}))
        with pytest.raises(BadFile, match="times must be finite seconds >= 0") as e:
            read_alignments(path)
        assert e.value.reason == "alignments"


# -- 3. one error boundary: outputs first, corrupt checkpoints --------------------------------
def test_every_command_refuses_an_unwritable_output_before_any_work(tmp_path, capsys, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr("moshi_ttt.models.load.load_base_lm", no_load)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    bad = str(blocker / "sub")  # its parent is a file
    inp = wav(tmp_path / "in.wav")
    data = str(write_toy_dataset(tmp_path / "data", [1.0]))
    cfg = tiny_run(tmp_path, Path(data), run_dir=bad)
    commands = [
        ["train", str(cfg)],
        ["tokenize", data, bad, "--tiny"],
        ["toy-data", bad],
        ["generate", "--tiny", "--input", inp, "--output", bad],
        ["generate", "--tiny", "--input", inp, "--output", str(tmp_path / "o.wav"), "--text", bad],
        ["demo", "--out", bad],
        *[["eval", e, inp, "--tiny", "--out", bad] for e in ("long-context", "inner-loss")],
        ["eval", "gating", inp, "--tiny", "--out", bad],
    ]  # fmt: skip
    for argv in commands:
        assert main(argv) == 2, argv
        one_error(capsys, blocker)
    for bench in ("sblimp", "swuggy", "storycloze"):  # missing data: the same boundary
        assert main(["eval", bench, str(tmp_path / "none"), "--tiny", "--out", bad]) == 2
        one_error(capsys, "none")
    assert main(["export", str(tmp_path / "none"), "--out", bad]) == 2
    one_error(capsys, "none")
    for debug in (["--debug", "toy-data", bad], ["toy-data", bad, "--debug"]):
        with pytest.raises(ValueError, match="is a file"):
            main(debug)


def test_corrupt_newest_checkpoint_names_the_previous_one(trained, tmp_path, capsys):
    cfg, run = copy_run(trained, tmp_path)
    newest = run / "checkpoints" / "step_000002" / "trainable.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    assert main(["train", str(cfg), "--resume", "--no-progress"]) == 2
    err = one_error(capsys, "step_000002", "truncated", "--resume-from", "step_000001")
    assert "corrupt" in err
    assert main(["eval", "long-context", wav(tmp_path / "in.wav"), "--run", str(run),
                 "--out", str(tmp_path / "ev")]) == 2  # fmt: skip
    one_error(capsys, "step_000002", "step_000001")
    (run / "checkpoints" / "step_000001" / "state.json").write_text("{not json")
    assert main(["generate", "--run", str(run / "checkpoints" / "step_000001"), "--input",
                 wav(tmp_path / "in.wav"), "--output", str(tmp_path / "o.wav")]) == 2  # fmt: skip
    one_error(capsys, "state.json", "not valid JSON")


# -- 4. silent wrong results ------------------------------------------------------------------
def test_resume_with_other_settings_is_refused_or_flagged_inexact(trained, tmp_path, capsys):
    cfg, run = copy_run(trained, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step_000002")
    argv = ["train", str(cfg), "--resume", "--no-progress", "--set", "batch_size=2"]
    assert main(argv) == 2
    one_error(capsys, "batch_size: 1 in the checkpoint, 2 now", "--allow-inexact-resume")
    assert main([*argv, "--allow-inexact-resume"]) == 0
    assert "not an exact continuation" in (run / "train.log").read_text()
    assert (run / "checkpoints" / "step_000002").is_dir()


def test_generate_refuses_non_finite_input_before_loading(tmp_path, capsys):
    for value in (float("nan"), float("inf")):
        inp = wav(tmp_path / "nan.wav", value=value)
        argv = ["generate", "--tiny", "--input", inp, "--output", str(tmp_path / "o.wav")]
        assert main(argv) == 2
        one_error(capsys, "nan.wav", "non-finite")
    assert not (tmp_path / "o.wav").exists()


def test_pair_benchmark_with_nothing_scored_fails(tmp_path, capsys):
    for end in ("correct", "incorrect"):
        (tmp_path / "sc").mkdir(exist_ok=True)
        (tmp_path / "sc" / f"1_abc_{end}.wav").write_bytes(b"RIFF broken" * 10)
    argv = ["eval", "storycloze", str(tmp_path / "sc"), "--tiny", "--out", str(tmp_path / "o"),
            "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    err = one_error(capsys, "no pair could be scored")
    assert "nan" not in err and (tmp_path / "o" / "report.json").is_file()


def test_out_of_range_ttt_layers_name_the_key_before_building(tmp_path, capsys):
    data = write_toy_dataset(tmp_path / "data", [1.0])
    assert main(["train", str(tiny_run(tmp_path, data, ttt={**TTT, "layers": "1,9"}))]) == 2
    one_error(capsys, "ttt.layers", "[9] out of range", "2 layers")
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({**tiny_lm_kwargs(), "num_layers": 2}))
    save_file({"x": torch.zeros(1)}, base / "model.safetensors")  # never loaded
    cfg = tiny_run(tmp_path, data, model={"source": "local", "path": str(base)},
                   ttt={**TTT, "layers": "5"})  # fmt: skip
    assert main(["train", str(cfg)]) == 2
    one_error(capsys, "ttt.layers", "2 layers")


def test_a_base_whose_config_or_weights_do_not_fit_moshi_is_one_error(tmp_path, capsys):
    inp = wav(tmp_path / "in.wav")
    for name, config in (
        ("kwarg", {**tiny_lm_kwargs(), "bogus": 1}),
        ("weights", tiny_lm_kwargs()),
    ):
        base = tmp_path / name
        base.mkdir()
        (base / "config.json").write_text(json.dumps(config))
        save_file({"x": torch.zeros(1)}, base / "model.safetensors")
        out = str(tmp_path / "o.wav")
        argv = ["generate", "--base", str(base), "--input", inp, "--output", out]
        assert main(argv) == 2
        one_error(capsys, base, "do not make a moshi LMModel")


# -- 5. nothing is replaced without an explicit flag ------------------------------------------
def test_existing_outputs_are_never_replaced_silently(tmp_path, capsys):
    data = tmp_path / "toy"
    assert main(["toy-data", str(data), "--files", "1", "--seconds", "1"]) == 0
    before = (data / "index.jsonl").read_text()
    assert main(["toy-data", str(data), "--files", "2"]) == 2
    one_error(capsys, "index.jsonl", "--force")
    assert (data / "index.jsonl").read_text() == before
    assert main(["toy-data", str(data), "--files", "2", "--seconds", "1", "--force"]) == 0
    assert (data / "index.jsonl").read_text() != before
    (tmp_path / "sh").mkdir()
    (tmp_path / "sh" / "shards.json").write_text("{}")
    assert main(["tokenize", str(data / "index.jsonl"), str(tmp_path / "sh"), "--tiny"]) == 2
    one_error(capsys, "shards.json")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    assert main(["train", str(tiny_run(tmp_path, data / "index.jsonl"))]) == 2
    one_error(capsys, "metrics.jsonl", "--force")
    inp = wav(tmp_path / "in.wav")
    (tmp_path / "o.wav").write_bytes(b"mine")
    assert main(["generate", "--tiny", "--input", inp, "--output", str(tmp_path / "o.wav")]) == 2
    one_error(capsys, "o.wav", "--force")
    assert main(["generate", "--tiny", "--input", inp, "--output", inp]) == 2
    one_error(capsys, "input file")
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "report.json").write_text("{}")
    assert main(["eval", "long-context", inp, "--tiny", "--out", str(tmp_path / "ev")]) == 2
    one_error(capsys, "report.json", "--force")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "mine")]) == 2
    one_error(capsys, "thesis.tex", "not a previous demo output")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "x"


# -- docs examples run as written ---------------------------------------------------------------
def smoke_snippets() -> list[tuple[str, str]]:
    """``(doc, command)`` of every shell snippet (in a fenced code block) of the README and docs
    marked ``# a CPU smoke run`` (one command, possibly continued with a backslash): those
    need no GPU or network."""
    root = Path(__file__).resolve().parents[1]
    found = []
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        lines = doc.read_text().splitlines()
        fenced = False
        for i, line in enumerate(lines):
            if line.lstrip().startswith("```"):
                fenced = not fenced
            if not fenced or "# a CPU smoke run" not in line:
                continue
            start = i
            while start > 0 and lines[start - 1].rstrip().endswith("\\"):
                start -= 1
            cmd = " ".join(x.rstrip().rstrip("\\") for x in lines[start : i + 1])
            found.append((doc.name, cmd.split("#")[0].strip()))
    return found


def test_docs_smoke_snippets_run_as_written(tmp_path):
    snippets = smoke_snippets()
    assert snippets, "no '# a CPU smoke run' snippet found in the docs"
    for doc, cmd in snippets:
        cmd = cmd.replace("/tmp/", f"{tmp_path}/").replace(
            "moshi-ttt ", f"{sys.executable} -m moshi_ttt.cli "
        )
        proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        assert proc.returncode == 0, (doc, cmd, proc.stderr[-2000:])
