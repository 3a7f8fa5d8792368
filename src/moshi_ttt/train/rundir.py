"""A training run's directory and checkpoints, seen from the loop in ``trainer``: a fresh or
resumed run directory, the preflight checks from config files (TTT layers against the base, the
data paths), the differences a resume may not have, saving a checkpoint with its RNG state.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from ..data.files import BAD_FILES, read_index
from ..data.pipeline import ShardSource, WindowLoader
from ..integration.carry import StateCarry
from ..models.load import describe_spec
from ..models.runs import read_state
from ..models.spec import LoadedModel
from ..outputs import existing
from .checkpoint import (
    CorruptCheckpoint,
    checkpoint_config,
    find_checkpoint,
    list_checkpoints,
    save_checkpoint,
)
from .config import TrainConfig
from .parallel import (
    Dist,
)
from .steps import is_shards, lr_multiplier

RUN_FILES = ("config.yaml", "metrics.jsonl", "train.log", "tensorboard", "checkpoints", BAD_FILES)


# Keys that do not change what a resumed run computes (all others must match the checkpoint's).
RESUME_FREE_KEYS = (
    "run_dir", "log_every", "eval_every", "eval_max_batches", "ckpt_every", "keep_last",
    "max_bad_steps", "data.eval", "data.num_workers", "data.max_bad_fraction",
    "data.encode_chunk_sec", "model.gradient_checkpointing",
)  # fmt: skip


def check_fresh_run_dir(
    run_dir: Path, overwrite: bool, cfg: TrainConfig | None = None
) -> str | None:
    """A new run must not mix with (or replace) a previous one without ``overwrite``.

    A ``run_dir`` that holds a run of ``cfg``'s config that wrote no checkpoint (interrupted
    before its first) is started again from step 0: the line that says so (else None)."""
    if list_checkpoints(run_dir / "checkpoints") and not overwrite:
        raise ValueError(
            f"run_dir {run_dir}: {run_dir / 'checkpoints'} already holds checkpoints: pass "
            "--resume to continue that run, --force to start afresh (deletes it), or choose "
            "another run_dir"
        )
    found = existing(run_dir, RUN_FILES)
    if not found or overwrite:
        return None
    line = restartable(run_dir, cfg, "") if cfg is not None else None
    if line is not None:
        return line
    raise ValueError(
        f"run_dir {run_dir}: already holds a run ({', '.join(found)}): pass --resume to "
        "continue it, --force to start afresh (deletes those), or choose another run_dir"
    )


def restartable(run_dir: Path, cfg: TrainConfig, flag: str) -> str | None:
    """For a ``run_dir`` with no checkpoint: the line that says it starts again from step 0
    when its ``config.yaml`` is ``cfg``'s (up to ``RESUME_FREE_KEYS``), None when it has no
    config; a ``ValueError`` naming the differences when it has another config."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        before = TrainConfig.load(path)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"run_dir {run_dir}: holds a run with no checkpoint whose {path.name} cannot be "
            f"read ({e}): pass --force to start afresh (deletes it), or choose another run_dir"
        ) from None
    differences = config_differences(before, cfg)
    if differences:
        raise ValueError(
            f"run_dir {run_dir}: holds another run (no checkpoint; its config.yaml differs: "
            f"{'; '.join(differences)}): pass --force to start afresh with this config "
            "(deletes it), or choose another run_dir"
        )
    return (
        f"{flag + ': ' if flag else ''}run_dir {run_dir} holds a run of this config that wrote "
        "no checkpoint (interrupted before its first): starting it again from step 0"
    )


def clear_run_dir(run_dir: Path) -> None:
    for name in (*RUN_FILES, *[p.name for p in run_dir.glob("bad_files.rank*.json")]):
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def checkpoint_to_resume(run_dir: Path, resume: bool | str | Path) -> Path | None:
    """The checkpoint to resume from (checked complete), None for a new run."""
    if not resume:
        return None
    if resume is not True:
        ckpt = Path(resume)
        if not (ckpt / "state.json").is_file():
            raise FileNotFoundError(
                f"--resume-from {ckpt}: not a checkpoint directory (expected "
                f"{run_dir}/checkpoints/step_* with a state.json)"
            )
        return find_checkpoint(ckpt, use="pass --resume-from")
    root = run_dir / "checkpoints"
    if not list_checkpoints(root):
        raise FileNotFoundError(
            f"--resume: no checkpoint in {root} and no config.yaml of an earlier run in "
            f"{run_dir}: drop --resume to start this run"
        )
    try:
        return find_checkpoint(run_dir, use="pass --resume-from")
    except CorruptCheckpoint as e:
        raise ValueError(f"--resume: {e}") from e


def check_ttt_layers_against_base(cfg: TrainConfig) -> None:
    """``ttt.layers`` against the base's layer count, from its config files (no weights)."""
    if cfg.ttt is None:
        return
    if cfg.model.source == "local" and not Path(str(cfg.model.path)).is_dir():
        raise FileNotFoundError(
            f"model.path: {cfg.model.path!r} is not a checkpoint or run directory"
        )
    num_layers = describe_spec(cfg.spec).lm_kwargs.get("num_layers")
    if isinstance(num_layers, int):
        cfg.check_ttt_layers(num_layers)


def check_data_paths(cfg: TrainConfig) -> None:
    """Every ``data.train`` / ``data.eval`` index or shards directory exists and parses (the
    index files only, no audio), before the model is built."""
    for key, paths in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        for path in paths:
            try:
                ShardSource(path) if is_shards(path) else read_index(path)
            except (OSError, ValueError) as e:
                raise type(e)(f"{key}: {e}") from None


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): data}


def resume_differences(ckpt: Path, cfg: TrainConfig) -> list[str]:
    """``"key: CHECKPOINT -> NOW"`` for every setting that differs from the checkpoint's
    config and changes the data order, shapes or results (not in ``RESUME_FREE_KEYS``)."""
    before = checkpoint_config(ckpt)
    return config_differences(before, cfg, int(read_state(ckpt)["step"]), "in the checkpoint")


def config_differences(before: TrainConfig, cfg: TrainConfig, step: int | None = None,
                       where: str = "in run_dir's config.yaml") -> list[str]:  # fmt: skip
    """Every setting of ``cfg`` that differs from ``before`` (not in ``RESUME_FREE_KEYS``);
    with ``step`` (a checkpoint's), a ``max_steps`` that keeps those steps exact is no
    difference."""
    old = _flat(before.to_dict())
    new = _flat(cfg.to_dict())
    keys = sorted(set(old) | set(new))
    free = tuple(RESUME_FREE_KEYS)
    out = []
    for k in keys:
        if old.get(k) == new.get(k) or k.startswith(free):
            continue
        line = f"{k}: {old.get(k)!r} {where}, {new.get(k)!r} now"
        if k == "max_steps" and step is not None:
            why = _max_steps_change(before, cfg, step)
            if why is None:
                continue  # an exact continuation: the steps already trained are unchanged
            line += f" ({why})"
        out.append(line)
    return out


def _max_steps_change(before: TrainConfig, cfg: TrainConfig, step: int) -> str | None:
    """None when resuming at ``step`` with ``cfg.max_steps`` is exact: the learning rate of
    every step already trained (1..``step``) is the same under both configs, so the run is the
    one ``cfg`` would train from scratch (the data order does not depend on ``max_steps``).
    Otherwise why not, and what to do instead."""
    if all(lr_multiplier(before, s) == lr_multiplier(cfg, s) for s in range(1, step + 1)):
        return None
    schedule = cfg.optim.schedule
    if schedule == "constant":
        cause = "its warm-up lasts pct_start x max_steps steps"
    else:
        cause = f"the {schedule} schedule decays over max_steps"
    return (
        f"the learning rate of the {step} steps already trained depends on max_steps: {cause}; "
        "pass --allow-inexact-resume to continue on the new schedule, or start a new run "
        "from this checkpoint (moshi-ttt export CHECKPOINT --out DIR, then train with "
        "model.source=local and model.path=DIR); a schedule that extends exactly is "
        "optim.schedule=constant with optim.pct_start=0"
    )


def save_run_checkpoint(root: Path, step: int, named: list, optimizer: torch.optim.Optimizer,
          loader: WindowLoader, carry: StateCarry | None, skipped: int, param_groups: list,
          d: Dist, model: LoadedModel, cfg: TrainConfig) -> Path:  # fmt: skip
    rank_tensors = rng_state(d)
    if carry is not None:
        rank_tensors.update({f"carry.{k}": v for k, v in carry.state_dict().items()})
    state = {
        "data": loader.state_dict(),
        "skipped_steps": skipped,
        "lr": {g["name"]: g["lr"] for g in param_groups},
        "config": cfg.to_dict(),
    }
    return save_checkpoint(root, step, named, optimizer, state, rank_tensors, d, model,
                           cfg.keep_last)  # fmt: skip


def rng_state(d: Dist) -> dict[str, torch.Tensor]:
    out = {"rng.cpu": torch.get_rng_state()}
    if d.device.type == "cuda":
        out["rng.cuda"] = torch.cuda.get_rng_state(d.device)
    return out


def restore_rng(tensors: dict[str, torch.Tensor], d: Dist) -> None:
    if "rng.cpu" in tensors:
        torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and d.device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], d.device)
