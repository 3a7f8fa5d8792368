"""Training checkpoints: everything ``--resume`` needs, in safetensors and JSON, written atomically.

``RUN_DIR/checkpoints/step_000123/``:

- ``trainable.safetensors``: every trainable parameter, whole (gathered from FSDP shards), fp32;
- ``optimizer.safetensors``: AdamW's ``exp_avg`` / ``exp_avg_sq`` / ``step`` per parameter name;
- ``rank{r}.safetensors``: rank r's RNG states and its carried TTT states (``state_carry``);
- ``state.json``: step, learning rates, data position of every rank, bad-step counter, world size;
- ``adapter.json`` + ``adapter.safetensors`` when only TTT/LoRA parameters train: the directory
  is then directly usable as ``--adapter`` by ``generate`` and ``eval``.

Rank 0 writes into ``checkpoints/.tmp-step_000123`` and renames it when complete, so a crash
never leaves a half-written ``step_*``; the ``keep_last`` newest are kept. A checkpoint damaged
afterwards (truncated, overwritten) is found by ``checkpoint_problem`` before anything loads it:
``find_checkpoint`` then names it and the previous complete checkpoint to use instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from ..checkpoints.adapter import adapter_parameters, save_adapter
from ..checkpoints.loading import load_safetensors, safetensors_problem
from .parallel import Dist, barrier, copy_full_, full_tensor

STEP_DIR = re.compile(r"^step_(\d{6,})$")
STATE = "state.json"
TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.safetensors"
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


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
    """Why checkpoint ``path`` cannot be used (None if it looks complete): ``state.json``
    readable, ``trainable.safetensors`` and the optimizer / rank / adapter safetensors files
    complete (headers and sizes; tensor data is not read)."""
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
    return None


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


def _gather(obj: Any, d: Dist) -> list[Any]:
    """Every rank's ``obj`` (on every rank)."""
    if not d.distributed:
        return [obj]
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def save_checkpoint(
    root: str | Path,
    step: int,
    named: list[tuple[str, nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    rank_tensors: dict[str, torch.Tensor],
    d: Dist,
    lm: nn.Module,
    keep_last: int,
) -> Path:
    """Write checkpoint ``step`` (a collective: every rank calls it). Returns its directory.

    ``named``: the trainable parameters; ``state``: JSON-able trainer state (rank 0's is
    written, with every rank's ``data`` entry gathered into a list); ``rank_tensors``: this
    rank's tensors (RNG, carried TTT state).
    """
    root = Path(root)
    params = {n: full_tensor(p.detach()).float().cpu().contiguous() for n, p in named}
    optim: dict[str, torch.Tensor] = {}
    for name, p in named:
        st = optimizer.state.get(p, {})
        for key in ADAM_KEYS:
            if key in st:
                optim[f"{name}.{key}"] = full_tensor(st[key]).float().cpu().contiguous()
        if "step" in st:
            optim[f"{name}.step"] = torch.as_tensor(st["step"]).float().cpu().reshape(1)
    data_states = _gather(state.get("data"), d)
    rank_blobs = _gather({k: v.detach().cpu().contiguous() for k, v in rank_tensors.items()}, d)
    final = step_dir(root, step)
    if d.is_main:
        tmp = root / f".tmp-{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(params, str(tmp / TRAINABLE))
        save_file(optim, str(tmp / OPTIMIZER))
        for r, blob in enumerate(rank_blobs):
            save_file(blob, str(tmp / f"rank{r}.safetensors"))
        if set(params) == set(adapter_parameters(lm)):
            save_adapter(lm, tmp, tensors=params)
        record = {**state, "step": step, "world_size": d.world_size, "data": data_states}
        (tmp / STATE).write_text(json.dumps(record, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(
    path: str | Path,
    named: list[tuple[str, nn.Parameter]],
    optimizer: torch.optim.Optimizer | None,
    d: Dist,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load parameters (and optimizer state) from checkpoint ``path`` into this rank's shards.

    Returns ``(state.json with this rank's data position as "data", this rank's tensors)``.
    A missing or extra parameter, or a shape mismatch, is a ``ValueError`` naming it.
    """
    path = Path(path)
    state = read_state(path)
    if int(state.get("world_size", 1)) != d.world_size:
        raise ValueError(
            f"{path}: written by {state['world_size']} processes, resumed with "
            f"{d.world_size}; the data position is per process: resume with the same count"
        )
    load_trainable(path, named)
    if optimizer is not None:
        optim = load_safetensors(path / OPTIMIZER, what="optimizer state")
        for name, p in named:
            if f"{name}.step" not in optim:
                continue
            st: dict[str, torch.Tensor] = {}
            for key in ADAM_KEYS:
                st[key] = torch.zeros_like(p.data)
                copy_full_(st[key], optim[f"{name}.{key}"])
            st["step"] = optim[f"{name}.step"].reshape(())
            optimizer.state[p] = st
    rank_file = path / f"rank{d.rank}.safetensors"
    tensors = load_safetensors(rank_file, what="rank state") if rank_file.is_file() else {}
    state["data"] = state["data"][d.rank]
    return state, tensors


def load_trainable(path: str | Path, named: list[tuple[str, nn.Parameter]]) -> None:
    """Copy ``path/trainable.safetensors`` into the parameters ``named`` (their shards under
    FSDP). A missing or extra name or a shape mismatch is a ``ValueError`` naming it."""
    file = Path(path) / TRAINABLE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file (is {path} a training checkpoint?)")
    params = load_safetensors(file, what="trainable parameters")
    expected = dict(named)
    missing, extra = sorted(set(expected) - set(params)), sorted(set(params) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{file}: does not match the model's trainable parameters "
            f"(missing {missing[:3]}, unexpected {extra[:3]}): was it written with this config?"
        )
    for name, p in named:
        if tuple(params[name].shape) != tuple(p.shape):
            raise ValueError(
                f"{file}: {name} has shape {tuple(params[name].shape)}, "
                f"the model expects {tuple(p.shape)}"
            )
    with torch.no_grad():
        for name, p in named:
            copy_full_(p.data, params[name])


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


def checkpoint_config(ckpt: str | Path) -> Any:
    """The ``TrainConfig`` checkpoint ``ckpt`` was written with: its ``state.json`` record, or
    (older checkpoints) its run's ``config.yaml``."""
    from .config import TrainConfig

    ckpt = Path(ckpt)
    recorded = read_state(ckpt).get("config")
    if isinstance(recorded, dict):
        try:
            return TrainConfig.from_dict(recorded)
        except ValueError as e:
            raise ValueError(f"{ckpt / STATE}: its config is not valid: {e}") from e
    return TrainConfig.load(ckpt.parent.parent / "config.yaml")


def load_trained(
    run: str | Path, device: torch.device | str = "cpu"
) -> tuple[nn.Module, Any, Any, Path]:
    """``(lm in eval mode, TrainConfig, base CheckpointInfo or None, checkpoint dir)`` of a run.

    ``run``: a run directory (its newest checkpoint) or a ``checkpoints/step_*`` directory.
    The model is rebuilt from the run's ``config.yaml`` (``build_model``: base, LoRA, TTT) and
    gets the checkpoint's trainable parameters; every parameter is then frozen.
    """
    from .model import build_model

    ckpt = find_checkpoint(run)
    cfg = checkpoint_config(ckpt)
    lm, groups, info = build_model(cfg, torch.device(device))
    load_trainable(ckpt, groups.named())
    for p in lm.parameters():
        p.requires_grad_(False)
    return lm.eval(), cfg, info, ckpt


def load_trained_model(
    run: str | Path, device: torch.device | str = "cpu"
) -> tuple[nn.Module, Any]:
    """The model a run trained, for evaluation: ``(lm in eval mode, TrainConfig)``
    (``load_trained`` without the checkpoint info and path)."""
    lm, cfg, _, _ = load_trained(run, device)
    return lm, cfg
