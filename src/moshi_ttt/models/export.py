"""Exports: a trained run (``export_run``) or an adapter on its base (``export_merged``) -> one
directory moshi-ttt loads as a base.

The directory holds ``model.safetensors`` (every weight, LoRA merged into the base linears) and
``config.json`` (moshi's LM kwargs + a ``"moshi_ttt"`` entry recording the TTT layers, so they
are rebuilt on load; the Mimi and tokenizer files of a non-tiny base are copied beside them). It
is ``model.source: local`` / ``--base`` for a new run (``load.load_merged``); plain moshi
cannot load it when it has TTT layers.

``moshi_ttt`` entry: ``format_version``, ``base`` (what the run trained on: ``tiny:SEED``, a repo
id, a directory), ``codec`` (``tiny:SEED`` or the source of Mimi/tokenizer), ``ttt_config`` (a
``TTTConfig`` dict whose ``layers`` is the layer list) and ``ttt_layers``, ``lora_merged``
(``{"rank", "scaling"}`` or null), ``exported_from`` (the checkpoint directory) and ``step``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .adapter import read_adapter, write_merged
from .load import describe_base, describe_spec, load_adapter, load_run


def export_run(
    run: str | Path,
    out_dir: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    copy_codec: bool = True,
) -> Path:
    """Write run ``run``'s trained model (newest checkpoint, or a ``step_*`` dir) to ``out_dir``.

    ``dtype``: of the written weights (None: as the run's model loads on ``device``, float32 on
    CPU); LoRA is merged before any cast. ``copy_codec``: copy the base's Mimi weights and
    tokenizer when it has files (tiny bases have none). Existing files of the same names in
    ``out_dir`` are replaced (``config.json``, which marks a complete export, is written last).
    Returns ``out_dir``.
    """
    model, ckpt = load_run(run, device)
    record = describe_spec(model.spec)  # config files only: no second weight load
    step = int(ckpt.name.removeprefix("step_")) if ckpt.name.startswith("step_") else None
    return write_merged(model.lm, out_dir, record, model.base, copy_codec, dtype,
                        exported_from=str(ckpt.resolve()), step=step)  # fmt: skip


def export_merged(
    adapter_dir: str | Path,
    out_dir: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    copy_codec: bool = True,
) -> Path:
    """Base + adapter -> one directory (``model.safetensors``, ``config.json``); LoRA merged.

    ``copy_codec``: copy the base's Mimi weights and tokenizer next to it (when it has them).
    """
    meta, _ = read_adapter(adapter_dir)
    model = load_adapter(adapter_dir, device=device, dtype=dtype)
    return write_merged(model.lm, out_dir, describe_base(meta["base"]), meta["base"], copy_codec)
