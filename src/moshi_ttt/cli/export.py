"""``moshi-ttt export``: a thin shell over ``moshi_ttt.models.export.export_run``.

moshi-ttt export runs/tiny --out exports/tiny                 # the run's newest checkpoint
moshi-ttt export runs/tiny/checkpoints/step_000200 --out exports/tiny-200 --force
moshi-ttt train configs/next.yaml --set model.source=local --set model.path=exports/tiny
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..outputs import check_output_dir

DTYPE_NAMES = ("auto", "float32", "bfloat16")


def add_export_parser(subparsers: Any) -> None:
    """Register ``export`` on an ``add_subparsers()`` object."""
    p = subparsers.add_parser(
        "export",
        help="write a trained run as one model directory (a base for new runs, --base)",
        description="Rebuild the model RUN trained (base + LoRA + TTT + trained weights), merge "
        "its LoRA and write OUT/model.safetensors + OUT/config.json (moshi's LM kwargs and the "
        "TTT layers; Mimi and tokenizer copied for non-tiny bases). Use OUT as model.source: "
        "local, model.path: OUT, or --base OUT.",
    )
    p.add_argument(
        "run",
        metavar="RUN_OR_CHECKPOINT",
        help="run directory (its newest checkpoint) or a checkpoints/step_* dir",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty --out, replacing files of the same names",
    )
    p.add_argument("--device", default="cpu", help="where to rebuild the model (default cpu)")
    p.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        default="auto",
        help="weights dtype; auto: as the run's model loads (float32 on CPU)",
    )
    p.set_defaults(func=run_export)


def check_out_dir(out: Path, run: Path, ckpt: Path, force: bool) -> None:
    """``--out`` must be a new or empty directory (any directory with ``force``), and neither
    the run nor its checkpoint; else a ``ValueError`` naming it."""
    check_output_dir(out, "--out")
    if out.resolve() in (run.resolve(), ckpt.resolve(), ckpt.parent.resolve()):
        raise ValueError(f"--out {out}: is the run or its checkpoint; choose another directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        n = sum(1 for _ in out.iterdir())
        raise ValueError(
            f"--out {out}: not empty ({n} entries); pass --force to write into it "
            "(files of the same names are replaced)"
        )


def run_export(args: argparse.Namespace) -> Path:
    """Check the arguments (before any loading), export, print what was written."""
    import torch

    from ..models.export import export_run
    from ..models.runs import find_checkpoint
    from .common import resolve_device

    run, out = Path(args.run), Path(args.out)
    if not run.exists():
        raise FileNotFoundError(f"{run}: no such run or checkpoint directory")
    ckpt = find_checkpoint(run)
    check_out_dir(out, run, ckpt, args.force)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    export_run(run, out, device=resolve_device(args.device), dtype=dtype)
    print(summarize_export(out, ckpt))
    return out


def summarize_export(out: Path, ckpt: Path) -> str:
    """What ``export_run`` wrote into ``out`` and how to use it, a few lines."""
    config = json.loads((out / "config.json").read_text())
    entry = config["moshi_ttt"]
    weights = out / config["moshi_name"]
    lines = [
        f"exported {ckpt} -> {out}",
        f"  {weights.name}: {weights.stat().st_size / 2**20:.1f} MiB",
    ]
    ttt = entry.get("ttt_config")
    layers = f"TTT layers {entry['ttt_layers']} (kind {ttt['kind']})" if ttt else "no TTT layers"
    lora = entry.get("lora_merged")
    merged = f"LoRA rank {lora['rank']} merged" if lora else "no LoRA"
    lines.append(
        f"  config.json: moshi LM kwargs (dim {config.get('dim')}, "
        f"{config.get('num_layers')} layers), {layers}, {merged}, base {entry['base']}"
    )
    for key in ("mimi_name", "tokenizer_name"):
        if key in config:
            lines.append(f"  {config[key]}: copied from the base")
    lines.append(f"use it: model.source: local, model.path: {out}   (or --base {out})")
    return "\n".join(lines)
