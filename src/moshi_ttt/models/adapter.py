"""Adapters (what fine-tuning trained) and merged checkpoints. Safetensors and JSON only.

An adapter directory holds

- ``adapter.safetensors``: the TTT parameters and gates (``named_ttt_parameters``: gated
  TTT branches and In-Place TTT) and the LoRA weights if any (``lora_A`` / ``lora_B`` of every
  moshi ``LoRALinear``), under their names in the LM's state dict; both found by module type;
- ``adapter.json``: ``format``/``format_version``, ``base`` (the repo id, local directory or
  ``"tiny:SEED"`` it was trained on), ``base_arch`` (sizes of that model), ``ttt_config`` (a
  ``TTTConfig`` dict), ``ttt_layers`` (the converted layer indices), ``lora``
  (``{"rank", "scaling"}`` or null), ``tensors`` (name -> shape, dtype) and the ``sha256`` of
  ``adapter.safetensors``.

``export.export_merged`` (an adapter on its base) and ``export.export_run`` (a training run)
write one
directory with ``write_merged``: ``model.safetensors`` with every weight, LoRA merged into the
base weights; ``config.json`` = the LM kwargs + a ``"moshi_ttt"`` entry with the TTT config;
Mimi and the tokenizer copied when the base has them. ``load.load_merged`` and
``load.load_base_lm`` load it; plain moshi cannot (the TTT keys are unknown to it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from moshi.models.lm import LMModel
from moshi.modules.lora import replace_lora_with_linear
from safetensors.torch import save_file
from torch import nn

from ..integration.apply import apply_ttt, named_ttt_parameters, ttt_modules
from ..integration.config import TTTConfig
from .build import recorded_ttt_config
from .files import (
    check_tensors,
    load_safetensors,
    read_json,
    require_file,
    sha256_file,
    write_manifest,
)
from .lora import apply_lora, lora_modules, lora_settings
from .sources import MERGED_KEY, MERGED_WEIGHTS, BaseRecord
from .spec import LoadedModel

WEIGHTS_NAME = "adapter.safetensors"
META_NAME = "adapter.json"
FORMAT = "moshi-ttt-adapter"
FORMAT_VERSION = 1


# -- what an adapter holds --------------------------------------------------------------------
def adapter_parameters(lm: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Name -> parameter of everything an adapter stores: TTT parameters and LoRA A/B."""
    params = dict(named_ttt_parameters(lm))
    for name, module in lora_modules(lm):
        params[f"{name}.lora_A.weight"] = module.lora_A.weight
        params[f"{name}.lora_B.weight"] = module.lora_B.weight
    return params


def base_arch(lm: LMModel) -> dict[str, int]:
    """The sizes that an adapter's base model must have."""
    return {
        "dim": int(lm.dim),
        "num_layers": len(lm.transformer.layers),
        "num_heads": int(lm.transformer.layers[0].self_attn.num_heads),
        "card": int(lm.card),
        "text_card": int(lm.text_card),
        "n_q": int(lm.n_q),
        "dep_q": int(lm.dep_q),
    }


def ttt_record(lm: torch.nn.Module) -> tuple[dict[str, Any] | None, list[int] | None]:
    """``(TTTConfig dict with layers = the converted layer list, that list)``, (None, None)
    without TTT layers."""
    if not ttt_modules(lm):
        return None, None
    config = getattr(lm, "ttt_config", None)
    if not isinstance(config, TTTConfig):
        raise ValueError("the model has TTT modules but no ttt_config: convert it with apply_ttt")
    layers = [int(i) for i in lm.ttt_layers]
    return {**config.to_dict(), "layers": layers}, layers


# -- save -------------------------------------------------------------------------------------
def save_adapter(
    model: LoadedModel | nn.Module,
    out_dir: str | Path,
    base: str | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``adapter.safetensors`` + ``adapter.json`` into ``out_dir``; returns the directory.

    ``model``: a ``LoadedModel`` (its ``base`` is recorded) or a bare module with ``base``
    given. ``base``: the base model id/path/``"tiny:SEED"`` (default: ``model.base``).
    ``tensors``: the adapter's whole tensors by name when the model's own are sharded (FSDP);
    default: read from the model. Tensors keep their dtype; the JSON is written last.
    """
    lm = model.lm if isinstance(model, LoadedModel) else model
    if base is None and isinstance(model, LoadedModel):
        base = model.base
    if not base:
        raise ValueError("save_adapter needs the base model id or path (base=...)")
    ttt_config, ttt_layers = ttt_record(lm)
    params = adapter_parameters(lm)
    if not params:
        raise ValueError("nothing to save: the model has neither TTT layers nor LoRA adapters")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tensors is None:
        tensors = {k: p.detach().to("cpu").contiguous() for k, p in sorted(params.items())}
    elif sorted(tensors) != sorted(params):
        raise ValueError(f"save_adapter: tensors {sorted(tensors)[:3]}... are not the adapter's")
    else:
        tensors = {k: tensors[k].detach().to("cpu").contiguous() for k in sorted(tensors)}
    weights = out / WEIGHTS_NAME
    save_file(tensors, str(weights), metadata={"format": "pt", "moshi_ttt": FORMAT})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base": str(base),
        "base_arch": base_arch(lm),
        "ttt_config": ttt_config,
        "ttt_layers": ttt_layers,
        "lora": lora_settings(lm),
        "tensors": {
            k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            for k, t in tensors.items()
        },
        "sha256": sha256_file(weights),
    }
    (out / META_NAME).write_text(json.dumps(meta, indent=1) + "\n")
    return out


# -- load -------------------------------------------------------------------------------------
def read_adapter(adapter_dir: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Validated ``adapter.json`` and the tensors of ``adapter.safetensors`` (on CPU)."""
    root = Path(adapter_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"adapter directory not found: {root}")
    meta_path = require_file(root / META_NAME, "adapter metadata")
    weights = require_file(root / WEIGHTS_NAME, "adapter weights")
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: not a moshi-ttt adapter (expected format {FORMAT!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{meta_path}: format_version {version!r} is not supported (<= {FORMAT_VERSION})"
        )
    missing = [k for k in ("base", "tensors", "sha256", "ttt_config", "ttt_layers", "lora")
               if k not in meta]  # fmt: skip
    if missing:
        raise ValueError(f"{meta_path}: missing fields {missing}")
    if sha256_file(weights, cache=False) != meta["sha256"]:
        raise ValueError(
            f"{weights}: checksum differs from {META_NAME} (corrupt or from another adapter)"
        )
    tensors = load_safetensors(weights)
    if sorted(tensors) != sorted(meta["tensors"]):
        diff = sorted(set(tensors) ^ set(meta["tensors"]))
        raise ValueError(f"{weights}: tensors differ from those listed in {META_NAME}: {diff[:3]}")
    return meta, tensors


def apply_adapter(
    lm: LMModel, adapter_dir: str | Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> LMModel:
    """Put an adapter (``read_adapter``'s ``meta`` and ``tensors``) on ``lm``; returns ``lm``.

    LoRA and TTT are applied as recorded (LoRA on the base linears only, TTT on the recorded
    layer indices) unless ``lm`` already has them with the same settings, then every adapter
    tensor is loaded strictly: a missing or extra key, a shape or size mismatch is a
    ``ValueError`` naming it (``lm`` may then be left with LoRA/TTT applied: load a fresh one).
    """
    where = f"adapter {adapter_dir}"
    _check_layers(lm, meta, where)
    if meta["lora"] is not None and not lora_modules(lm):
        apply_lora(lm, rank=int(meta["lora"]["rank"]), scaling=float(meta["lora"]["scaling"]))
    elif lora_settings(lm) != meta["lora"]:
        raise ValueError(f"{where}: LoRA {meta['lora']} but the model has {lora_settings(lm)}")
    config = recorded_ttt_config(meta)
    if config is not None:
        if not ttt_modules(lm):
            apply_ttt(lm, config)
        elif not _same_ttt(lm, config):
            raise ValueError(f"{where}: the model already has other TTT layers or settings")
    elif ttt_modules(lm):
        raise ValueError(f"{where}: the adapter has no TTT layers but the model has some")
    params = adapter_parameters(lm)
    check_tensors(params, tensors, f"{adapter_dir}/{WEIGHTS_NAME}")
    _check_arch(lm, meta, where)
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].device))
    return lm


def _same_ttt(lm: LMModel, config: TTTConfig) -> bool:
    have, layers = ttt_record(lm)
    want = config.to_dict()
    return layers == want.pop("layers") and {k: v for k, v in have.items() if k != "layers"} == want


def _check_layers(lm: LMModel, meta: dict[str, Any], where: str) -> None:
    n = len(lm.transformer.layers)
    layers = meta["ttt_layers"] or []
    bad = [i for i in layers if not 0 <= int(i) < n]
    had = (meta.get("base_arch") or {}).get("num_layers", "?")
    if bad:
        raise ValueError(
            f"{where}: TTT layers {bad} out of range: the base model has {n} layers "
            f"(indices 0..{n - 1}); the adapter's base had {had}"
        )


def _check_arch(lm: LMModel, meta: dict[str, Any], where: str) -> None:
    for key, value in (meta.get("base_arch") or {}).items():
        have = base_arch(lm).get(key)
        if have != value:
            raise ValueError(f"{where}: made for a base with {key}={value}, this one has {have}")


# -- merged checkpoints -------------------------------------------------------------------------
def write_merged(
    lm: LMModel,
    out_dir: str | Path,
    record: BaseRecord,
    base: str,
    copy_codec: bool = True,
    dtype: torch.dtype | None = None,
    **entry: Any,
) -> Path:
    """Write ``lm`` as a merged directory: its LoRA merged (in place: ``lm`` is changed), cast to
    ``dtype`` (None: as it is), ``model.safetensors`` then ``config.json`` (LM kwargs of
    ``record``, a ``"moshi_ttt"`` entry with ``base``, the codec, the TTT layers, the merged
    LoRA and the ``entry`` fields). Files of the same names in ``out_dir`` are replaced; the
    config, which marks a complete directory, is removed first and written last.
    """
    lora = lora_settings(lm)
    replace_lora_with_linear(lm)  # W + scaling * B A
    if dtype is not None:
        lm.to(dtype=dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").unlink(missing_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in lm.state_dict().items()}
    save_file(state, str(out / MERGED_WEIGHTS), metadata={"format": "pt"})
    config: dict[str, Any] = dict(record.lm_kwargs)
    config["moshi_name"] = MERGED_WEIGHTS
    info = record.info
    if info is not None:
        if info.lm_gen_config:
            config["lm_gen_config"] = info.lm_gen_config
        for key, src in (("mimi_name", info.mimi_weights), ("tokenizer_name", info.tokenizer)):
            if copy_codec and Path(src).is_file():
                if Path(src).resolve() != (out / Path(src).name).resolve():
                    shutil.copy2(src, out / Path(src).name)
                config[key] = Path(src).name
    ttt_config, ttt_layers = ttt_record(lm)
    config[MERGED_KEY] = {
        "format_version": FORMAT_VERSION,
        "base": str(base),
        "codec": record.codec,
        "ttt_config": ttt_config,
        "ttt_layers": ttt_layers or [],
        "lora_merged": lora,
        **entry,
    }
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    names = [MERGED_WEIGHTS, "config.json"]
    names += [config[k] for k in ("mimi_name", "tokenizer_name") if k in config]
    write_manifest(out, names)  # last: every file's sha256, checked when it is loaded
    return out
