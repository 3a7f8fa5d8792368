"""Export a trained run (``moshi-ttt export``) and use it, or the run itself, as a new base.

Tiny 2-layer models, 2 training steps on the demo's Markov task, CPU float32.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from moshi.utils.compile import no_compile
from safetensors.torch import load_file, save_file
from test_adapters import codes, outputs  # noqa: E402  (tests/ is on sys.path)

from moshi_ttt.cli import main
from moshi_ttt.cli.common import load_model_from_args
from moshi_ttt.demo.markov_task import MarkovTask, write_shards
from moshi_ttt.integration.apply import named_ttt_parameters, ttt_modules
from moshi_ttt.models.export import export_run
from moshi_ttt.models.load import load_adapter, load_base_lm, load_codec
from moshi_ttt.models.lora import lora_modules
from moshi_ttt.models.sources import checkpoint_info
from moshi_ttt.train.checkpoint import load_trained_model
from moshi_ttt.train.config import TrainConfig
from moshi_ttt.train.model import build_model
from moshi_ttt.train.trainer import train

F32 = torch.float32
TINY = {"context": 8, "num_layers": 2, "depformer_num_layers": 1, "depformer_dim": 16,
        "depformer_dim_feedforward": 64, "depformer_num_heads": 1}  # fmt: skip
TTT = {"layers": "1", "kind": "mlp", "mini_batch_size": 8, "gate_init": 0.5}


@pytest.fixture(autouse=True)
def _eager():
    with no_compile():
        yield


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return str(write_shards(tmp_path_factory.mktemp("data"), MarkovTask(seq_len=32), 8))


def run_config(run_dir: Path, shards: str, model: dict, **top) -> TrainConfig:
    cfg = {
        "run_dir": str(run_dir), "max_steps": 2, "duration_sec": 32 / 12.5, "batch_size": 2,
        "lr": 3e-3, "log_every": 1, "ttt": None,
        "model": {"dtype": "float32", "gradient_checkpointing": False, **model},
        "data": {"train": [shards], "num_workers": 0},
    }  # fmt: skip
    return TrainConfig.from_dict({**cfg, **top})


def trained_run(run_dir: Path, shards: str, model: dict, **top) -> Path:
    with no_compile():
        train(run_config(run_dir, shards, model, **top), progress=False, device="cpu")
    return run_dir


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, shards) -> Path:
    """The whole tiny model trained (``train_base``): ``trainable.safetensors``, no adapter."""
    root = tmp_path_factory.mktemp("base")
    model = {"source": "tiny", "tiny_overrides": TINY, "train_base": True}
    return trained_run(root / "run", shards, model)


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory, shards) -> Path:
    """TTT + LoRA on the frozen tiny model: the checkpoints are adapters."""
    root = tmp_path_factory.mktemp("adapter")
    model = {"source": "tiny", "tiny_overrides": TINY}
    return trained_run(root / "run", shards, model, ttt=TTT, lora={"enable": True, "rank": 4})


@pytest.fixture(scope="module")
def base_export(tmp_path_factory, base_run) -> Path:
    return export_run(base_run, tmp_path_factory.mktemp("exports") / "base")


def base_weights(lm) -> dict[str, torch.Tensor]:
    """Every weight outside the TTT branches, by name."""
    ttt = {f"{n}.{k}" for n, m in ttt_modules(lm) for k in m.state_dict()}
    return {k: v for k, v in lm.state_dict().items() if k not in ttt}


# -- round trips ------------------------------------------------------------------------------
def test_train_base_run_exports_to_the_same_model(base_run, base_export):
    run_lm, _ = load_trained_model(base_run)
    model = load_base_lm(base_export, dtype=F32)
    lm = model.lm
    c = codes(lm, T=12)
    torch.testing.assert_close(outputs(lm, c), outputs(run_lm, c), rtol=0, atol=1e-6)
    config = json.loads((base_export / "config.json").read_text())
    entry = config["moshi_ttt"]
    assert config["num_layers"] == 2 and config["context"] == 8
    assert entry["base"] == "tiny:0" and entry["codec"] == "tiny:0"
    assert (
        entry["ttt_config"] is None and entry["ttt_layers"] == [] and entry["lora_merged"] is None
    )
    assert entry["step"] == 2 and entry["exported_from"].endswith("step_000002")
    assert model.base == str(base_export.resolve()) and not ttt_modules(lm)
    mimi, tokenizer = load_codec(model)  # the tiny base's codec, found through the export
    assert mimi.frame_rate == 12.5 and tokenizer.vocab_size() == lm.text_card


def test_ttt_lora_run_exports_with_its_layers_and_merged_lora(adapter_run, tmp_path):
    run_lm, _ = load_trained_model(adapter_run)
    assert lora_modules(run_lm) and ttt_modules(run_lm)
    ckpt = adapter_run / "checkpoints" / "step_000002"
    out = export_run(ckpt, tmp_path / "exp")  # a step_* directory works as well
    entry = json.loads((out / "config.json").read_text())["moshi_ttt"]
    assert entry["ttt_layers"] == [1] and entry["ttt_config"]["layers"] == [1]  # the layer list
    assert entry["lora_merged"] == {"rank": 4, "scaling": 2.0}
    lm = load_base_lm(out, dtype=F32).lm
    assert lm.ttt_layers == [1] and not lora_modules(lm)
    c = codes(lm, T=12)
    torch.testing.assert_close(outputs(lm, c), outputs(run_lm, c), rtol=0, atol=1e-5)


# -- a new run on an export, or on a run directory ----------------------------------------------
def test_new_run_on_the_export_or_the_run_keeps_the_base_frozen(
    base_run, base_export, shards, tmp_path
):
    exported = load_file(str(base_export / "model.safetensors"))
    for name, path in (("on_export", base_export), ("on_run", base_run)):
        model = {"source": "local", "path": str(path)}
        run = trained_run(tmp_path / name, shards, model, ttt=TTT)
        lm, _ = load_trained_model(run)
        weights = base_weights(lm)
        assert sorted(weights) == sorted(exported), name
        assert all(torch.equal(weights[k], exported[k]) for k in exported), name
        # the checkpoint is an adapter on that base, and reloads onto it
        ckpt = run / "checkpoints" / "step_000002"
        base = json.loads((ckpt / "adapter.json").read_text())["base"]
        want = base_export if name == "on_export" else base_run / "checkpoints" / "step_000002"
        assert base == str(want.resolve())
        again = load_adapter(ckpt, dtype=F32).lm
        c = codes(lm, T=12)
        torch.testing.assert_close(outputs(again, c), outputs(lm, c), rtol=0, atol=1e-6)


def test_run_on_a_ttt_export_trains_its_layers_and_exports_again(adapter_run, shards, tmp_path):
    first = export_run(adapter_run, tmp_path / "first")
    model = {"source": "local", "path": str(first)}
    cfg = run_config(tmp_path / "bad", shards, model, ttt={**TTT, "layers": "0"})
    with pytest.raises(ValueError, match=r"already has TTT layers \[1\].*layers: \[0\] vs \[1\]"):
        build_model(cfg, torch.device("cpu"))
    lora = {"enable": True, "rank": 2}
    run = trained_run(tmp_path / "run", shards, model, ttt=TTT, lora=lora)
    run_lm, _ = load_trained_model(run)
    before = load_base_lm(first, dtype=F32).lm
    trained_on = dict(named_ttt_parameters(run_lm))
    exported = dict(named_ttt_parameters(before))
    assert sorted(trained_on) == sorted(exported)
    assert any(not torch.equal(p, exported[n]) for n, p in trained_on.items())  # trained further
    second = export_run(run, tmp_path / "second")
    entry = json.loads((second / "config.json").read_text())["moshi_ttt"]
    assert entry["base"] == str(first.resolve()) and entry["codec"] == "tiny:0"
    assert entry["lora_merged"] == {"rank": 2, "scaling": 2.0}
    model = load_base_lm(second, dtype=F32)
    lm = model.lm
    c = codes(lm, T=12)
    torch.testing.assert_close(outputs(lm, c), outputs(run_lm, c), rtol=0, atol=1e-5)
    assert load_codec(model)[0] is not None  # tiny codec through two exports


def test_base_argument_takes_a_run_directory(adapter_run):
    args = argparse.Namespace(adapter=None, run=None, tiny=False, base=str(adapter_run),
                              ttt_config=None, device="cpu", dtype="float32")  # fmt: skip
    model, _, _ = load_model_from_args(args)
    lm = model.lm
    run_lm, _ = load_trained_model(adapter_run)
    assert model.info is None and lm.ttt_layers == [1] and not lora_modules(lm)  # LoRA merged
    c = codes(lm, T=12)
    torch.testing.assert_close(outputs(lm, c), outputs(run_lm, c), rtol=0, atol=1e-5)
    assert model.codec == "tiny:0"


# -- local directories, file overrides ---------------------------------------------------------
def test_local_directory_without_config_is_a_clear_error(base_export, shards, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(base_export / "model.safetensors", bare)
    with pytest.raises(ValueError, match=r"bare: no config\.json; .* moshi's LM kwargs.*hf_repo"):
        load_base_lm(bare, dtype=F32)
    cfg = run_config(tmp_path / "r", shards, {"source": "local", "path": str(bare)}, ttt=TTT)
    with pytest.raises(ValueError, match="no config.json"):
        build_model(cfg, torch.device("cpu"))
    # model.config_path supplies it
    cfg.model.config_path = str(base_export / "config.json")
    lm = build_model(cfg, torch.device("cpu"))[0].lm
    assert lm.ttt_layers == [1]


def test_hf_repo_without_config_is_still_the_7b(tmp_path, monkeypatch):
    """An (offline, cached) HF repo without config.json keeps moshi's 7B default; only local
    directories need one (or ``legacy_7b``, what ``source: hf`` passes for a snapshot path)."""
    import huggingface_hub.constants as hf_constants

    repo = tmp_path / "hub" / "models--test-org--no-config"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (repo / ".no_exist" / "abc123").mkdir(parents=True)
    (repo / ".no_exist" / "abc123" / "config.json").touch()  # the hub said: no such file
    save_file({"x": torch.zeros(1)}, snap / "model.safetensors")
    for name in ("tokenizer-e351c8d8-checkpoint125.safetensors", "tokenizer_spm_32k_3.model"):
        (snap / name).write_bytes(b"x")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.warns(UserWarning, match="no config.json"):
        info = checkpoint_info("test-org/no-config")
    assert info.lm_config is None and info.moshi_weights == snap / "model.safetensors"
    assert checkpoint_info(snap, legacy_7b=True).lm_config is None
    with pytest.raises(ValueError, match="no config.json"):
        checkpoint_info(snap)


def test_file_overrides_of_the_model_config(base_export, shards, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(base_export, moved)
    (moved / "model.safetensors").rename(moved / "renamed.safetensors")
    cfg = run_config(tmp_path / "r", shards, {"source": "local", "path": str(moved)}, ttt=TTT)
    with pytest.raises(FileNotFoundError, match=r"model weights not found: .*model\.safetensors"):
        build_model(cfg, torch.device("cpu"))
    cfg.model.moshi_weights = str(moved / "renamed.safetensors")
    lm = build_model(cfg, torch.device("cpu"))[0].lm
    exported = load_file(str(base_export / "model.safetensors"))
    assert all(torch.equal(base_weights(lm)[k], v) for k, v in exported.items())
    with pytest.raises(ValueError, match="model.moshi_weights: only for model.source hf or local"):
        run_config(tmp_path / "t", shards, {"source": "tiny", "moshi_weights": "x.safetensors"})


# -- the CLI ------------------------------------------------------------------------------------
def test_export_cli(base_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", str(base_run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "model.safetensors" in printed and f"model.path: {out}" in printed
    assert (out / "config.json").is_file()

    assert main(["export", str(base_run), "--out", str(out)]) == 2  # not empty
    err = capsys.readouterr().err
    assert "not empty" in err and "--force" in err
    (out / "stale.txt").write_text("kept")
    assert main(["export", str(base_run), "--out", str(out), "--force"]) == 0
    assert (out / "stale.txt").read_text() == "kept" and (out / "config.json").is_file()
    assert main(["export", str(base_run), "--out", str(base_run), "--force"]) == 2  # the run itself

    empty = tmp_path / "empty_run"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / "config.yaml").write_text("{}")
    capsys.readouterr()
    assert main(["export", str(empty), "--out", str(tmp_path / "x")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "y")]) == 2
    assert "no such run" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# -- every byte checked (issue: reliability) ---------------------------------------------------
def flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_any_written_file_is_named(adapter_run, base_export, tmp_path):
    """Checkpoints and exports record every file's sha256 in manifest.json (written last);
    adapters carry their weights' sha256; saved sessions their tensors'. One flipped byte in
    the middle of each kind of file is found and the file named."""
    from moshi_ttt.models.files import MANIFEST
    from moshi_ttt.models.runs import checkpoint_problem
    from moshi_ttt.serve.sessions import SessionStore

    # a checkpoint: every file listed, each damaged copy named
    ckpt = sorted((adapter_run / "checkpoints").glob("step_*"))[-1]
    listed = json.loads((ckpt / MANIFEST).read_text())["files"]
    assert {p.name for p in ckpt.iterdir() if p.name != MANIFEST} == set(listed)
    assert checkpoint_problem(ckpt) is None
    for name in ("trainable.safetensors", "optimizer.safetensors", "state.json"):
        copy = tmp_path / f"ckpt-{name}"
        shutil.copytree(ckpt, copy)
        flip_middle_byte(copy / name)
        problem = checkpoint_problem(copy)
        assert problem is not None and name in problem, (name, problem)
    # an export: loading it names the weights file
    export = tmp_path / "export"
    shutil.copytree(base_export, export)
    assert "model.safetensors" in json.loads((export / MANIFEST).read_text())["files"]
    flip_middle_byte(export / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors: its bytes differ"):
        load_base_lm(str(export), dtype=torch.float32)
    # an adapter (the checkpoint's adapter files)
    adapter = tmp_path / "adapter"
    shutil.copytree(ckpt, adapter)
    flip_middle_byte(adapter / "adapter.safetensors")
    with pytest.raises(ValueError, match="adapter.safetensors"):
        load_adapter(adapter)
    # a saved conversation
    store = SessionStore(tmp_path / "states")
    token = store.issue()
    path = store.save(token, {"w": torch.arange(4096, dtype=torch.float32)}, {"frames": 3})
    assert store.load(token)[1] == {"frames": 3}
    flip_middle_byte(path)
    with pytest.raises(ValueError, match="tensor bytes differ"):
        store.load(token)
