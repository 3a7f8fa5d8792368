"""Command-line pieces shared by ``generate`` and ``eval``: choosing the model and the device.

Every model-taking subcommand accepts exactly one of ``--adapter DIR`` (a trained adapter on its
base), ``--base REPO_OR_DIR`` (a Hugging Face repo, a checkpoint directory with config.json, an
export, or a run / ``step_*`` directory as a frozen base with its LoRA merged),
``--run DIR`` (a ``moshi-ttt train`` run directory or one of its checkpoints, rebuilt from its
config) and ``--tiny`` (the tiny random Moshi-architecture model, for tests and CPU demos), plus
``--ttt-config YAML`` for ``--base``/``--tiny``, ``--device`` and ``--dtype``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_model_args(p: argparse.ArgumentParser, tiny_default_ttt: bool = True) -> None:
    """``--adapter | --base | --tiny``, ``--ttt-config``, ``--device``, ``--dtype``."""
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--adapter", metavar="DIR", help="adapter directory (its base is loaded)")
    model.add_argument("--tiny", action="store_true", help="tiny random Moshi (CPU demo/tests)")
    model.add_argument(
        "--base",
        metavar="REPO_OR_DIR",
        help="HF repo id, checkpoint dir, `moshi-ttt export` dir, or a run dir (LoRA merged)",
    )
    model.add_argument(
        "--run", metavar="DIR", help="a training run (its newest checkpoint) or checkpoint dir"
    )
    default = "TTTConfig()" if tiny_default_ttt else "none"
    p.add_argument(
        "--ttt-config",
        metavar="YAML",
        help=f"TTTConfig to apply to --tiny/--base (--tiny default: {default}; --base: none)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="LM dtype; auto: bfloat16 on GPU, float32 on CPU")  # fmt: skip


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; an unavailable cuda is a ``ValueError``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on GPU, float32 elsewhere."""
    return DTYPES.get(name) or (torch.bfloat16 if device.type == "cuda" else torch.float32)


def load_model_from_args(
    args: argparse.Namespace, tiny_default_ttt: bool = True
) -> tuple[Any, Any, torch.device, torch.dtype]:
    """``(lm, checkpoint_info, device, dtype)`` for the model named by ``add_model_args``."""
    from .checkpoints.adapter import load_adapter
    from .checkpoints.loading import load_base_lm
    from .integration import TTTConfig, apply_ttt

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if (args.adapter or args.run) and args.ttt_config:
        raise ValueError("--ttt-config cannot be combined with --adapter/--run (they record it)")
    if args.run:
        from .train.checkpoint import load_trained_model

        lm, cfg = load_trained_model(args.run, device=device)
        return lm.to(dtype=dtype).eval(), None, device, dtype
    if args.adapter:
        if not Path(args.adapter).is_dir():
            raise FileNotFoundError(f"--adapter {args.adapter}: no such directory")
        lm, info = load_adapter(args.adapter, device=device, dtype=dtype)
    else:
        lm, info = load_base_lm("tiny" if args.tiny else args.base, device=device, dtype=dtype)
        if args.ttt_config:
            apply_ttt(lm, TTTConfig.from_yaml(args.ttt_config))
        elif args.tiny and tiny_default_ttt:
            apply_ttt(lm, TTTConfig())
    return lm.eval(), info, device, dtype


def describe_model(lm: Any, device: torch.device, dtype: torch.dtype) -> str:
    """One line: base, device, dtype and TTT layers."""
    layers = getattr(lm, "ttt_layers", [])
    kind = lm.ttt_config.kind if layers else "-"
    return (
        f"model: {getattr(lm, 'moshi_ttt_base', '?')} on {device} "
        f"({str(dtype).removeprefix('torch.')}); TTT layers {layers or 'none'} (kind {kind})"
    )
