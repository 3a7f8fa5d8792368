"""The training loop on the tiny model: what trains, exact resume, 1 vs 2 processes, guards, CLI."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moshi_ttt.cli import main
from moshi_ttt.data.toy import write_toy_dataset
from moshi_ttt.errors import TrainingStopped
from moshi_ttt.integration.apply import ttt_modules
from moshi_ttt.train import trainer as trainer_mod
from moshi_ttt.train.checkpoint import load_trained_model
from moshi_ttt.train.config import TrainConfig
from moshi_ttt.train.model import build_model
from moshi_ttt.train.steps import forward_terms, lr_multiplier
from moshi_ttt.train.trainer import train

TTT = {"layers": "1,3", "kind": "mlp", "mini_batch_size": 8, "gate_init": 0.1}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("toy")
    train_index = write_toy_dataset(root, [2.56] * 4, bad={"broken": "corrupt"})
    eval_index = write_toy_dataset(root, [2.56] * 2, index_name="eval.jsonl", seed=10)
    clean = write_toy_dataset(root / "clean", [2.56] * 4, seed=20)  # equal lengths, no bad file
    return {"train": str(train_index), "eval": str(eval_index), "clean": str(clean)}


def config(run_dir: Path, train_data: list[str], **top) -> TrainConfig:
    base = {
        "run_dir": str(run_dir), "max_steps": 4, "duration_sec": 1.28, "batch_size": 2,
        "lr": 3e-3, "log_every": 1, "ttt": TTT,
        "model": {"gradient_checkpointing": False},
        "data": {"train": train_data, "num_workers": 0, "state_carry": "detached"},
        "optim": {"pct_start": 0.25},
    }  # fmt: skip
    for key, value in top.items():
        if isinstance(value, dict):
            base[key] = {**base.get(key, {}), **value}
        else:
            base[key] = value
    return TrainConfig.from_dict(base)


def metrics(run_dir: Path, split: str = "train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("split", "train") == split]


# -- what trains ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "lora, checkpointing", [(False, False), (True, True)], ids=["ttt", "lora+ttt+ckpt"]
)
def test_step_changes_only_trainables_and_all_get_gradients(dataset, tmp_path, lora, checkpointing):
    cfg = config(tmp_path, [dataset["clean"]], lora={"enable": lora, "rank": 4},
                 model={"gradient_checkpointing": checkpointing})  # fmt: skip
    built, groups = build_model(cfg, torch.device("cpu"))
    lm = built.lm
    if checkpointing:
        trainer_mod.apply_activation_checkpointing(lm)
    assert set(groups.params) == ({"ttt", "lora"} if lora else {"ttt"})
    trainable = {id(p) for _, p in groups.named()}
    assert all(p.requires_grad == (id(p) in trainable) for p in lm.parameters())
    assert all(p.dtype == torch.float32 for _, p in groups.named())
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    optimizer = trainer_mod.build_optimizer(groups.params, groups.lrs, cfg)
    codes = torch.randint(0, 32, (2, 17, 16))
    codes[:, 0] = torch.randint(0, 64, (2, 16))
    for step in range(2):  # LoRA's B starts at 0, so A gets its first gradient at step 2
        optimizer.zero_grad()
        forward_terms(lm, codes, cfg).loss().backward()
        for name, p in groups.named():
            if not (step == 0 and name.endswith("lora_A.weight")):
                assert p.grad is not None and p.grad.abs().sum() > 0, name
        optimizer.step()
    names = {n for n, _ in groups.named()}
    after = lm.state_dict()
    for key, value in before.items():
        changed = not torch.equal(value, after[key])
        assert changed == (key in names), key


def test_loss_goes_down_and_corrupt_file_is_counted(dataset, tmp_path):
    cfg = config(tmp_path / "run", [dataset["train"]], max_steps=24, lr=1e-2,
                 lora={"enable": True, "rank": 8}, lora_lr=3e-3,
                 eval_every=12,
                 data={"eval": [dataset["eval"]], "max_bad_fraction": 0.2})  # fmt: skip
    result = train(cfg, progress=False)
    losses = [r["loss"] for r in metrics(tmp_path / "run")]
    assert len(losses) == 24 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.1, losses
    assert result.final_metrics["bad_files"] == 1.0
    evals = metrics(tmp_path / "run", "eval")
    assert [r["step"] for r in evals] == [12, 24] and evals[1]["loss"] < evals[0]["loss"]
    record = metrics(tmp_path / "run")[-1]
    for key in (
        "step",
        "loss",
        "text_loss",
        "audio_loss",
        "lr",
        "grad_norm/ttt",
        "grad_norm/lora",
        "audio_ce_cb0",
        "gate/1",
        "gate/3",
        "tokens_per_s",
    ):
        assert key in record, key  # fmt: skip
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert list((tmp_path / "run" / "tensorboard").iterdir())
    ckpt = result.last_checkpoint
    assert ckpt is not None and ckpt.name == "step_000024" and (ckpt / "adapter.json").is_file()
    lm, _ = load_trained_model(tmp_path / "run")
    saved = load_file(str(ckpt / "trainable.safetensors"))
    params = dict(lm.named_parameters())
    assert not lm.training and all(torch.equal(params[k], v) for k, v in saved.items())


# -- exact resume -----------------------------------------------------------------------------
def test_resume_continues_exactly(dataset, tmp_path):
    full = tmp_path / "full"
    cfg = config(full, [dataset["train"]], max_steps=6, ckpt_every=3, keep_last=5,
                 data={"num_workers": 2, "shuffle": True, "max_bad_fraction": 0.2})  # fmt: skip
    train(cfg, progress=False)
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "step_000006")
    cfg_part = config(part, [dataset["train"]], max_steps=6, ckpt_every=3, keep_last=5,
                      data={"num_workers": 2, "shuffle": True,
                            "max_bad_fraction": 0.2})  # fmt: skip
    with pytest.raises(ValueError, match="--resume"):
        train(cfg_part, progress=False)  # a run_dir with checkpoints needs --resume
    train(cfg_part, resume=True, progress=False)
    a, b = metrics(full), metrics(part)
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a[3:], b[3:]):
        assert ra["loss"] == rb["loss"] and ra["grad_norm"] == rb["grad_norm"], (ra, rb)
    wa = load_file(str(full / "checkpoints/step_000006/trainable.safetensors"))
    wb = load_file(str(part / "checkpoints/step_000006/trainable.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # resuming a finished run says so and trains nothing
    done = train(cfg_part, resume=True, progress=False)
    assert done.steps == 6 and [r["step"] for r in metrics(part)] == list(range(1, 7))
    assert "already at step 6 of 6" in (part / "train.log").read_text()


def test_extending_max_steps_is_exact_when_the_schedule_allows(dataset, tmp_path):
    # constant schedule, no warm-up: the learning rate of steps 1..3 does not depend on max_steps
    kw = {"ckpt_every": 3, "keep_last": 5, "optim": {"schedule": "constant", "pct_start": 0.0}}
    full = tmp_path / "full"
    train(config(full, [dataset["clean"]], max_steps=6, **kw), progress=False)
    short = tmp_path / "short"
    train(config(short, [dataset["clean"]], max_steps=3, **kw), progress=False)  # finished
    train(config(short, [dataset["clean"]], max_steps=6, **kw), resume=True, progress=False)
    a, b = metrics(full), metrics(short)
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        assert ra["loss"] == rb["loss"] and ra["lr"] == rb["lr"], (ra, rb)
    wa = load_file(str(full / "checkpoints/step_000006/trainable.safetensors"))
    wb = load_file(str(short / "checkpoints/step_000006/trainable.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert "not an exact continuation" not in (short / "train.log").read_text()


def test_extending_max_steps_under_cosine_says_what_to_do(dataset, tmp_path):
    run = tmp_path / "run"
    train(config(run, [dataset["clean"]], max_steps=2), progress=False)
    longer = config(run, [dataset["clean"]], max_steps=4)
    with pytest.raises(ValueError) as info:
        train(longer, resume=True, progress=False)
    msg = str(info.value)
    assert "max_steps: 2 in the checkpoint, 4 now" in msg
    assert "the cosine schedule decays over max_steps" in msg
    assert "--allow-inexact-resume" in msg and "model.path=" in msg
    # the warm-up of a constant schedule depends on max_steps too
    const = {"optim": {"schedule": "constant", "pct_start": 0.25}}
    run2 = tmp_path / "run2"
    train(config(run2, [dataset["clean"]], max_steps=2, **const), progress=False)
    with pytest.raises(ValueError, match="its warm-up lasts pct_start x max_steps"):
        train(config(run2, [dataset["clean"]], max_steps=8, **const), resume=True,
              progress=False)  # fmt: skip
    # the flag continues on the new schedule, as before
    result = train(longer, resume=True, progress=False, allow_inexact_resume=True)
    assert result.steps == 4 and [r["step"] for r in metrics(run)] == [1, 2, 3, 4]
    assert "not an exact continuation" in (run / "train.log").read_text()


def test_interrupt_names_the_last_checkpoint(dataset, tmp_path, monkeypatch):
    cfg = config(tmp_path / "r", [dataset["train"]], max_steps=6, ckpt_every=2,
                 data={"max_bad_fraction": 0.2})  # fmt: skip
    real = trainer_mod.forward_output_terms
    calls = {"n": 0}

    def stop_at_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "forward_output_terms", stop_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False)
    log = (tmp_path / "r" / "train.log").read_text()
    assert "interrupted at step 3 of 6" in log and "step_000002" in log and "--resume" in log


def test_interrupt_before_first_checkpoint_same_command_starts_again(
    dataset, tmp_path, monkeypatch, capsys
):
    """Ctrl-C before the first checkpoint: the message names the command that continues, and
    that command (or it with --resume) starts the run again from step 0; another config is
    refused."""
    cfg = config(tmp_path / "r", [dataset["clean"]], max_steps=2, ckpt_every=2)
    cfg_path = tmp_path / "cfg.yaml"
    cfg.to_yaml(cfg_path)
    argv = ["train", str(cfg_path), "--no-progress"]
    real = trainer_mod.forward_output_terms

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    def run(extra: list[str], stop: bool) -> tuple[int, str, str]:
        monkeypatch.setattr(trainer_mod, "forward_output_terms", interrupt if stop else real)
        code = main(argv + extra)
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, _ = run([], stop=True)
    command = "moshi-ttt " + shlex.join(argv)
    assert code == 130
    assert f"last complete checkpoint: none yet; start it again (from step 0, in the same " \
           f"run_dir) with: {command}\n" in out  # fmt: skip
    # the same command, the same config: from step 0, said in one line
    code, out, err = run([], stop=False)
    assert code == 0, err
    assert "holds a run of this config that wrote no checkpoint (interrupted before its " \
           "first): starting it again from step 0" in out  # fmt: skip
    assert [r["step"] for r in metrics(tmp_path / "r")] == [1, 2]
    # --resume on a run_dir with no checkpoint and the same config: also from step 0
    shutil.rmtree(tmp_path / "r" / "checkpoints")
    code, out, err = run(["--resume"], stop=True)
    assert code == 130 and "start it again" in out and "--resume" not in out.split("with: ")[-1]
    code, out, err = run(["--resume"], stop=False)
    assert code == 0, err
    assert "--resume: run_dir" in out and "starting it again from step 0" in out
    assert [r["step"] for r in metrics(tmp_path / "r")] == [1, 2]
    # a checkpoint now: the interrupt names --resume
    code, out, _ = run(["--set=max_steps=4", "--allow-inexact-resume", "--resume"], stop=True)
    assert code == 130 and "step_000002; continue it with: moshi-ttt " in out
    assert out.rstrip().endswith("--allow-inexact-resume --resume")
    # another config in a run_dir with no checkpoint: refused, naming the difference
    shutil.rmtree(tmp_path / "r" / "checkpoints")
    code, _, err = run(["--set=lr=1e-3"], stop=False)
    assert code == 2 and "its config.yaml differs: lr: 0.003" in err and "--force" in err
    code, _, err = run(["--set=lr=1e-3", "--resume"], stop=False)
    assert code == 2 and "its config.yaml differs" in err
    # a run_dir with no run at all: --resume is an error
    code, _, err = run([f"--set=run_dir={tmp_path / 'empty'}", "--resume"], stop=False)
    assert code == 2 and "no checkpoint" in err and "drop --resume" in err


# -- one process == two processes -------------------------------------------------------------
def _torchrun(nproc: int, cfg_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--standalone", "-m", "moshi_ttt.cli", "train", str(cfg_path), "--no-progress",
           *[f"--set={o}" for o in overrides]]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_TORCH_COMPILE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_two_processes_match_one(dataset, tmp_path):
    # Adam's eps 1e-6: the depformer's first step attends to one key, so its q/k gradients are
    # float noise (~1e-9) that eps 1e-8 would blow up to lr-sized, order-dependent updates.
    cfg = config(tmp_path / "x", [dataset["clean"]], max_steps=3, lora={"enable": True, "rank": 4},
                 model={"gradient_checkpointing": True}, optim={"eps": 1e-6})  # fmt: skip
    cfg_path = tmp_path / "cfg.yaml"
    cfg.to_yaml(cfg_path)
    one = main(["train", str(cfg_path), "--no-progress", f"--set=run_dir={tmp_path / 'one'}"])
    assert one == 0
    two = _torchrun(2, cfg_path, f"run_dir={tmp_path / 'two'}", "batch_size=1")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "returned a view tensor" not in two.stderr  # FSDP2's warning, fixed at its cause
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(m1) == len(m2) == 3
    for r1, r2 in zip(m1, m2):
        for key in ("loss", "text_loss", "audio_loss", "grad_norm"):
            assert r1[key] == pytest.approx(r2[key], rel=1e-5, abs=1e-5), (key, r1, r2)
        assert r2["grad_norm/ttt"] > 0 and r2["grad_norm/lora"] > 0
    w1 = load_file(str(tmp_path / "one/checkpoints/step_000003/trainable.safetensors"))
    w2 = load_file(str(tmp_path / "two/checkpoints/step_000003/trainable.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-5, atol=1e-5, msg=k)
    assert '"world_size": 2' in (tmp_path / "two/checkpoints/step_000003/state.json").read_text()


@pytest.mark.slow
def test_two_processes_match_one_with_the_end_to_end_memory(dataset, tmp_path):
    """The memory's parameters stay whole on every rank (FSDP2 ignores them; their gradients
    are summed over the ranks) while its inner gradients run backward inside the forward."""
    cfg = config(tmp_path / "x", [dataset["clean"]], max_steps=3, lora={"enable": False},
                 model={"train_base": False}, data={"state_carry": "none"},
                 ttt={"kind": "e2e", "layers": "top:1", "e2e_chunk": 4,
                      "e2e_hidden": 128})  # fmt: skip
    cfg_path = tmp_path / "cfg.yaml"
    cfg.to_yaml(cfg_path)
    assert main(["train", str(cfg_path), "--no-progress", f"--set=run_dir={tmp_path / 'one'}"]) == 0
    two = _torchrun(2, cfg_path, f"run_dir={tmp_path / 'two'}", "batch_size=1")
    assert two.returncode == 0, two.stderr[-3000:]
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(m1) == len(m2) == 3
    for r1, r2 in zip(m1, m2):
        for key in ("loss", "grad_norm"):
            assert r1[key] == pytest.approx(r2[key], rel=1e-5, abs=1e-5), (key, r1, r2)
    w1 = load_file(str(tmp_path / "one/checkpoints/step_000003/trainable.safetensors"))
    w2 = load_file(str(tmp_path / "two/checkpoints/step_000003/trainable.safetensors"))
    assert w1.keys() == w2.keys() and any("e2e" in k for k in w1)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.slow
def test_a_data_limit_on_one_rank_stops_every_rank_together(dataset, tmp_path):
    """Rank r reads files r, r + 2, ... (no shuffle): rank 1 gets two good files, then missing
    ones. Both ranks stop at the same step boundary with rank 1's message and exit 2; the last
    complete checkpoint (written before the stop) is kept and named."""
    good = [json.loads(x) for x in Path(dataset["clean"]).read_text().splitlines()]
    root = Path(dataset["clean"]).parent
    files = [{**e, "path": str(root / e["path"])} for e in good]  # 4 good files
    bad = [{**good[0], "path": str(tmp_path / f"missing_{i}.wav")} for i in range(2)]
    order = [files[0], files[1], files[2], files[3], files[0], bad[0], files[2], bad[1]]
    index = tmp_path / "half_bad.jsonl"
    index.write_text("".join(json.dumps(x) + "\n" for x in order))
    cfg = config(tmp_path / "x", [str(index)], max_steps=8, ckpt_every=1, keep_last=10,
                 data={"shuffle": False, "max_bad_fraction": 0.25,
                       "state_carry": "none"})  # fmt: skip
    cfg_path = tmp_path / "cfg.yaml"
    cfg.to_yaml(cfg_path)
    proc = _torchrun(2, cfg_path, f"run_dir={tmp_path / 'two'}", "batch_size=1")
    assert proc.returncode != 0
    # one message per rank (their lines may interleave on stderr)
    stops = re.findall(r"stopped: (data: rank \d+: .*?last good checkpoint: \S+?step_\d+)",
                       proc.stderr)  # fmt: skip
    assert len(stops) == 2, proc.stderr[-3000:]
    assert all("rank 1: " in x and "unusable" in x for x in stops), stops
    same = [x.split("; skipped files")[0] for x in stops]  # each rank names its own bad list
    assert same[0] == same[1]
    assert "exitcode  : 2" in proc.stderr
    kept = sorted((tmp_path / "two" / "checkpoints").glob("step_*"))
    assert kept and all(f"last good checkpoint: {kept[-1]}" in x for x in stops), (kept, stops)


# -- guards -----------------------------------------------------------------------------------
def test_non_finite_steps_are_skipped_then_stop_the_run(dataset, tmp_path, monkeypatch):
    real = trainer_mod.forward_output_terms
    calls = {"n": 0}

    def poisoned(lm, codes, cfg):  # steps 3 and 5..: NaN loss
        calls["n"] += 1
        out, terms = real(lm, codes, cfg)
        if calls["n"] == 3 or calls["n"] >= 5:
            terms.text_sum = terms.text_sum * float("nan")
        return out, terms

    monkeypatch.setattr(trainer_mod, "forward_output_terms", poisoned)
    cfg = config(tmp_path / "run", [dataset["clean"]], max_steps=20, ckpt_every=2, max_bad_steps=3)
    with pytest.raises(TrainingStopped, match="3 non-finite steps in a row"):
        train(cfg, progress=False)
    records = metrics(tmp_path / "run")
    assert records[2]["skipped_steps"] == 1 and records[3]["skipped_steps"] == 1
    assert "step 3: non-finite" in (tmp_path / "run" / "train.log").read_text()
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept[-1] == "step_000006"  # written at step 4 and 6 (step 6 skipped, params of 4)
    ttt_names = [n for n, _ in ttt_modules(build_model(cfg, torch.device("cpu"))[0].lm)]
    assert ttt_names


def test_learning_rate_schedules_match_definitions(tmp_path):
    cfg = config(tmp_path, ["x"], max_steps=100, optim={"pct_start": 0.1, "schedule": "cosine"})
    ms = [lr_multiplier(cfg, s) for s in range(1, 101)]
    assert ms[0] == pytest.approx(1 / 11) and ms[9] == pytest.approx(10 / 11)
    assert ms[10] == pytest.approx(1.0) and ms[-1] == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 89 / 90))
    )
    cfg = config(tmp_path, ["x"], max_steps=100, optim={"pct_start": 0.1, "schedule": "onecycle"})
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=100, pct_start=0.1,
                                              cycle_momentum=False)  # fmt: skip
    for step in range(1, 101):
        assert lr_multiplier(cfg, step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        opt.step()
        ref.step() if step < 100 else None


# -- command line -----------------------------------------------------------------------------
def test_cli_typo_names_the_key_and_tokenize_then_train(dataset, tmp_path, capsys):
    cfg = config(tmp_path / "run", [dataset["clean"]], max_steps=2)
    path = tmp_path / "cfg.yaml"
    cfg.to_yaml(path)
    assert main(["train", str(path), "--set", "ttt.mini_batch=4"]) == 2
    err = capsys.readouterr().err
    assert "ttt.mini_batch" in err and "ttt.mini_batch_size" in err and "Traceback" not in err
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    shards = tmp_path / "shards"
    assert main(["tokenize", dataset["train"], str(shards), "--tiny", "--no-progress"]) == 0
    info = json.loads((shards / "shards.json").read_text())
    assert len(info["files"]) == 4 and info["skipped"][0]["reason"] == "unreadable"
    assert main(["train", str(path), "--no-progress", f"--set=data.train=[{shards}]"]) == 0
    assert len(metrics(tmp_path / "run")) == 2


def test_shipped_configs_validate_and_tiny_config_trains(tmp_path, monkeypatch, capsys):
    root = Path(__file__).resolve().parents[1]
    for path in sorted((root / "configs").glob("*.yaml")):
        cfg = TrainConfig.load(path)
        assert cfg.max_steps >= 1, path
    monkeypatch.chdir(tmp_path)
    assert main(["toy-data", "data/toy", "--files", "2", "--seconds", "2.56"]) == 0
    args = ["train", str(root / "configs/tiny.yaml"), "--no-progress", "--set=max_steps=2",
            "--set=eval_every=2", f"--set=run_dir={tmp_path / 'run'}"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "done: 2 steps" in out
    assert "note: TTT on a frozen base" not in out  # the tiny config follows the recipe
    assert [r["step"] for r in metrics(tmp_path / "run", "eval")] == [2]
    # the end-to-end memory's config meta-trains it on the frozen base
    args = ["train", str(root / "configs/tiny_e2e.yaml"), "--no-progress", "--set=max_steps=2",
            "--set=eval_every=2", f"--set=run_dir={tmp_path / 'e2e'}"]  # fmt: skip
    assert main(args) == 0
    assert "done: 2 steps" in capsys.readouterr().out
    assert [r["step"] for r in metrics(tmp_path / "e2e", "eval")] == [2]
