"""The one place a model comes from: a source or a ``ModelSpec`` -> a module on a device.

- ``load_base_lm(source)``: a base (sources in ``models.sources``): tiny, Hub repo, checkpoint
  directory, export (``load_merged``), or a training run as a frozen base (``load_run_base``);
- ``build(spec, device)``: the model a ``ModelSpec`` describes (base, LoRA, TTT), which
  ``train`` then selects trainables in and ``load_run`` fills with a run's trained weights;
- ``base_structure(spec)`` / ``read_base_tensors``: a base on the meta device and its weights
  file read a batch of tensors at a time (the sharded load, ``train.model``);
- ``load_adapter(dir)``: an adapter on the base it names;
- ``describe_base`` / ``describe_spec`` / ``describe_run``: the same, from config files only;
- ``load_codec`` / ``codec_for_source``: the Mimi and tokenizer that go with a model.

Each returns a ``LoadedModel``: the module with its ``CheckpointInfo``, ``base`` (what it was
loaded from, what an adapter trained on it names as its base) and ``codec`` (``"tiny:SEED"`` or
the source whose Mimi/tokenizer go with it, for ``load_codec``); nothing is set on the module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from moshi.models import loaders
from moshi.models.compression import MimiModel
from moshi.models.lm import LMModel
from moshi.modules.lora import replace_lora_with_linear

from ..integration.tiny import build_tiny_lm, tiny_lm_kwargs
from .adapter import WEIGHTS_NAME, apply_adapter, read_adapter
from .build import add_lora_and_memory, mark_trained, meta_base
from .codec import load_codec_files
from .files import (
    check_tensors,
    load_safetensors,
    manifest_problem,
    no_pickle_loads,
    open_safetensors,
    tensor_shapes,
)
from .lora import apply_lora, base_key
from .runs import TRAINABLE, find_checkpoint, load_trainable, read_state, run_spec
from .sources import (
    DEFAULT_REPO,
    MERGED_KEY,
    BaseRecord,
    checkpoint_info,
    codec_of,
    is_run_dir,
    lm_kwargs_of,
    model_errors,
    no_overrides,
    tiny_seed,
)
from .spec import LoadedModel, ModelSpec, Origin, resolve_dtype


def load_base_lm(
    source: str | Path = DEFAULT_REPO,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    lora: dict[str, Any] | None = None,
    overrides: Mapping[str, str | Path | None] | None = None,
    *,
    legacy_7b: bool = False,
) -> LoadedModel:
    """Load a base Moshi LM (eval mode, ``dtype`` on ``device``) with its ``CheckpointInfo``
    (None for tiny models and runs trained on one); sources in ``models.sources``.

    ``lora``: ``{"rank": r, "scaling": s}`` adds fresh LoRA adapters to the base linears
    (``apply_lora``). A LoRA stored in the checkpoint itself (moshi-finetune's ``lora_name``) is
    merged into the base weights, as is the LoRA a run trained.
    """
    seed = tiny_seed(str(source))
    if seed is not None:
        no_overrides(overrides, source)
        lm = build_tiny_lm(seed).to(device=device, dtype=dtype)
        model = LoadedModel(lm, None, str(source), f"tiny:{seed}", origin=_tiny_origin(seed))
    elif is_run_dir(source):
        no_overrides(overrides, source)
        model = load_run_base(source, device=device, dtype=dtype)
    else:
        info = checkpoint_info(source, overrides, legacy_7b=legacy_7b)
        if info.raw_config and MERGED_KEY in info.raw_config:
            return load_merged(source, device=device, dtype=dtype, lora=lora, info=info)
        with no_pickle_loads(), model_errors(source):
            lm = info.get_moshi(device=device, dtype=dtype, fuse_lora=True)
        model = _checkpoint_model(lm, source, info)
    if lora:
        apply_lora(model.lm, **lora)
    model.lm.eval()
    return model


def load_merged(
    directory: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    lora: dict[str, Any] | None = None,
    info: loaders.CheckpointInfo | None = None,
) -> LoadedModel:
    """Load an exported directory (``moshi-ttt export``, ``export_merged``): built on the meta
    device, TTT applied, every weight loaded strictly with ``assign``. ``lora``: fresh LoRA
    adapters to add (``apply_lora``); ``info``: its ``CheckpointInfo`` if already read."""
    model = _merged_structure(Path(directory), dtype, info)
    lm, info = model.lm, model.info
    assert info is not None
    state = load_safetensors(info.moshi_weights, device)
    check_tensors(lm.state_dict(), state, str(info.moshi_weights))
    state = {key: as_moshi_loads(key, value, dtype) for key, value in state.items()}
    lm.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*lm.named_parameters(), *lm.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{info.moshi_weights}: no values for {left[:3]}")
    if lora:
        apply_lora(lm, **lora)
    model.lm = lm.eval()
    return model


def _merged_structure(
    root: Path, dtype: torch.dtype, info: loaders.CheckpointInfo | None = None
) -> LoadedModel:
    """An export's model on the meta device (TTT layers as recorded), its bytes checked
    against its manifest first; no weights read."""
    problem = manifest_problem(root)  # every byte as written (exports since manifests)
    if problem is not None:
        raise ValueError(f"{problem}; export the run again (moshi-ttt export)")
    info = info if info is not None else checkpoint_info(root)
    merged = (info.raw_config or {}).get(MERGED_KEY)
    if not isinstance(merged, dict) or "ttt_layers" not in merged:
        raise ValueError(f"{root}/config.json: not a merged moshi-ttt checkpoint (no {MERGED_KEY})")
    with model_errors(root):
        lm = meta_base(lm_kwargs_of(root, info), merged, dtype)
    origin = Origin("export", str(root), None, str(root.resolve()), files=_info_files(info))
    return LoadedModel(lm, info, str(root.resolve()), codec_of(root, info), origin=origin)


def _checkpoint_model(lm: LMModel, source: str | Path, info: loaders.CheckpointInfo) -> LoadedModel:
    """``lm`` loaded from a checkpoint directory or Hub repo, with where it comes from."""
    local = Path(source).is_dir()
    resolved = str(Path(source).resolve()) if local else str(source)
    origin = Origin("local" if local else "hf", str(source), None,
                    resolved if local else None, files=_info_files(info))  # fmt: skip
    return LoadedModel(lm, info, resolved, resolved, origin=origin)


def as_moshi_loads(key: str, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A stored tensor as moshi's ``get_moshi_lm`` loads it: floating point in ``dtype``,
    except the conditioners' (``condition_provider.``, ``fuser.``) in float32."""
    if not value.dtype.is_floating_point:
        return value
    return value.float() if key.startswith(("condition_provider.", "fuser.")) else value.to(dtype)


def base_structure(spec: ModelSpec, dtype: torch.dtype) -> tuple[LoadedModel, Path] | None:
    """The base ``spec`` names, on the meta device (config files read, no weights), and the one
    safetensors file that holds every one of its weights under its own state-dict names, for a
    loader that reads that file tensor by tensor (``read_base_tensors``;
    ``train.model.build_sharded_model``). The file's names and shapes are checked against the
    structure (a ``ValueError`` naming the file and the first bad key).

    None for a base that is built whole instead (``load_base``): the tiny model, a training
    run, a checkpoint with a stored LoRA (merged while loading) and Hibiki (adjusted after
    loading).
    """
    m = spec.model
    if built_whole(spec):
        return None
    if m.source == "local" and not Path(spec.source).is_dir():
        raise FileNotFoundError(f"model.path: {m.path!r} is not a checkpoint or run directory")
    info = checkpoint_info(spec.source, spec.overrides, legacy_7b=m.source == "hf")
    raw = info.raw_config or {}
    if built_whole(spec, raw):
        return None
    if MERGED_KEY in raw:
        model = _merged_structure(Path(spec.source), dtype, info)
    else:
        with model_errors(spec.source):
            lm = meta_base(lm_kwargs_of(spec.source, info), None, dtype)
        model = _checkpoint_model(lm, spec.source, info)
    weights = Path(info.moshi_weights)
    check_tensors(model.lm.state_dict(), tensor_shapes(weights, "model weights"), str(weights))
    return dataclasses.replace(model, spec=spec), weights


def built_whole(spec: ModelSpec, raw_config: Mapping[str, Any] | None = None) -> bool:
    """Whether ``spec``'s base is built whole (``load_base``) rather than read from its file a
    batch at a time (``base_structure``): the tiny model, a training run, and, from its
    ``config.json`` (``raw_config``), a checkpoint with a stored LoRA or Hibiki."""
    m = spec.model
    if m.source == "tiny" or (m.source == "local" and is_run_dir(spec.source)):
        return True
    raw = raw_config or {}
    if MERGED_KEY in raw:  # an export: one file, read as it is
        return False
    return bool(raw.get("lora_name") or raw.get("lora")) or raw.get("model_type") == "hibiki"


def read_base_tensors(
    weights: Path, names: list[str], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The base's values of the state-dict entries ``names`` of a model built on
    ``base_structure`` (LoRA-wrapped linears included, ``lora.base_key``), read from
    ``weights`` and cast as moshi loads them; the file is open only while they are read."""
    with open_safetensors(weights, "model weights") as f:
        return {n: as_moshi_loads(n, f.get_tensor(base_key(n)), dtype) for n in names}


def _tiny_origin(seed: int) -> Origin:
    return Origin(
        "tiny", f"tiny:{seed}", note=f"tiny model built from seed {seed}: no weights file"
    )


def _info_files(info: loaders.CheckpointInfo) -> tuple[str, ...]:
    """The weights files ``CheckpointInfo.get_moshi`` loads: the model and a stored LoRA."""
    files = [info.moshi_weights, info.lora_weights]
    return tuple(str(Path(f).resolve()) for f in files if f is not None)


def describe_base(
    source: str | Path,
    overrides: Mapping[str, str | Path | None] | None = None,
    *,
    legacy_7b: bool = False,
) -> BaseRecord:
    """``BaseRecord`` of any ``load_base_lm`` source, from config files only (no weights)."""
    seed = tiny_seed(str(source))
    if seed is not None:
        no_overrides(overrides, source)
        return BaseRecord(tiny_lm_kwargs(), f"tiny:{seed}", None)
    if is_run_dir(source):
        no_overrides(overrides, source)
        return describe_run(source)
    info = checkpoint_info(source, overrides, legacy_7b=legacy_7b)
    return BaseRecord(lm_kwargs_of(source, info), codec_of(source, info), info)


def describe_spec(spec: ModelSpec) -> BaseRecord:
    """``BaseRecord`` of the base a ``ModelSpec`` names (tiny overrides and file overrides
    included), from config files only."""
    m = spec.model
    if m.source == "tiny":
        return BaseRecord(tiny_lm_kwargs(**m.tiny_overrides), f"tiny:{spec.seed}", None)
    return describe_base(spec.source, spec.overrides, legacy_7b=m.source == "hf")


def describe_run(run: str | Path) -> BaseRecord:
    """``BaseRecord`` of a run's model: its base's architecture, codec and checkpoint info."""
    return describe_spec(run_spec(find_checkpoint(run)))


def load_base(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """The base LM named by ``spec.model`` (eval mode) and its ``CheckpointInfo`` (None if
    tiny). ``source: local`` takes a checkpoint directory with a config.json, an export, a run
    directory or a ``checkpoints/step_*`` directory."""
    m = spec.model
    if m.source == "tiny":
        lm = build_tiny_lm(spec.seed, **m.tiny_overrides).to(device=device, dtype=dtype)
        return LoadedModel(lm, None, spec.source, spec.source, origin=_tiny_origin(spec.seed))
    if m.source == "local" and not Path(spec.source).is_dir():
        raise FileNotFoundError(f"model.path: {m.path!r} is not a checkpoint or run directory")
    return load_base_lm(spec.source, device=device, dtype=dtype, overrides=spec.overrides,
                        legacy_7b=m.source == "hf")  # fmt: skip


def build(
    spec: ModelSpec,
    device: torch.device,
    dtype: torch.dtype | None = None,
    init_device: torch.device | None = None,
) -> LoadedModel:
    """The model of ``spec``: its base -> LoRA (base linears only) -> TTT (new parameters
    initialised from ``spec.seed``), on ``device``. ``dtype``: of the base (default:
    ``model.dtype`` resolved for ``device``). Nothing is frozen or unfrozen here.

    ``init_device``: where the new parameters are drawn before they move to ``device``
    (default: ``device``). Training draws them on the CPU, so that one GPU, several and the
    CPU start from the same values (``train.model``); a run's model, whose trained values
    replace them, draws them where it runs."""
    dtype = dtype or resolve_dtype(spec.model.dtype, device)
    model = load_base(spec, device, dtype)
    add_lora_and_memory(model.lm, spec, init_device or device, model.base)
    if init_device is not None:
        model.lm.to(device)
    return dataclasses.replace(model, spec=spec)


def load_run(
    run: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> tuple[LoadedModel, Path]:
    """``(the model a run trained, in eval mode, its checkpoint directory)``; the model's
    ``spec`` is the run's, its ``info`` / ``base`` / ``codec`` those of the run's base.

    ``run``: a run directory (its newest checkpoint) or a ``checkpoints/step_*`` directory.
    The model is rebuilt from the run's recorded spec (``build``; ``dtype``: of its frozen
    base, default its ``model.dtype`` resolved for ``device``), its trained groups (float32)
    get the checkpoint's ``trainable.safetensors``; every parameter is then frozen.
    """
    ckpt = find_checkpoint(run)
    spec = run_spec(ckpt)
    model = build(spec, torch.device(device), dtype)
    groups = mark_trained(model.lm, spec)
    load_trainable(ckpt, [item for group in groups.values() for item in group])
    for p in model.lm.parameters():
        p.requires_grad_(False)
    model.lm.eval()
    ckpt_dir = ckpt.resolve()
    run_dir = ckpt_dir.parent.parent if ckpt_dir.parent.name == "checkpoints" else None
    model.origin = Origin(
        "run", str(run), str(run_dir) if run_dir else None, str(ckpt_dir),
        read_state(ckpt)["step"], (str(ckpt_dir / TRAINABLE),), model.origin,
    )  # fmt: skip
    return model, ckpt


def load_run_base(
    run: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> LoadedModel:
    """The model run ``run`` trained, LoRA merged (``W + scaling B A``), as a frozen base in
    eval mode, with the ``CheckpointInfo`` of the run's own base (or None).

    Its ``base`` is the resolved checkpoint directory (what an adapter trained on it records),
    its ``codec`` the codec of the run's base. A run directory means its
    newest checkpoint *when loaded*: name a ``checkpoints/step_*`` directory, or export it, for
    a base that stays fixed while the run goes on.
    """
    model, ckpt = load_run(run, device, dtype)  # built in dtype: rank 0's CPU as a GPU
    lm = model.lm
    replace_lora_with_linear(lm)
    lm = lm.to(dtype=dtype)
    for p in lm.parameters():
        p.requires_grad_(False)
    return LoadedModel(
        lm.eval(), model.info, str(ckpt.resolve()), model.codec, model.spec, model.origin
    )


def load_adapter(
    adapter_dir: str | Path,
    lm: LMModel | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> LoadedModel:
    """An adapter on its base (``adapter.apply_adapter``: LoRA and TTT as recorded, every
    tensor loaded strictly).

    Without ``lm`` the base is loaded from ``adapter.json``'s ``base`` (``load_base_lm``).
    With ``lm`` (a base already loaded) the adapter goes onto it: ``info`` is then None and
    ``base`` / ``codec`` are the adapter's recorded base.
    """
    meta, tensors = read_adapter(adapter_dir)
    if lm is None:
        model = load_base_lm(meta["base"], device=device, dtype=dtype)
    else:
        model = LoadedModel(lm, None, str(meta["base"]), str(meta["base"]))
    apply_adapter(model.lm, adapter_dir, meta, tensors)
    model.lm.eval()
    root = Path(adapter_dir).resolve()
    model.origin = Origin("adapter", str(adapter_dir), None, str(root),
                          files=(str(root / WEIGHTS_NAME),), base=model.origin)  # fmt: skip
    return model


def load_codec(
    model: LoadedModel, device: torch.device | str = "cpu"
) -> tuple[MimiModel, Any | None]:
    """Mimi and the text tokenizer (None when the checkpoint has none) that go with ``model``.

    Tiny bases (also adapters, runs and exports made from one) get ``build_tiny_mimi`` and
    ``build_tiny_tokenizer`` with the base's seed; others the checkpoint's Mimi weights.
    """
    lm = model.lm
    sizes = {"card": lm.card, "n_q": lm.n_q, "dep_q": lm.dep_q, "text_card": lm.text_card}
    return load_codec_files(model.codec, model.info, sizes, device)


def codec_for_source(
    source: str | Path,
    device: torch.device | str = "cpu",
    overrides: Mapping[str, str | Path | None] | None = None,
) -> tuple[MimiModel, Any | None]:
    """Mimi and the text tokenizer of any ``load_base_lm`` source, without its LM weights."""
    record = describe_base(source, overrides)
    return load_codec_files(record.codec, record.info, record.lm_kwargs, device)
