"""Provenance: every eval report names the checkpoint it measured (run, checkpoint directory,
step, sha256 of each weights file), and `eval summary` tells the rows of different models
apart."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import sphn
from moshi.utils.compile import no_compile

from moshi_ttt.cli import main
from moshi_ttt.data.toy import write_toy_dataset
from moshi_ttt.eval.compare import _labels, summarize
from moshi_ttt.models.load import load_base_lm
from moshi_ttt.models.provenance import provenance, provenance_label, sha256_file
from moshi_ttt.train.config import TrainConfig


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished 2-step tiny run with a checkpoint per step."""
    root = tmp_path_factory.mktemp("prov")
    data = write_toy_dataset(root / "data", [1.28, 1.28])
    cfg = {
        "run_dir": str(root / "run"), "max_steps": 2, "duration_sec": 0.64, "batch_size": 1,
        "ckpt_every": 1, "keep_last": 3, "lora": {"enable": True, "rank": 2},
        "ttt": {"layers": "1", "kind": "linear", "mini_batch_size": 4},
        "model": {"gradient_checkpointing": False},
        "data": {"train": [str(data)], "num_workers": 0},
    }  # fmt: skip
    path = root / "cfg.yaml"
    TrainConfig.from_dict(cfg).to_yaml(path)
    with no_compile():
        assert main(["train", str(path), "--no-progress"]) == 0
    return root / "run"


def _wav(path: Path) -> str:
    x = 0.3 * np.sin(np.arange(24000) / 10.0).astype(np.float32)
    sphn.write_wav(str(path), x, 24000)
    return str(path)


def _eval(model: list[str], data: str, out: Path) -> dict:
    args = ["eval", "long-context", data, *model, "--out", str(out), "--device", "cpu"]
    args += ["--speedup-frames", "0", "--no-progress", "--chunk-frames", "4"]
    with no_compile():
        assert main(args) == 0
    return json.loads((out / "report.json").read_text())


def test_sha256_file_streams_and_matches_hashlib(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(bytes(range(256)) * 9000)  # > one chunk
    assert sha256_file(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    tiny = provenance(load_base_lm("tiny:3", dtype=__import__("torch").float32))
    assert tiny["kind"] == "tiny" and tiny["weights"] == [] and "no weights file" in tiny["note"]
    assert tiny["label"] == "tiny:3 (no weights file)"


def test_run_report_records_the_checkpoint_used_and_summary_tells_runs_apart(run, tmp_path):
    data = _wav(tmp_path / "in.wav")
    newest = run / "checkpoints" / "step_000002"
    first = run / "checkpoints" / "step_000001"

    # --run RUN: the newest checkpoint, named with its step and the trained weights' sha256
    a = _eval(["--run", str(run)], data, tmp_path / "ev" / "a")
    p = a["provenance"]
    assert p["kind"] == "run" and p["name"] == str(run)
    assert p["run_dir"] == str(run.resolve())
    assert p["checkpoint_dir"] == str(newest.resolve()) and p["step"] == 2
    trained = newest / "trainable.safetensors"
    assert p["weights"] == [
        {
            "file": str(trained.resolve()),
            "sha256": hashlib.sha256(trained.read_bytes()).hexdigest(),
            "bytes": trained.stat().st_size,
        }
    ]
    assert p["base"]["kind"] == "tiny" and p["base"]["weights"] == []
    sha = p["weights"][0]["sha256"]
    assert p["label"] == f"run run @ step 2 (sha256 {sha[:8]})"
    assert p["label"] in (tmp_path / "ev" / "a" / "report.md").read_text()
    assert "provenance" not in a["setup"] and a["setup"]["model"]  # the model line stays

    # an explicit earlier checkpoint: its own step and bytes
    b = _eval(["--run", str(first)], data, tmp_path / "ev" / "b")
    q = b["provenance"]
    assert q["checkpoint_dir"] == str(first.resolve()) and q["step"] == 1
    first_bytes = (first / "trainable.safetensors").read_bytes()
    assert q["weights"][0]["sha256"] == hashlib.sha256(first_bytes).hexdigest()
    assert q["label"] != p["label"]

    # an adapter of the run: its file, on the tiny base
    c = _eval(["--adapter", str(newest)], data, tmp_path / "ev" / "c")
    r = c["provenance"]
    adapter = newest / "adapter.safetensors"
    assert r["kind"] == "adapter" and r["checkpoint_dir"] == str(newest.resolve())
    assert r["weights"][0]["sha256"] == hashlib.sha256(adapter.read_bytes()).hexdigest()
    assert r["base"]["kind"] == "tiny" and r["label"].endswith("on tiny:0 (no weights file)")

    page = summarize([tmp_path / "ev"], tmp_path / "summary")
    models = {e["report"]: e["model"] for e in page.data["long_context"]}
    assert len(set(models.values())) == 3  # one label per report, all different
    assert models[str(tmp_path / "ev" / "a" / "report.json")] == p["label"]
    md = (tmp_path / "summary" / "report.md").read_text()
    assert p["label"] in md and q["label"] in md
    entry = page.data["long_context"][0]
    assert entry["provenance"]["kind"] in ("run", "adapter")


def test_summary_labels_coinciding_models_apart():
    reports = [
        {"_path": "x/a/report.json", "provenance": {"label": "tiny:0 (no weights file)"}},
        {"_path": "x/b/report.json", "provenance": {"label": "tiny:0 (no weights file)"}},
        {"_path": "y/a/report.json", "setup": {"model": "tiny:0 on cpu (float32); TTT"}},
        {"_path": "z/a/report.json", "setup": {"model": "tiny:0 on cpu (float32); TTT"}},
        {"_path": "w/report.json", "provenance": {"label": "run r @ step 2 (sha256 00)"}},
    ]
    labels = _labels(reports)
    assert len(set(labels.values())) == len(reports)
    assert labels["x/a/report.json"] == "tiny:0 (no weights file) [a]"
    assert labels["y/a/report.json"] == "tiny:0 on cpu (float32) [y/a]"
    assert labels["w/report.json"] == "run r @ step 2 (sha256 00)"


def test_label_of_a_hub_model_and_an_unrecorded_one():
    hub = {"kind": "hf", "name": "kyutai/moshiko", "step": None,
           "weights": [{"file": "m", "sha256": "ab" * 32}]}  # fmt: skip
    assert provenance_label(hub) == "kyutai/moshiko (sha256 abababab)"
