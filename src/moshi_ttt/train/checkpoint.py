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
``find_checkpoint`` then names it and the previous complete checkpoint to use instead (both in
``models.runs``, which reads a run without the training code).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from ..models.adapter import adapter_parameters, save_adapter
from ..models.files import (
    check_safetensors,
    load_safetensors,
    open_safetensors,
    read_local,
    write_manifest,
)
from ..models.load import load_run
from ..models.runs import (
    OPTIMIZER,
    STATE,
    TRAINABLE,
    CorruptCheckpoint,
    find_checkpoint,
    list_checkpoints,
    load_trainable,
    read_state,
    recorded_config,
    step_dir,
)
from ..models.spec import LoadedModel
from .config import TrainConfig
from .parallel import Dist, barrier, gather_to_main

__all__ = [  # the run-directory readers live in models.runs; re-exported for the trainer
    "CorruptCheckpoint",
    "checkpoint_config",
    "find_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_trainable",
    "load_trained",
    "load_trained_model",
    "read_state",
    "save_checkpoint",
    "step_dir",
]
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


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
    model: LoadedModel,
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
        if set(params) == set(adapter_parameters(model.lm)):
            save_adapter(model, tmp, tensors=params)
        record = {**state, "step": step, "world_size": d.world_size, "data": data_states}
        (tmp / STATE).write_text(json.dumps(record, indent=1))
        write_manifest(tmp, [f.name for f in tmp.iterdir() if f.is_file()])  # last
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
        with open_safetensors(file, "optimizer state") as optim:
            keys = set(optim.keys())
            for name, p in named:
                if f"{name}.step" not in keys:
                    continue
                st: dict[str, torch.Tensor] = {}
                for key in ADAM_KEYS:
                    st[key] = torch.zeros_like(p.data)
                    read_local(optim, f"{name}.{key}", st[key])
                st["step"] = optim.get_tensor(f"{name}.step").reshape(())
                optimizer.state[p] = st
    rank_file = path / f"rank{d.rank}.safetensors"
    tensors = load_safetensors(rank_file, what="rank state") if rank_file.is_file() else {}
    state["data"] = state["data"][d.rank]
    return state, tensors


def checkpoint_config(ckpt: str | Path) -> TrainConfig:
    """The ``TrainConfig`` checkpoint ``ckpt`` was written with: its ``state.json`` record, or
    (older checkpoints) its run's ``config.yaml``."""
    data, where = recorded_config(ckpt)
    if where.name != STATE:
        return TrainConfig.load(where)
    try:
        return TrainConfig.from_dict(data)
    except ValueError as e:
        raise ValueError(f"{where}: its config is not valid: {e}") from e


def load_trained(
    run: str | Path, device: torch.device | str = "cpu"
) -> tuple[LoadedModel, TrainConfig, Path]:
    """``(the model a run trained, in eval mode; its TrainConfig; its checkpoint directory)``
    (``models.load.load_run``, with the run's whole training config)."""
    model, ckpt = load_run(run, device)
    return model, checkpoint_config(ckpt), ckpt


def load_trained_model(
    run: str | Path, device: torch.device | str = "cpu"
) -> tuple[nn.Module, TrainConfig]:
    """The model a run trained, for evaluation: ``(lm in eval mode, TrainConfig)``
    (``load_trained``: the bare module)."""
    model, cfg, _ = load_trained(run, device)
    return model.lm, cfg
