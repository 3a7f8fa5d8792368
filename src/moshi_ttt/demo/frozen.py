"""The frozen base every row of a memory study starts from: a ``ModelConfig`` (the ``model``
section of a training config), loaded fresh for each row so that no row sees another's changes.

The demo's base is its own trained tiny model (``source: local``, its export); ``moshi-ttt
study`` takes any source the project loads (a Hub repo, a checkpoint directory, an export, a
training run, ``tiny``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from moshi.models.lm import LMModel

from ..models.load import build, describe_spec
from ..models.sources import BaseRecord, tiny_seed
from ..models.spec import ModelConfig, ModelSpec, resolve_dtype
from ..train.config import TrainConfig
from ..train.plan import plan_lm_kwargs


@dataclass(frozen=True)
class FrozenBase:
    """``model``: ``ModelConfig`` keys (``source``, ``path`` / ``hf_repo``, ``tiny_overrides``,
    ``dtype``); ``seed`` names a tiny base; ``device``: where rows run."""

    model: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    device: str = "cpu"

    @classmethod
    def local(cls, path: str | Path, device: str = "cpu") -> FrozenBase:
        """A checkpoint, export or run directory."""
        return cls({"source": "local", "path": str(path)}, device=device)

    def spec(self) -> ModelSpec:
        return ModelSpec(seed=self.seed, model=ModelConfig(**self.model), ttt=None)

    def train_model(self) -> dict[str, Any]:
        """The ``model`` section of a training run that keeps this base frozen."""
        return {**self.model, "train_base": False}

    def describe(self) -> BaseRecord:
        """Architecture (``lm_kwargs``), codec and checkpoint info, from config files only."""
        return describe_spec(self.spec())

    @property
    def source(self) -> str:
        return self.spec().source

    def lm_kwargs(self) -> dict[str, Any]:
        """The base's ``LMModel`` kwargs from config files only, offline (a Hub repo not in the
        local cache: moshi's 7B defaults, as ``moshi-ttt plan``)."""
        cfg = TrainConfig.from_dict({"run_dir": "unused", "seed": self.seed,
                                     "model": self.train_model(),
                                     "data": {"train": ["unused"]}})  # fmt: skip
        return plan_lm_kwargs(cfg)[0]

    @property
    def bytes_are_text(self) -> bool:
        """A base trained from a tiny model reads text as bytes (the demo's); others read it
        through their checkpoint's tokenizer."""
        if self.model.get("source") in ("tiny", "hf"):
            return self.model.get("source") == "tiny"
        return tiny_seed(self.describe().codec) is not None

    def load(self) -> LMModel:
        """A fresh copy of the base LM, eval mode (``model.dtype``: auto = float32 on CPU)."""
        device = torch.device(self.device)
        dtype = resolve_dtype(self.model.get("dtype", "auto"), device)
        return build(self.spec(), device, dtype).lm.eval()


def base_from_arg(source: str, device: str = "cpu", dtype: str = "auto") -> FrozenBase:
    """``--base``: ``tiny`` / ``tiny:SEED``, a directory (checkpoint with config.json, export,
    run or ``checkpoints/step_*``) or a Hugging Face repo id. A path-like name that is not a
    directory is an error naming it (not taken for a repo)."""
    seed = tiny_seed(source)
    if seed is not None:
        return FrozenBase({"source": "tiny", "dtype": dtype}, seed=seed, device=device)
    path = Path(source).expanduser()
    if path.is_dir():
        return FrozenBase({"source": "local", "path": str(path), "dtype": dtype}, device=device)
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ValueError(
            f"--base {source}: not a directory and not a Hugging Face repo id (ORG/NAME); "
            "expected a checkpoint directory with config.json, a `moshi-ttt export` or run "
            "directory, a repo id, or tiny"
        )
    return FrozenBase({"source": "hf", "hf_repo": source, "dtype": dtype}, device=device)
