"""Where a base model comes from, read from its config files only (no weights).

A source is one of:

- ``"tiny"`` / ``"tiny:SEED"``: ``build_tiny_lm(SEED)`` (random weights; Mimi and the text
  tokenizer are ``codec.build_tiny_mimi`` and ``codec.build_tiny_tokenizer``);
- a ``moshi-ttt train`` run directory (its newest checkpoint) or one of its
  ``checkpoints/step_*`` directories (``is_run_dir``): the model it trained, LoRA merged;
- a local checkpoint directory: ``config.json`` with moshi's LM kwargs (required: without it a
  ``ValueError``, never a silent 7B), ``model.safetensors`` (or the config's ``moshi_name``), and
  optionally Mimi and the tokenizer under their usual names. A directory written by
  ``moshi-ttt export`` (its config has a ``"moshi_ttt"`` entry, ``MERGED_KEY``) has TTT layers;
- anything else of the form ``org/name`` (or ``hf://org/name``): a Hugging Face repo id, through
  ``moshi.models.loaders.CheckpointInfo.from_hf_repo`` (default ``kyutai/moshiko-pytorch-bf16``;
  a repo without config.json is moshi's 7B).

``overrides`` (``moshi_weights``, ``mimi_weights``, ``tokenizer``, ``config_path``) replace the
files of a directory or repo, as ``CheckpointInfo.from_hf_repo``'s arguments: local paths or
``hf://org/repo/file``. ``BaseRecord`` is what a source is without its weights.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moshi.models import loaders

from ..integration.tiny import tiny_lm_kwargs
from . import hub
from .files import check_safetensors, check_safetensors_suffix, read_json, require_file
from .spec import OVERRIDE_KEYS

DEFAULT_REPO = loaders.DEFAULT_REPO  # "kyutai/moshiko-pytorch-bf16"
MERGED_KEY = "moshi_ttt"  # the config.json entry of a merged TTT checkpoint
MERGED_WEIGHTS = "model.safetensors"  # the weights file of a merged checkpoint
LORA_KEYS = ("lora", "lora_rank", "lora_scaling")
RUN_CONFIG = "config.yaml"  # a training run directory's config (the trainer writes it)
RUN_STATE = "state.json"  # a training checkpoint's state (models.runs.STATE)
_TINY = re.compile(r"^tiny(?::(\d+))?$")
_REPO_ID = re.compile(r"^(hf://)?[A-Za-z0-9][\w.-]*/[\w.-]+$")


def tiny_seed(source: str) -> int | None:
    """The seed of a ``"tiny"`` / ``"tiny:SEED"`` source, None for any other source."""
    m = _TINY.match(str(source).strip())
    if m is None:
        return None
    return int(m.group(1)) if m.group(1) else 0


def is_run_dir(source: str | Path) -> bool:
    """True for a ``moshi-ttt train`` run directory (``config.yaml``, no ``config.json``) or
    one of its ``checkpoints/step_*`` directories (``state.json``)."""
    path = Path(source).expanduser()
    if not path.is_dir():
        return False
    run = (path / RUN_CONFIG).is_file() and not (path / "config.json").exists()
    return run or (path / RUN_STATE).is_file()


def checkpoint_info(
    source: str | Path,
    overrides: Mapping[str, str | Path | None] | None = None,
    *,
    legacy_7b: bool = False,
) -> loaders.CheckpointInfo:
    """moshi's ``CheckpointInfo`` for a local checkpoint directory or a Hugging Face repo id.

    ``overrides``: file overrides (module docstring). A local directory needs a config.json
    (or ``config_path``); ``legacy_7b``: a directory without one is moshi's 7B, as a repo
    without one is (for ``model.source: hf`` pointing at a downloaded snapshot). Local Mimi and
    tokenizer files are not checked here (both are optional); use ``require_file`` first.
    """
    ov = _check_overrides(overrides)
    path = Path(source).expanduser()
    if path.is_dir():
        if is_run_dir(path):
            raise ValueError(
                f"{path} is a training run, not a checkpoint directory: load it with "
                "load_base_lm, or write one with `moshi-ttt export`"
            )
        return _local_checkpoint_info(path, ov, legacy_7b)
    if path.exists():
        raise ValueError(f"{path} is a file; expected a checkpoint directory or a repo id")
    text = str(source)
    if not _REPO_ID.match(text):
        raise FileNotFoundError(
            f"{text!r}: no such directory, and not a Hugging Face repo id (org/name)"
        )
    repo = text.removeprefix("hf://")
    why = hub.hub_offline_reason()
    try:
        if why is None:
            info = loaders.CheckpointInfo.from_hf_repo(repo, **ov)
        else:  # every file from the cache, or one clear error before moshi guesses the 7B
            _require_cached(repo, ov, why)
            with hub.offline_mode():
                info = loaders.CheckpointInfo.from_hf_repo(repo, **ov)
    except hub.HubFileMissing:
        raise
    except OSError as e:  # huggingface_hub's errors (offline, no such repo, no such file)
        raise FileNotFoundError(f"cannot get {repo!r} from the Hugging Face Hub: {e}") from e
    return check_info_files(info)


def _require_cached(repo: str, ov: Mapping[str, Path | str], why: str) -> None:
    """With the Hub out of reach (``why``): the files ``from_hf_repo`` reads from ``repo``
    (config.json, then the weights, Mimi and tokenizer it names, unless overridden) must be in
    the local cache; the first one missing is a ``hub.HubFileMissing``."""
    names = {"moshi_weights": loaders.MOSHI_NAME, "mimi_weights": loaders.MIMI_NAME,
             "tokenizer": loaders.TEXT_TOKENIZER_NAME}  # fmt: skip
    extra: list[str] = []
    if "config_path" not in ov:
        found = hub.cached(repo, "config.json")
        if found is None:
            raise hub.missing_error(repo, "config.json", why)
        if isinstance(found, Path):  # False: the repo has none (moshi's 7B), names as above
            config = read_json(found)
            if isinstance(config, dict):
                names["moshi_weights"] = config.get("moshi_name", names["moshi_weights"])
                names["mimi_weights"] = config.get("mimi_name", names["mimi_weights"])
                names["tokenizer"] = config.get("tokenizer_name", names["tokenizer"])
                extra = [config[k] for k in ("mimi_config_name", "lora_name") if config.get(k)]
    for name in [n for k, n in names.items() if k not in ov] + extra:
        if not isinstance(hub.cached(repo, name), Path):
            raise hub.missing_error(repo, name, why)


def check_info_files(info: loaders.CheckpointInfo) -> loaders.CheckpointInfo:
    """Refuse a checkpoint whose LM, Mimi or LoRA weights are not safetensors (never opened)
    or not a complete safetensors file; returns ``info``."""
    check_safetensors(info.moshi_weights, "model weights")
    check_safetensors_suffix(info.mimi_weights, "Mimi weights")  # whole check when loaded
    if info.lora_weights is not None:
        check_safetensors(info.lora_weights, "LoRA weights")
    return info


@contextlib.contextmanager
def model_errors(source: str | Path) -> Iterator[None]:
    """moshi's errors for a config.json that is not ``LMModel`` kwargs (``TypeError``) or
    weights that do not fit it (``RuntimeError`` of ``load_state_dict``, ``AssertionError``)
    -> a ``ValueError`` naming the checkpoint."""
    try:
        yield
    except (TypeError, RuntimeError, AssertionError, KeyError) as e:
        first = " ".join(str(e).split())[:300] or type(e).__name__
        raise ValueError(
            f"{source}: its config.json and weights do not make a moshi LMModel ({first}); "
            "expected moshi's LM kwargs and the matching weights (as `moshi-ttt export` writes)"
        ) from e


def _check_overrides(overrides: Mapping[str, str | Path | None] | None) -> dict[str, Path | str]:
    """The set (non-None) overrides; an unknown key is a ``ValueError`` naming it."""
    ov = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(ov) - set(OVERRIDE_KEYS))
    if unknown:
        raise ValueError(f"unknown checkpoint file overrides {unknown}; valid: {OVERRIDE_KEYS}")
    return ov


def _local_checkpoint_info(
    root: Path, ov: dict[str, Path | str], legacy_7b: bool
) -> loaders.CheckpointInfo:
    """``CheckpointInfo`` of a local directory, every file given as a local path (no download
    unless an override is ``hf://``)."""
    root = root.resolve()
    config_path = loaders.hf_get(str(ov["config_path"])) if "config_path" in ov else None
    if config_path is None and (root / "config.json").is_file():
        config_path = root / "config.json"
    if config_path is not None:
        config = read_json(config_path)
        if not isinstance(config, dict):
            raise ValueError(f"{config_path}: expected a JSON object")
    elif legacy_7b:
        config = {}
    else:
        raise ValueError(
            f"{root}: no config.json; a local checkpoint directory needs a config.json with "
            "moshi's LM kwargs (LMModel arguments, as `moshi-ttt export` writes), or "
            "model.config_path. For the Moshi 7B use model.source: hf with model.hf_repo "
            f"(default {DEFAULT_REPO})"
        )

    def file(key: str, name_key: str, default: str) -> Path:
        if key in ov:
            return loaders.hf_get(str(ov[key]))
        return root / config.get(name_key, default)

    weights = require_file(file("moshi_weights", "moshi_name", loaders.MOSHI_NAME), "model weights")
    mimi = file("mimi_weights", "mimi_name", loaders.MIMI_NAME)
    tokenizer = file("tokenizer", "tokenizer_name", loaders.TEXT_TOKENIZER_NAME)
    if config_path is None:  # legacy_7b: moshi assumes the 7B (lm_config None)
        return check_info_files(loaders.CheckpointInfo(weights, mimi, tokenizer))
    extra: dict[str, Any] = {}
    if config.get("mimi_config_name"):
        extra["mimi_config_path"] = root / config["mimi_config_name"]
    if config.get("lora_name"):
        extra["lora_weights"] = root / config["lora_name"]
    info = loaders.CheckpointInfo.from_hf_repo(
        str(root),
        moshi_weights=weights,
        mimi_weights=mimi,
        tokenizer=tokenizer,
        config_path=config_path,
        **extra,
    )
    return check_info_files(info)


def lm_kwargs_of(source: str | Path, info: loaders.CheckpointInfo | None) -> dict[str, Any]:
    """``LMModel(**kwargs)`` of a base source (moshi's 7B kwargs when it has no config)."""
    seed = tiny_seed(str(source))
    if info is None:
        if seed is None:
            raise ValueError(f"no checkpoint info for base {source!r}")
        return tiny_lm_kwargs()
    kwargs = dict(info.lm_config if info.lm_config is not None else loaders._lm_kwargs)
    for key in (*LORA_KEYS, MERGED_KEY):
        kwargs.pop(key, None)
    return kwargs


@dataclass
class BaseRecord:
    """What a base source is, read without its LM weights.

    Attributes:
        lm_kwargs: ``LMModel(**lm_kwargs)`` of its architecture (TTT layers not included).
        codec: ``"tiny:SEED"`` or the source whose Mimi/tokenizer go with the model.
        info: its ``CheckpointInfo`` (None for tiny models and runs on a tiny model).
    """

    lm_kwargs: dict[str, Any]
    codec: str
    info: loaders.CheckpointInfo | None


def codec_of(source: str | Path, info: loaders.CheckpointInfo) -> str:
    merged = (info.raw_config or {}).get(MERGED_KEY)
    if isinstance(merged, dict) and (merged.get("codec") or merged.get("base")):
        return str(merged.get("codec") or merged["base"])
    return str(Path(source).resolve()) if Path(source).is_dir() else str(source)


def no_overrides(overrides: Mapping[str, Any] | None, source: str | Path) -> None:
    """File overrides only apply to directories and repos: a ``ValueError`` for others."""
    given = sorted(_check_overrides(overrides))
    if given:
        raise ValueError(
            f"checkpoint file overrides {given} apply to a checkpoint directory or a repo, "
            f"not to {str(source)!r}"
        )
