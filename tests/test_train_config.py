"""TrainConfig: YAML load, --set overrides, typo -> closest key, wrong types and bad values."""

from __future__ import annotations

import pytest
import yaml

from moshi_ttt.integration.config import TTTConfig
from moshi_ttt.schema import apply_overrides as schema_overrides
from moshi_ttt.train.config import TrainConfig, apply_overrides, read_yaml

BASE = {"data": {"train": ["data/train.jsonl"]}}

YAML_TEXT = """
run_dir: runs/test
seed: 3
max_steps: 50
duration_sec: 20
batch_size: 2
lr: 1e-4            # YAML 1.1 reads this as a string; it must still be a float
ttt_lr: 3.0e-4
lora: {enable: true, rank: 16, scaling: 2.0}
ttt: {layers: "10,20", kind: linear, mini_batch_size: 8}
data:
  train: [a.jsonl, shards/b]
  eval: c.jsonl
  state_carry: detached
optim: {schedule: onecycle, pct_start: 0.1}
"""


def _cfg(**top: object) -> TrainConfig:
    return TrainConfig.from_dict({**BASE, **top})


def _error(data: dict) -> str:
    with pytest.raises(ValueError) as info:
        TrainConfig.from_dict(data)
    return str(info.value)


def test_yaml_load_and_resolved_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(YAML_TEXT)
    cfg = TrainConfig.load(path)
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float)
    assert cfg.duration_sec == 20.0 and isinstance(cfg.duration_sec, float)
    assert cfg.frames_per_window == 256  # 250 rounded up to 8-frame TTT mini-batches (carry)
    assert _cfg(duration_sec=20).frames_per_window == 250  # no carry: ceil(12.5 * 20)
    assert cfg.effective_ttt_lr == 3e-4 and cfg.effective_lora_lr == 1e-4
    assert isinstance(cfg.ttt, TTTConfig) and cfg.ttt.kind == "linear" and cfg.ttt.layers == "10,20"
    assert cfg.data.train == ["a.jsonl", "shards/b"] and cfg.data.eval == ["c.jsonl"]
    assert cfg.data.state_carry == "detached" and cfg.lora.rank == 16
    assert cfg.optim.schedule == "onecycle" and cfg.warmup_steps == 5
    assert cfg.first_codebook_weight == 100.0 and cfg.text_padding_weight == 0.5  # defaults
    out = tmp_path / "resolved.yaml"
    cfg.to_yaml(out)
    again = TrainConfig.from_dict(yaml.safe_load(out.read_text()))
    assert again == cfg and again.to_dict() == cfg.to_dict()


def test_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(YAML_TEXT)
    cfg = TrainConfig.load(
        path,
        [
            "lr=2e-5",
            "optim.weight_decay=0",
            "ttt.layers=[1, 2]",
            "data.train=[x.jsonl]",
            "lora.enable=false",
            "ttt_lr=",
            "model.tiny_overrides.num_layers=2",
        ],
    )
    assert cfg.lr == 2e-5 and cfg.optim.weight_decay == 0.0 and cfg.ttt.layers == [1, 2]
    assert cfg.data.train == ["x.jsonl"] and cfg.lora.enable is False and cfg.ttt_lr is None
    assert cfg.model.tiny_overrides == {"num_layers": 2}
    assert TrainConfig.load(path, ["ttt=null", "data.state_carry=none"]).ttt is None  # LoRA only
    with pytest.raises(ValueError, match="state_carry: detached needs TTT layers"):
        TrainConfig.load(path, ["ttt=null"])
    with pytest.raises(ValueError, match="In-Place TTT"):
        TrainConfig.load(path, ["ttt.kind=inplace"])
    # a section that was null gets created
    assert apply_overrides({"ttt": None}, ["ttt.kind=mlp"]) == {"ttt": {"kind": "mlp"}}
    original = {"optim": {"eps": 1.0}}
    schema_overrides(original, ["optim.eps=2"])
    assert original == {"optim": {"eps": 1.0}}  # the input is not modified


@pytest.mark.parametrize(
    "item, message",
    [
        ("lr", "expected key=value"),
        ("=3", "expected key=value"),
        ("a..b=1", "expected key=value"),
        ("lr.x=1", "'lr' is a value, not a section"),
        ("lr=[1", "not valid YAML"),
    ],
)
def test_bad_override_syntax(item, message):
    with pytest.raises(ValueError, match="override") as info:
        apply_overrides({"lr": 1.0}, [item])
    assert message in str(info.value)


@pytest.mark.parametrize(
    "data, expected",
    [
        (
            {"data": {"train": ["x"], "state_cary": "none"}},
            "'data.state_cary': did you mean 'data.state_carry'",
        ),
        ({**BASE, "max_step": 3}, "'max_step': did you mean 'max_steps'"),
        (
            {**BASE, "optim": {"schedul": "cosine"}},
            "'optim.schedul': did you mean 'optim.schedule'",
        ),
        ({**BASE, "ttt": {"kindd": "mlp"}}, "'ttt.kindd': did you mean 'ttt.kind'"),
        ({**BASE, "lora": {"rnak": 8}}, "'lora.rnak': did you mean 'lora.rank'"),
        # a key of another section, or moshi-finetune's name for it
        ({**BASE, "gradient_checkpointing": True}, "did you mean 'model.gradient_checkpointing'"),
        ({**BASE, "optim": {"max_norm": 1.0}}, "'optim.max_norm': did you mean 'max_norm'"),
        ({**BASE, "optim": {"lr": 1e-4}}, "'optim.lr': did you mean 'lr'"),
        ({**BASE, "first_codebook_weight_multiplier": 100}, "did you mean 'first_codebook_weight'"),
        ({**BASE, "num_microbatches": 2}, "did you mean 'grad_accum'"),
        ({**BASE, "zzzz": 1}, "unknown key 'zzzz': valid keys here"),
    ],
)
def test_typo_names_full_key_and_closest(data, expected):
    message = _error(data)
    assert "unknown key" in message and expected in message


@pytest.mark.parametrize(
    "data, expected",
    [
        ({**BASE, "lr": -1e-4}, "lr: expected a value > 0"),
        ({**BASE, "lr": 0}, "lr: expected a value > 0"),
        ({**BASE, "lr": "fast"}, "lr: expected a finite number"),
        ({**BASE, "lr": float("nan")}, "lr: expected a finite number"),
        ({**BASE, "ttt_lr": -1.0}, "ttt_lr: expected a value > 0"),
        ({**BASE, "batch_size": 1.5}, "batch_size: expected an integer"),
        ({**BASE, "batch_size": 0}, "batch_size: expected a value >= 1"),
        ({**BASE, "max_steps": True}, "max_steps: expected an integer"),
        ({**BASE, "duration_sec": 0}, "duration_sec: expected a value > 0"),
        ({**BASE, "seed": "0"}, "seed: expected an integer"),
        (
            {"data": {"train": ["x"], "state_carry": "detach"}},
            "data.state_carry: expected one of ['none', 'detached']",
        ),
        (
            {"data": {"train": ["x"], "max_bad_fraction": 1.5}},
            "data.max_bad_fraction: expected a value >= 0 and <= 1",
        ),
        ({"data": {"train": ["x"], "shuffle": "yes"}}, "data.shuffle: expected a boolean"),
        ({"data": {"train": [1]}}, "data.train[0]: expected a string"),
        ({"data": {"train": []}}, "data.train: expected at least one"),
        ({"data": 3}, "data: expected a mapping"),
        ({**BASE, "optim": {"schedule": "linear"}}, "optim.schedule: expected one of"),
        ({**BASE, "optim": {"betas": [0.9]}}, "optim.betas: expected a list of 2 values"),
        ({**BASE, "optim": {"betas": [0.9, 1.0]}}, "optim.betas: expected two numbers in [0, 1)"),
        ({**BASE, "optim": {"pct_start": 1.0}}, "optim.pct_start: expected a value >= 0 and < 1"),
        ({**BASE, "lora": {"scaling": 0}}, "lora.scaling: expected a value > 0"),
        ({**BASE, "model": {"source": "local"}}, "model.path: expected a checkpoint directory"),
        (
            {**BASE, "model": {"source": "gguf"}},
            "model.source: expected one of ['tiny', 'hf', 'local']",
        ),
        ({**BASE, "model": {"dtype": "fp16"}}, "model.dtype: expected one of"),
        ({**BASE, "model": {"tiny_overrides": [1]}}, "model.tiny_overrides: expected a mapping"),
        ({**BASE, "eval_every": 10}, "eval_every: evaluation needs data.eval"),
        ({**BASE, "ttt": None}, "nothing to train"),
        ({**BASE, "ttt": {"kind": "mlpp"}}, "ttt.kind: expected one of"),
        (
            {**BASE, "ttt": {"mini_batch_size": 0}},
            "ttt.mini_batch_size: expected a value >= 1, got int 0",
        ),
        ({**BASE, "ttt": {"layers": "middel"}}, "ttt.layers: bad layer spec"),
        ({**BASE, "ttt": "mlp"}, "ttt: expected a mapping"),
    ],
)
def test_bad_values_name_the_key(data, expected):
    assert expected in _error(data)


def test_programmatic_construction_is_validated():
    cfg = TrainConfig(data={"train": ["x"]}, optim={"eps": "1e-6"})  # mappings become sections
    assert cfg.data.train == ["x"] and cfg.optim.eps == 1e-6
    with pytest.raises(ValueError, match="keep_last"):
        TrainConfig(data={"train": ["x"]}, keep_last=0)
    cfg = _cfg()
    cfg.lr = -1.0
    with pytest.raises(ValueError, match="^lr: "):
        cfg.validate()
    cfg = _cfg()
    cfg.ttt.kind = "bad"  # a nested section's own checks, renamed to the dotted key
    with pytest.raises(ValueError, match=r"^ttt\.kind: expected one of"):
        cfg.validate()
    cfg = _cfg()
    cfg.data.num_workers = -1
    with pytest.raises(ValueError, match=r"^data\.num_workers: expected a value >= 0"):
        cfg.validate()


def test_read_yaml_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        read_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1\n")
    with pytest.raises(ValueError, match="bad.yaml: not valid YAML"):
        read_yaml(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="list.yaml: expected a mapping"):
        read_yaml(listy)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert read_yaml(empty) == {}
    with pytest.raises(ValueError, match="data.train"):
        TrainConfig.load(empty)  # defaults alone have no data
    assert TrainConfig.load(empty, ["data.train=x.jsonl"]).data.train == ["x.jsonl"]
