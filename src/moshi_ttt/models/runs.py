"""Training runs on disk, read without the training code: checkpoints, recorded spec, weights.

``RUN_DIR/checkpoints/step_000123/`` holds ``trainable.safetensors`` (every trainable
parameter, whole, float32), ``state.json`` (step, the run's config under ``"config"``, ...) and
the optimizer / per-rank files that only ``--resume`` reads (``train.checkpoint`` writes them
all). A checkpoint damaged afterwards (truncated, overwritten) is found by
``checkpoint_problem`` before anything loads it: ``find_checkpoint`` then names it and the
previous complete checkpoint to use instead. ``run_spec`` is the ``ModelSpec`` a checkpoint was
trained with (its ``seed`` / ``model`` / ``ttt`` / ``lora`` sections).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..schema import read_yaml
from .files import (
    check_safetensors,
    manifest_problem,
    open_safetensors,
    read_local,
    safetensors_problem,
)
from .sources import RUN_CONFIG, RUN_STATE
from .spec import ModelSpec

STEP_DIR = re.compile(r"^step_(\d{6,})$")
STATE = RUN_STATE
TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.safetensors"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:06d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    found = [p for p in found if (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def read_state(path: str | Path) -> dict[str, Any]:
    """``state.json`` of checkpoint ``path``; missing or malformed is an error naming it."""
    file = Path(path) / STATE
    if not file.is_file():
        raise FileNotFoundError(f"{path}: not a training checkpoint (no {STATE})")
    try:
        state = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e}); the checkpoint is corrupt") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError(f"{file}: expected a JSON object with an integer 'step'")
    return state


def checkpoint_problem(path: str | Path) -> str | None:
    """Why checkpoint ``path`` cannot be used (None if it is complete): ``state.json``
    readable, ``trainable.safetensors`` and the optimizer / rank / adapter safetensors files
    complete (headers and sizes), then every file's bytes against the sha256 of its
    ``manifest.json`` (checkpoints written before manifests: the first checks only)."""
    path = Path(path)
    try:
        state = read_state(path)
    except (OSError, ValueError) as e:
        return str(e)
    if not (path / TRAINABLE).is_file():
        return f"{path / TRAINABLE}: missing"
    names = [TRAINABLE, OPTIMIZER, "adapter.safetensors"]
    names += [f"rank{r}.safetensors" for r in range(int(state.get("world_size", 1) or 1))]
    for name in names:
        if (path / name).is_file():
            problem = safetensors_problem(path / name)
            if problem is not None:
                return f"{path / name}: {problem}"
    return manifest_problem(path)  # every byte, against the sha256 written with it


def previous_good_checkpoint(root: str | Path, before: Path) -> Path | None:
    """The newest checkpoint under ``root`` older than ``before`` that has no problem."""
    found = list_checkpoints(root)
    older = found[: found.index(before)] if before in found else []
    return next((p for p in reversed(older) if checkpoint_problem(p) is None), None)


class CorruptCheckpoint(ValueError):
    """A checkpoint that cannot be loaded; ``previous`` is the newest good one before it."""

    def __init__(self, path: Path, problem: str, previous: Path | None, use: str) -> None:
        hint = (
            f"the previous complete checkpoint is {previous}: {use} {previous} to continue from it"
            if previous is not None
            else "no earlier complete checkpoint exists"
        )
        super().__init__(f"checkpoint {path} is corrupt ({problem}); {hint}")
        self.path, self.problem, self.previous = path, problem, previous


def find_checkpoint(run: str | Path, use: str = "name") -> Path:
    """The checkpoint ``run`` names: ``run`` itself if it is a ``checkpoints/step_*`` directory,
    else the newest complete checkpoint of the run directory ``run``; checked
    (``checkpoint_problem``) before anything loads it.

    Raises ``FileNotFoundError`` naming the path when there is none, ``CorruptCheckpoint``
    (naming it, its problem and the previous good checkpoint, "``use`` PREVIOUS") when it is
    damaged.
    """
    run = Path(run)
    if (run / STATE).is_file():
        ckpt = run
    elif not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run or checkpoint directory")
    else:
        found = latest_checkpoint(run / "checkpoints")
        if found is None:
            raise FileNotFoundError(f"{run}: no checkpoint (expected {run}/checkpoints/step_*)")
        ckpt = found
    problem = checkpoint_problem(ckpt)
    if problem is not None:
        raise CorruptCheckpoint(ckpt, problem, previous_good_checkpoint(ckpt.parent, ckpt), use)
    return ckpt


def load_trainable(path: str | Path, named: list[tuple[str, nn.Parameter]]) -> None:
    """Copy ``path/trainable.safetensors`` into the parameters ``named`` (their shards under
    FSDP). A missing or extra name or a shape mismatch is a ``ValueError`` naming it."""
    file = Path(path) / TRAINABLE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file (is {path} a training checkpoint?)")
    check_safetensors(file, "trainable parameters")
    with open_safetensors(file, "trainable parameters") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        expected = dict(named)
        missing, extra = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
        if missing or extra:
            raise ValueError(
                f"{file}: does not match the model's trainable parameters "
                f"(missing {missing[:3]}, unexpected {extra[:3]}): was it written with this "
                "config?"
            )
        for name, p in named:
            if shapes[name] != tuple(p.shape):
                raise ValueError(
                    f"{file}: {name} has shape {shapes[name]}, the model expects {tuple(p.shape)}"
                )
        with torch.no_grad():
            for name, p in named:
                read_local(f, name, p.data)


def recorded_config(ckpt: str | Path) -> tuple[dict[str, Any], Path]:
    """``(the config checkpoint ckpt was written with, as a mapping; the file it is read from)``:
    its ``state.json`` record, or (older checkpoints) its run's ``config.yaml``."""
    ckpt = Path(ckpt)
    recorded = read_state(ckpt).get("config")
    if isinstance(recorded, dict):
        return recorded, ckpt / STATE
    path = ckpt.parent.parent / RUN_CONFIG
    return read_yaml(path), path


def run_spec(ckpt: str | Path) -> ModelSpec:
    """The ``ModelSpec`` checkpoint ``ckpt`` was trained with; an invalid record is a
    ``ValueError`` naming the file."""
    data, where = recorded_config(ckpt)
    try:
        return ModelSpec.from_dict(data)
    except ValueError as e:
        raise ValueError(f"{where}: its config is not valid: {e}") from e
