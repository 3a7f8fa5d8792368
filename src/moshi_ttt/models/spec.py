"""What a model is, as values: ``ModelSpec`` (source, file overrides, LoRA, memory, seed) and
``LoadedModel`` (a loaded module with where it comes from).

The ``model`` / ``lora`` / ``ttt`` / ``seed`` sections of a training config are a
``ModelSpec`` (``TrainConfig.spec``); a training run records them, so a run's model is rebuilt
from its checkpoint alone (``models.runs.run_spec``) without the training code. The sections
are validated by ``moshi_ttt.schema`` like the rest of the training config.

Also the one place that turns ``"auto"`` into a device and a dtype (``resolve_device``,
``resolve_dtype``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from moshi.models import loaders
from torch import nn

from .. import schema
from ..integration.config import TTTConfig
from ..schema import option

GROUPS = ("ttt", "lora", "embeddings", "base")  # parameter groups, by the modules owning them
OVERRIDE_KEYS = ("moshi_weights", "mimi_weights", "tokenizer", "config_path")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    """Which Moshi to fine-tune and how to run it.

    Attributes:
        source: ``"tiny"`` (the random tiny model of ``integration.tiny``, for tests and CPU),
            ``"hf"`` (a Hugging Face repo, ``hf_repo``) or ``"local"`` (a directory, ``path``).
        hf_repo: repo id for ``source: hf`` (no config.json there = the 7B config).
        path: for ``source: local``: a checkpoint directory with a config.json of moshi's LM
            kwargs (one without it is an error), a ``moshi-ttt export`` directory, or a
            training run directory (its newest checkpoint) / ``checkpoints/step_*`` directory
            (its trained model, LoRA merged).
        moshi_weights / mimi_weights / tokenizer / config_path: optional file overrides for
            ``hf`` and ``local`` (``CheckpointInfo.from_hf_repo`` arguments: a local path or
            ``hf://org/repo/file``); null = the checkpoint's own files.
        tiny_overrides: ``tiny_lm_kwargs`` overrides for ``source: tiny`` (e.g. num_layers: 2).
        dtype: compute dtype of the frozen base: ``"auto"`` = bfloat16 on GPU, float32 on CPU.
            Trainable parameters and optimizer state are always float32.
        gradient_checkpointing: activation checkpointing of every transformer layer.
        train_embeddings: also train the text and audio embeddings (moshi-finetune's ft_embed).
        train_base: train every base weight too (for small models trained from scratch, as in
            the demo); the base is then float32 like every trainable parameter.
        train_context: attention context (frames) of the temporal transformer *while
            training*; null = the model's own. A shorter one than at inference makes the TTT
            memory carry what attention can no longer see (evaluation and export keep the
            model's own context).
        train_context_min: with it, every optimizer step draws its attention context uniformly
            from ``[train_context_min, train_context or the model's own]`` (a fixed draw per
            run seed and step, so resumes stay exact): a memory trained this way cannot stand
            in for attention of one fixed span (docs/retrofit.md).
    """

    source: Literal["tiny", "hf", "local"] = "tiny"
    hf_repo: str = "kyutai/moshiko-pytorch-bf16"
    path: str | None = None
    moshi_weights: str | None = None
    mimi_weights: str | None = None
    tokenizer: str | None = None
    config_path: str | None = None
    tiny_overrides: dict[str, Any] = field(default_factory=dict)
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    gradient_checkpointing: bool = True
    train_embeddings: bool = False
    train_base: bool = False
    train_context: int | None = option(None, ge=1)
    train_context_min: int | None = option(None, ge=1)

    def rules(self) -> None:
        """The rules between keys (types and bounds: ``schema``)."""
        if self.source == "local" and not self.path:
            raise ValueError("path: expected a checkpoint directory for model.source: local")
        if self.source == "hf" and not self.hf_repo:
            raise ValueError("hf_repo: expected a repo id for model.source: hf")
        if self.source == "tiny":
            for key in OVERRIDE_KEYS:
                if getattr(self, key) is not None:
                    raise ValueError(f"{key}: only for model.source hf or local, not tiny")
        lo, hi = self.train_context_min, self.train_context
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(
                f"train_context_min: {lo} > model.train_context {hi}: the range of "
                "training windows is empty"
            )


@dataclass
class LoraConfig:
    """LoRA on every linear of the model (moshi's ``replace_all_linear_with_lora``).

    ``y = W x + scaling * B(A x)``: ``scaling`` multiplies directly (it is not alpha / rank).
    Its learning rate is the top-level ``lora_lr``.
    """

    enable: bool = False
    rank: int = option(64, ge=1)
    scaling: float = option(2.0, gt=0)


@dataclass
class ModelSpec:
    """Everything that decides a model's structure and initial values.

    Attributes:
        seed: seeds the new parameters (LoRA from ``seed + 1``, TTT from ``seed + 2``) and
            names the tiny model (``tiny:SEED``).
        model: where the base comes from and which of its groups train (``ModelConfig``).
        ttt: the memory layers to add (None: none).
        lora: LoRA on the base linears.
    """

    seed: int = option(0, ge=0)
    model: ModelConfig = field(default_factory=ModelConfig)
    ttt: TTTConfig | None = field(default_factory=TTTConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        schema.validate(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        """The spec of a (training) config mapping: its ``seed``, ``model``, ``ttt`` and
        ``lora`` keys; other keys are ignored."""
        keys = ("seed", "model", "ttt", "lora")
        return schema.build(cls, {k: data[k] for k in keys if k in data})

    @property
    def source(self) -> str:
        """The base as a ``load_base_lm`` source: ``tiny:SEED``, a repo id or a directory."""
        m = self.model
        if m.source == "tiny":
            return f"tiny:{self.seed}"
        return str(m.hf_repo if m.source == "hf" else m.path)

    @property
    def overrides(self) -> dict[str, str]:
        """The file overrides that are set (``CheckpointInfo.from_hf_repo`` arguments)."""
        return {k: str(getattr(self.model, k)) for k in OVERRIDE_KEYS
                if getattr(self.model, k) is not None}  # fmt: skip

    @property
    def trained_groups(self) -> tuple[str, ...]:
        """The parameter groups (``GROUPS``) that train, in order."""
        m = self.model
        wanted = {
            "ttt": self.ttt is not None,
            "lora": self.lora.enable,
            "embeddings": m.train_embeddings or m.train_base,
            "base": m.train_base,
        }
        return tuple(g for g in GROUPS if wanted[g])


def resolve_device(name: str | torch.device, what: str = "--device") -> torch.device:
    """``auto`` -> cuda if available else cpu; an unavailable cuda is a ``ValueError`` naming
    ``what`` (the option the name came from)."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"{what} {name!r}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{what} {name}: CUDA is not available on this machine")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """A dtype name (``DTYPES``); ``auto`` = bfloat16 on GPU, float32 elsewhere."""
    return DTYPES.get(name) or (torch.bfloat16 if device.type == "cuda" else torch.float32)


@dataclass(frozen=True)
class Origin:
    """Where a loaded model's weights come from, as the loaders saw it (no hashing here:
    ``models.provenance.provenance`` adds the files' sha256 when a report asks).

    Attributes:
        kind: ``"tiny"``, ``"hf"`` (a Hub repo), ``"local"`` (a checkpoint directory),
            ``"export"`` (a merged directory), ``"run"`` (a training run) or ``"adapter"``.
        name: the source as it was named (``"tiny:0"``, a repo id, a path as typed).
        run_dir: the run directory (runs only), resolved.
        checkpoint_dir: the directory whose weights were loaded (for a run: the checkpoint
            actually chosen), resolved; None for tiny models and Hub repos.
        step: the training step of a run's checkpoint (None where unknown).
        files: every weights file loaded for this part of the model, in load order.
        base: the ``Origin`` of the base under a run or an adapter (None otherwise).
        note: a remark for a model without files (the tiny model: built from a seed).
    """

    kind: str
    name: str
    run_dir: str | None = None
    checkpoint_dir: str | None = None
    step: int | None = None
    files: tuple[str, ...] = ()
    base: Origin | None = None
    note: str | None = None


@dataclass
class LoadedModel:
    """A loaded model and where it comes from; nothing about its origin is stored on the module.

    Attributes:
        lm: the moshi ``LMModel`` (with its TTT layers and LoRA, as loaded or built).
        info: its base's ``CheckpointInfo`` (None for tiny models and models made from one).
        base: what it was loaded from (a resolved directory, a repo id, ``"tiny:SEED"``): what
            an adapter trained on it records as its base.
        codec: ``"tiny:SEED"`` or the source whose Mimi and tokenizer go with it
            (``models.load.load_codec``).
        spec: the ``ModelSpec`` it was built from (None for a source loaded as it is).
        origin: where its weights come from (``Origin``, filled by ``models.load``; None for
            a module wrapped by hand), for ``models.provenance.provenance``.
    """

    lm: nn.Module
    info: loaders.CheckpointInfo | None
    base: str
    codec: str
    spec: ModelSpec | None = None
    origin: Origin | None = None
