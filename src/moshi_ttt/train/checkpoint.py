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

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ..checkpoints.adapter import adapter_parameters, save_adapter
from ..checkpoints.loading import check_safetensors, load_safetensors, safetensors_problem
from .parallel import Dist, barrier, gather_to_main, local_rows

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
    # Gathered to rank 0 only, tensor by tensor: the other ranks never hold whole tensors.
    params: dict[str, torch.Tensor] = {}
    optim: dict[str, torch.Tensor] = {}
    for name, p in named:
        whole = gather_to_main(p, d.is_main)
        if whole is not None:
            params[name] = whole
        st = optimizer.state.get(p, {})
        for key in ADAM_KEYS:
            if key in st:
                whole = gather_to_main(st[key], d.is_main)
                if whole is not None:
                    optim[f"{name}.{key}"] = whole
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
        file = check_safetensors(path / OPTIMIZER, "optimizer state")
        with _open(file, "optimizer state") as optim:
            keys = set(optim.keys())
            for name, p in named:
                if f"{name}.step" not in keys:
                    continue
                st: dict[str, torch.Tensor] = {}
                for key in ADAM_KEYS:
                    st[key] = torch.zeros_like(p.data)
                    _read_local(optim, f"{name}.{key}", st[key])
                st["step"] = optim.get_tensor(f"{name}.step").reshape(())
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
    check_safetensors(file, "trainable parameters")
    with _open(file, "trainable parameters") as f:
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
                _read_local(f, name, p.data)


@contextlib.contextmanager
def _open(file: Path, what: str) -> Iterator[Any]:
    """``safe_open`` (CPU) with its errors as a ``ValueError`` naming the file."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            yield f
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file}: not a readable safetensors file ({what}): {e}") from e


def _read_local(f: Any, name: str, dst: torch.Tensor) -> None:
    """Copy tensor ``name`` of the open file ``f`` into ``dst``: only the rows this rank holds
    when ``dst`` is an FSDP shard (a rank never reads the whole tensor)."""
    start, end = local_rows(dst)
    if isinstance(dst, DTensor):
        local = dst.to_local()
        if end - start != (local.shape[0] if local.dim() else 0) or local.dim() == 0:
            local.copy_(distribute_tensor(f.get_tensor(name).to(local.device, local.dtype),
                                          dst.device_mesh, dst.placements).to_local())  # fmt: skip
            return
        if end > start:
            local.copy_(f.get_slice(name)[start:end].to(device=local.device, dtype=local.dtype))
        return
    dst.copy_(f.get_tensor(name).to(device=dst.device, dtype=dst.dtype))


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
