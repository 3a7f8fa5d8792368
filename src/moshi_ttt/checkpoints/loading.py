"""Base models: the tiny random model, a training run, a local directory, or a HF repo.

``load_base_lm(source)`` understands these kinds of ``source``:

- ``"tiny"`` / ``"tiny:SEED"``: ``build_tiny_lm(SEED)`` (random weights; Mimi and the text
  tokenizer are ``build_tiny_mimi`` and ``build_tiny_tokenizer``);
- a ``moshi-ttt train`` run directory (its newest checkpoint) or one of its
  ``checkpoints/step_*`` directories: the model it trained, LoRA merged (``runs.load_run_base``);
- a local checkpoint directory: ``config.json`` with moshi's LM kwargs (required: without it a
  ``ValueError``, never a silent 7B), ``model.safetensors`` (or the config's ``moshi_name``), and
  optionally Mimi and the tokenizer under their usual names. A directory written by
  ``moshi-ttt export`` / ``export_merged`` (its config has a ``"moshi_ttt"`` entry) is loaded
  with its TTT layers (``load_merged``);
- anything else of the form ``org/name`` (or ``hf://org/name``): a Hugging Face repo id, through
  ``moshi.models.loaders.CheckpointInfo.from_hf_repo`` (default ``kyutai/moshiko-pytorch-bf16``;
  a repo without config.json is moshi's 7B).

``overrides`` (``moshi_weights``, ``mimi_weights``, ``tokenizer``, ``config_path``) replace the
files of a directory or repo, as ``CheckpointInfo.from_hf_repo``'s arguments: local paths or
``hf://org/repo/file``.

Every loaded model records ``lm.moshi_ttt_base`` (what it was loaded from, what an adapter
trained on it names as its base) and ``lm.moshi_ttt_codec`` (``"tiny:SEED"`` or the source whose
Mimi/tokenizer go with it, for ``load_codec``).

Only safetensors weights are ever loaded: every weights file a checkpoint names (LM, Mimi,
LoRA) is checked by ``check_safetensors`` (suffix, then header and size) before it is opened,
and moshi's ``torch.load`` branch is disabled while moshi loads (``no_pickle_loads``), so a
pickle is refused unexecuted whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says.

LoRA (``apply_lora``) wraps the *base* linear layers only: moshi's own
``replace_all_linear_with_lora`` would also wrap the TTT branches' linears, which then break.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from moshi.models import loaders
from moshi.models.compression import MimiModel
from moshi.models.lm import LMModel
from moshi.modules.lora import LoRALinear
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..integration.apply import TTT_MODULE_TYPES, apply_ttt
from ..integration.config import TTTConfig
from ..integration.tiny import build_tiny_lm, tiny_lm_kwargs

DEFAULT_REPO = loaders.DEFAULT_REPO  # "kyutai/moshiko-pytorch-bf16"
MERGED_KEY = "moshi_ttt"  # the config.json entry of a merged TTT checkpoint
MERGED_WEIGHTS = "model.safetensors"  # the weights file of a merged checkpoint
LORA_KEYS = ("lora", "lora_rank", "lora_scaling")
OVERRIDE_KEYS = ("moshi_weights", "mimi_weights", "tokenizer", "config_path")
RUN_CONFIG = "config.yaml"  # a training run directory's config (train.trainer writes it)
RUN_STATE = "state.json"  # a training checkpoint's state (train.checkpoint.STATE)
SAFETENSORS_SUFFIXES = (".safetensors", ".sft", ".sfts")  # what moshi reads as safetensors
MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header
_TINY = re.compile(r"^tiny(?::(\d+))?$")
_REPO_ID = re.compile(r"^(hf://)?[A-Za-z0-9][\w.-]*/[\w.-]+$")


# -- sources ----------------------------------------------------------------------------------
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
    try:
        info = loaders.CheckpointInfo.from_hf_repo(repo, **ov)
    except OSError as e:  # huggingface_hub's errors (offline, no such repo, no such file)
        raise FileNotFoundError(f"cannot get {repo!r} from the Hugging Face Hub: {e}") from e
    return check_info_files(info)


def check_info_files(info: loaders.CheckpointInfo) -> loaders.CheckpointInfo:
    """Refuse a checkpoint whose LM, Mimi or LoRA weights are not safetensors (never opened)
    or not a complete safetensors file; returns ``info``."""
    check_safetensors(info.moshi_weights, "model weights")
    check_safetensors_suffix(info.mimi_weights, "Mimi weights")  # whole check when loaded
    if info.lora_weights is not None:
        check_safetensors(info.lora_weights, "LoRA weights")
    return info


@contextlib.contextmanager
def _model_errors(source: str | Path) -> Iterator[None]:
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


@contextlib.contextmanager
def no_pickle_loads() -> Iterator[None]:
    """While inside, ``torch.load`` refuses to run (moshi's loaders fall back to it for
    non-safetensors files): a pickle is never executed, whatever the environment says."""
    original = torch.load

    def refuse(f: Any, *args: Any, **kwargs: Any) -> Any:
        raise ValueError(f"{f}: refusing to unpickle it; moshi-ttt loads safetensors files only")

    torch.load = refuse  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = original  # type: ignore[assignment]


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


def describe_base(
    source: str | Path,
    overrides: Mapping[str, str | Path | None] | None = None,
    *,
    legacy_7b: bool = False,
) -> BaseRecord:
    """``BaseRecord`` of any ``load_base_lm`` source, from config files only (no weights)."""
    seed = tiny_seed(str(source))
    if seed is not None:
        _no_overrides(overrides, source)
        return BaseRecord(tiny_lm_kwargs(), f"tiny:{seed}", None)
    if is_run_dir(source):
        _no_overrides(overrides, source)
        from .runs import describe_run  # runs -> train -> this module

        return describe_run(source)
    info = checkpoint_info(source, overrides, legacy_7b=legacy_7b)
    return BaseRecord(lm_kwargs_of(source, info), _codec_of(source, info), info)


def _codec_of(source: str | Path, info: loaders.CheckpointInfo) -> str:
    merged = (info.raw_config or {}).get(MERGED_KEY)
    if isinstance(merged, dict) and (merged.get("codec") or merged.get("base")):
        return str(merged.get("codec") or merged["base"])
    return str(Path(source).resolve()) if Path(source).is_dir() else str(source)


def _no_overrides(overrides: Mapping[str, Any] | None, source: str | Path) -> None:
    """File overrides only apply to directories and repos: a ``ValueError`` for others."""
    given = sorted(_check_overrides(overrides))
    if given:
        raise ValueError(
            f"checkpoint file overrides {given} apply to a checkpoint directory or a repo, "
            f"not to {str(source)!r}"
        )


def mark_origin(lm: LMModel, base: str, codec: str) -> LMModel:
    """Record ``lm.moshi_ttt_base`` and ``lm.moshi_ttt_codec`` (module docstring)."""
    lm.moshi_ttt_base = str(base)
    lm.moshi_ttt_codec = str(codec)
    return lm


def load_base_lm(
    source: str | Path = DEFAULT_REPO,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    lora: dict[str, Any] | None = None,
    overrides: Mapping[str, str | Path | None] | None = None,
    *,
    legacy_7b: bool = False,
) -> tuple[LMModel, loaders.CheckpointInfo | None]:
    """Load a base Moshi LM (eval mode, ``dtype`` on ``device``) and its ``CheckpointInfo``
    (None for tiny models and runs trained on one); sources in the module docstring.

    ``lora``: ``{"rank": r, "scaling": s}`` adds fresh LoRA adapters to the base linears
    (``apply_lora``). A LoRA stored in the checkpoint itself (moshi-finetune's ``lora_name``) is
    merged into the base weights, as is the LoRA a run trained.
    """
    seed = tiny_seed(str(source))
    if seed is not None:
        _no_overrides(overrides, source)
        lm, info = build_tiny_lm(seed).to(device=device, dtype=dtype), None
        mark_origin(lm, str(source), f"tiny:{seed}")
    elif is_run_dir(source):
        _no_overrides(overrides, source)
        from .runs import load_run_base  # runs -> train -> this module

        lm, info = load_run_base(source, device=device, dtype=dtype)
    else:
        info = checkpoint_info(source, overrides, legacy_7b=legacy_7b)
        if info.raw_config and MERGED_KEY in info.raw_config:
            return load_merged(source, device=device, dtype=dtype, lora=lora, info=info)
        with no_pickle_loads(), _model_errors(source):
            lm = info.get_moshi(device=device, dtype=dtype, fuse_lora=True)
        resolved = str(Path(source).resolve()) if Path(source).is_dir() else str(source)
        mark_origin(lm, resolved, resolved)
    if lora:
        apply_lora(lm, **lora)
    return lm.eval(), info


def load_merged(
    directory: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    lora: dict[str, Any] | None = None,
    info: loaders.CheckpointInfo | None = None,
) -> tuple[LMModel, loaders.CheckpointInfo]:
    """Load an exported directory (``moshi-ttt export``, ``export_merged``): built on the meta
    device, TTT applied, every weight loaded strictly with ``assign``. ``lora``: fresh LoRA
    adapters to add (``apply_lora``); ``info``: its ``CheckpointInfo`` if already read."""
    root = Path(directory)
    info = info if info is not None else checkpoint_info(root)
    merged = (info.raw_config or {}).get(MERGED_KEY)
    if not isinstance(merged, dict) or "ttt_layers" not in merged:
        raise ValueError(f"{root}/config.json: not a merged moshi-ttt checkpoint (no {MERGED_KEY})")
    with _model_errors(root):
        lm = loaders.get_moshi_lm(None, lm_kwargs_of(root, info), device="meta", dtype=dtype)
    if merged.get("ttt_config") is not None:
        ttt = {**merged["ttt_config"], "layers": list(merged["ttt_layers"])}
        apply_ttt(lm, TTTConfig.from_dict(ttt))
    state = load_safetensors(info.moshi_weights, device)
    check_tensors(lm.state_dict(), state, str(info.moshi_weights))
    for key, value in state.items():
        if value.dtype.is_floating_point and not key.startswith(("condition_provider.", "fuser.")):
            state[key] = value.to(dtype)
    lm.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*lm.named_parameters(), *lm.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{info.moshi_weights}: no values for {left[:3]}")
    mark_origin(lm, str(root.resolve()), _codec_of(root, info))
    if lora:
        apply_lora(lm, **lora)
    return lm.eval(), info


def load_codec(
    lm: LMModel, info: loaders.CheckpointInfo | None, device: torch.device | str = "cpu"
) -> tuple[MimiModel, Any | None]:
    """Mimi and the text tokenizer (None when the checkpoint has none) that go with ``lm``.

    Tiny bases (also adapters, runs and exports made from one) get ``build_tiny_mimi`` and
    ``build_tiny_tokenizer`` with the base's seed; others the checkpoint's Mimi weights.
    """
    codec = getattr(lm, "moshi_ttt_codec", None)
    if codec is None:  # a model not loaded through this module
        codec = str(getattr(lm, "moshi_ttt_base", ""))
        merged = (info.raw_config or {}).get(MERGED_KEY) if info is not None else None
        if isinstance(merged, dict):
            codec = str(merged.get("codec") or merged.get("base") or codec)
    sizes = {"card": lm.card, "n_q": lm.n_q, "dep_q": lm.dep_q, "text_card": lm.text_card}
    return _load_codec(str(codec), info, sizes, device)


def codec_for_source(
    source: str | Path,
    device: torch.device | str = "cpu",
    overrides: Mapping[str, str | Path | None] | None = None,
) -> tuple[MimiModel, Any | None]:
    """Mimi and the text tokenizer of any ``load_base_lm`` source, without its LM weights."""
    record = describe_base(source, overrides)
    return _load_codec(record.codec, record.info, record.lm_kwargs, device)


def _load_codec(
    codec: str,
    info: loaders.CheckpointInfo | None,
    sizes: Mapping[str, Any],
    device: torch.device | str,
) -> tuple[MimiModel, Any | None]:
    seed = tiny_seed(codec)
    if seed is not None and (info is None or not Path(info.mimi_weights).is_file()):
        mimi = build_tiny_mimi(seed, card=int(sizes["card"]),
                               num_codebooks=int(sizes["n_q"]) - int(sizes["dep_q"]),
                               device=device)  # fmt: skip
        return mimi, build_tiny_tokenizer(int(sizes["text_card"]), seed)
    if info is None:
        raise ValueError(f"no Mimi codec known for the model loaded from {codec or '?'}")
    check_safetensors(info.mimi_weights, "Mimi weights")
    tokenizer = None
    if Path(info.tokenizer).is_file():
        try:
            tokenizer = info.get_text_tokenizer()
        except (RuntimeError, OSError) as e:  # sentencepiece: not a model file
            raise ValueError(f"{info.tokenizer}: not a sentencepiece tokenizer model ({e})") from e
    with no_pickle_loads():
        return info.get_mimi(device=device), tokenizer


# -- LoRA -------------------------------------------------------------------------------------
def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """``(qualified name, module)`` of every moshi ``LoRALinear`` in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_settings(model: nn.Module) -> dict[str, Any] | None:
    """``{"rank", "scaling"}`` of the model's LoRA adapters, None without LoRA."""
    modules = lora_modules(model)
    if not modules:
        return None
    settings = {(m.rank, float(m.scaling)) for _, m in modules}
    if len(settings) > 1:
        raise ValueError(f"LoRA modules with different (rank, scaling): {sorted(settings)}")
    rank, scaling = settings.pop()
    return {"rank": int(rank), "scaling": scaling}


@torch.no_grad()
def apply_lora(model: nn.Module, rank: int, scaling: float = 2.0) -> int:
    """Wrap every base ``nn.Linear`` in a moshi ``LoRALinear`` (y = W x + scaling * B A x).

    The TTT branches (``GatedTTT``, ``InPlaceTTT``) are skipped, so this works before or after
    ``apply_ttt``. Init as moshi-finetune: A Kaiming-uniform, B zero (the model is unchanged).
    Returns the number of wrapped linears.
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive int, got {rank!r}")
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters")

    def visit(module: nn.Module) -> int:
        count = 0
        for name, child in list(module.named_children()):
            if isinstance(child, TTT_MODULE_TYPES):
                continue
            if type(child) is nn.Linear:
                w = child.weight
                lora = LoRALinear(child.in_features, child.out_features, rank, float(scaling),
                                  device=w.device, dtype=w.dtype)  # fmt: skip
                nn.init.zeros_(lora.lora_B.weight)
                lora.frozen_W = child
                setattr(module, name, lora)
                count += 1
            else:
                count += visit(child)
        return count

    return visit(model)


# -- tiny Mimi and tokenizer --------------------------------------------------------------------
def tiny_mimi_config(card: int = 32, num_codebooks: int = 8) -> dict[str, Any]:
    """``get_mimi`` config of a tiny Mimi: moshi's architecture kinds (SEANet with strides
    8·6·5·4, a causal transformer on each side, split RVQ with 1 semantic codebook, conv
    resampling 25 -> 12.5 Hz) at 24 kHz / 12.5 Hz (1920 samples per frame), small widths."""
    seanet = dict(loaders._seanet_kwargs, dimension=32, n_filters=4)
    quantizer = dict(loaders._quantizer_kwargs, dimension=16, n_q=num_codebooks, bins=card,
                     input_dimension=32, output_dimension=32)  # fmt: skip
    transformer = dict(loaders._transformer_kwargs, d_model=32, num_heads=2, num_layers=1,
                       dim_feedforward=64, input_dimension=32, output_dimensions=[32])  # fmt: skip
    return dict(loaders._mimi_config, seanet=seanet, quantizer=quantizer, transformer=transformer)


@torch.no_grad()
def build_tiny_mimi(
    seed: int = 0, card: int = 32, num_codebooks: int = 8, device: torch.device | str = "cpu"
) -> MimiModel:
    """A tiny random ``MimiModel`` (float32, eval): ``encode([B, 1, 1920 n]) -> [B, K, n]`` codes
    in ``[0, card)``. A fresh Mimi has all-zero codebooks; here each codebook, in order, is set
    to ``card`` of the vectors it receives on seeded calibration audio (sines and noise at
    several loudnesses), so codes depend on the input as with a trained Mimi.
    The global RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mimi = loaders.get_mimi(None, tiny_mimi_config(card, num_codebooks), device="cpu",
                                num_codebooks=num_codebooks)  # fmt: skip
        mimi.eval()
        audio = _calibration_audio(seed)
        codebooks = [m for m in mimi.modules() if hasattr(m, "embedding_sum")]
        for codebook in codebooks:
            seen: list[torch.Tensor] = []
            original = codebook.encode

            def capture(x: torch.Tensor, _orig=original, _seen=seen) -> torch.Tensor:
                _seen.append(x.reshape(-1, x.shape[-1]))
                return _orig(x)

            codebook.encode = capture  # instance attribute, removed below
            try:
                _fill_codebook(codebook, torch.zeros(1, codebook.embedding_sum.shape[1]))
                mimi.encode(audio)
            finally:
                del codebook.encode
            samples = torch.cat(seen)
            pick = torch.randperm(samples.shape[0])[:card]
            vectors = samples[pick]
            if vectors.shape[0] < card:  # short calibration: jitter copies
                extra = vectors[torch.randint(0, vectors.shape[0], (card - vectors.shape[0],))]
                vectors = torch.cat([vectors, extra + 0.01 * torch.randn_like(extra)])
            _fill_codebook(codebook, vectors)
    return mimi.to(device).eval()


def _fill_codebook(codebook: nn.Module, vectors: torch.Tensor) -> None:
    """Set a moshi ``EuclideanCodebook``'s centroids (broadcast to its size) and mark it ready."""
    codebook.embedding_sum.copy_(vectors.expand_as(codebook.embedding_sum))
    codebook.cluster_usage.fill_(1.0)
    codebook._initialized.fill_(1.0)
    codebook._embedding = None


def _calibration_audio(seed: int, seconds: float = 6.0) -> torch.Tensor:
    """``[4, 1, S]`` 24 kHz: sines of several pitches and loudnesses, and noise."""
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * 24000)
    t = torch.arange(n) / 24000
    rows = []
    for k in range(4):
        f = 80 + 400 * torch.rand((), generator=g)
        env = 0.5 + 0.5 * torch.sin(2 * torch.pi * (0.2 + k * 0.3) * t)
        tone = 0.05 * (k + 1) * env * torch.sin(2 * torch.pi * f * t)
        rows.append(tone + 0.02 * k * torch.randn(n, generator=g))
    return torch.stack(rows)[:, None]


_TINY_WORDS = str.split(
    "alpha bravo charlie delta echo foxtrot golf hotel india juliett kilo lima mike november "
    "oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu one two three "
    "four five six seven eight nine zero hello world moshi speech memory test time training "
    "layer stream"
)


def build_tiny_tokenizer(vocab_size: int = 64, seed: int = 0) -> Any:
    """A ``sentencepiece.SentencePieceProcessor`` of exactly ``vocab_size`` pieces, trained in
    memory (about 30 ms) on random sentences of a fixed word list. Ids 0-3 are
    ``<unk> <s> </s> <pad>`` like Moshi's tokenizer (3 = text PAD)."""
    import sentencepiece

    rng = random.Random(seed)
    sentences = [" ".join(rng.choice(_TINY_WORDS) for _ in range(8)) for _ in range(200)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        minloglevel=2,
    )
    return sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())


# -- small file helpers -------------------------------------------------------------------------
def require_file(path: Path, what: str) -> Path:
    """``path`` if it is a file, else ``FileNotFoundError`` naming it and what it should be."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return Path(path)


def read_json(path: Path) -> Any:
    """Parse a JSON file; a missing file or bad JSON is an error naming the file."""
    require_file(path, "JSON file")
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def check_tensors(
    expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], file: str
) -> None:
    """Same keys and shapes, else a ``ValueError`` naming the first bad key and both shapes."""
    for name in _natural_sorted(set(expected) | set(found)):
        if name not in found:
            raise ValueError(f"{file} lacks {name!r} (shape {list(expected[name].shape)})")
        if name not in expected:
            raise ValueError(
                f"{file} has {name!r} (shape {list(found[name].shape)}), "
                "which the model does not have"
            )
        if tuple(found[name].shape) != tuple(expected[name].shape):
            raise ValueError(
                f"shape mismatch for {name!r}: {list(found[name].shape)} in {file}, "
                f"{list(expected[name].shape)} in the model"
            )


def safetensors_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a complete safetensors file (None if it is): its 8-byte header
    length, JSON header and size are checked; tensor data is not read, nothing is unpickled."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > min(size - 8, MAX_HEADER):
                return f"{size} bytes, no safetensors header (truncated, or another format)"
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "the header is not JSON (not a safetensors file)"
    except OSError as e:
        return f"cannot read it ({e.strerror or e})"
    if not isinstance(header, dict):
        return "the header is not a JSON object (not a safetensors file)"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                  default=0)  # fmt: skip
    except (TypeError, KeyError, IndexError, ValueError):
        return "malformed safetensors header (no data_offsets)"
    if 8 + n + end != size:
        return f"{size} bytes but its header describes {8 + n + end} (truncated or corrupt)"
    return None


def check_safetensors_suffix(path: str | Path, what: str) -> Path:
    """``path`` if its suffix is a safetensors one, else a ``ValueError`` naming it (the file
    is not opened: a pickle is never read)."""
    p = Path(path)
    if p.suffix not in SAFETENSORS_SUFFIXES:
        raise ValueError(
            f"{what} {p}: not a safetensors file (expected {'/'.join(SAFETENSORS_SUFFIXES)}); "
            "moshi-ttt never loads pickled weights (.pt, .pth, .bin, .ckpt): convert it to "
            "safetensors first"
        )
    return p


def check_safetensors(path: str | Path, what: str) -> Path:
    """``path`` if it names a complete safetensors file, else a ``ValueError`` naming it:
    another suffix (``.pt``, ``.bin``, ...) is refused before the file is opened; then the
    header and size are checked (``safetensors_problem``). A missing file is a
    ``FileNotFoundError``."""
    p = check_safetensors_suffix(path, what)
    require_file(p, what)
    problem = safetensors_problem(p)
    if problem is not None:
        raise ValueError(f"{p}: not a readable safetensors file ({what}): {problem}")
    return p


def load_safetensors(
    path: Path, device: torch.device | str = "cpu", what: str = "weights"
) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (``check_safetensors`` first); an unreadable file is
    a ``ValueError`` naming it."""
    check_safetensors(path, what)
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({what}): {e}") from e


def _natural_sorted(names: set[str]) -> list[str]:
    """Sort with numbers by value (layers.2 before layers.10)."""
    return sorted(
        names, key=lambda s: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]
    )
