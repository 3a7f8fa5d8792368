"""Command-line pieces shared by ``generate`` and ``eval``: choosing the model and the device.

Every model-taking subcommand accepts exactly one of ``--adapter DIR`` (a trained adapter on its
base), ``--base REPO_OR_DIR`` (a Hugging Face repo, a checkpoint directory with config.json, an
export, or a run / ``step_*`` directory as a frozen base with its LoRA merged),
``--run DIR`` (a ``moshi-ttt train`` run directory or one of its checkpoints, rebuilt from its
config) and ``--tiny`` (the tiny random Moshi-architecture model, for tests and CPU demos), plus
``--ttt-config YAML`` for ``--base``/``--tiny``, ``--device`` and ``--dtype``. Also the output
checks and the skipped-files summary every command prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

from .. import recipes
from ..integration.config import TTTConfig
from ..models.load import describe_spec
from ..models.spec import (
    DTYPES,
    LoadedModel,
    ModelConfig,
    ModelSpec,
    resolve_device,
    resolve_dtype,
)
from ..outputs import check_no_clobber

REPORT_FILES = ("report.md", "report.json")  # what marks a previous report in --out


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
    memory = p.add_mutually_exclusive_group()
    memory.add_argument(
        "--ttt-config",
        metavar="YAML",
        help="TTTConfig to apply to --tiny/--base: a YAML of its keys, or a training config "
        f"whose ttt: section is used (e.g. configs/moshi7b_e2e.yaml) (--tiny default: {default}; "
        "--base: none)",
    )
    memory.add_argument(
        "--memory",
        choices=["e2e"],
        help="add the shipped memory to --tiny/--base: e2e = the end-to-end memory after the "
        "last layer with the associative recall memory (moshi_ttt.recipes.e2e_memory, sized "
        "for the base: width 4x, K = C/8), zero-training",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="LM dtype; auto: bfloat16 on GPU, float32 on CPU")  # fmt: skip


def model_spec(args: argparse.Namespace, tiny_default_ttt: bool = True) -> ModelSpec | None:
    """The ``ModelSpec`` the flags name: the value a training config's ``seed`` / ``model`` /
    ``ttt`` / ``lora`` sections parse into (``--tiny``: ``source: tiny``, seed 0; ``--base``:
    ``source: local`` for a directory, else ``source: hf``; ``--ttt-config``: ``ttt``), or the
    spec a ``--run`` recorded; None for ``--adapter`` (its base and memory are in adapter.json).
    """
    from ..models.runs import find_checkpoint, run_spec

    memory = getattr(args, "memory", None)
    if (args.adapter or args.run) and (args.ttt_config or memory):
        option = "--ttt-config" if args.ttt_config else "--memory"
        raise ValueError(f"{option} cannot be combined with --adapter/--run (they record their "
                         "memory)")  # fmt: skip
    if args.run:
        return run_spec(find_checkpoint(args.run))
    if args.adapter:
        return None
    try:
        ttt = read_ttt_config(args.ttt_config) if args.ttt_config else None
    except ValueError as e:
        raise ValueError(f"--ttt-config {args.ttt_config}: {e}") from e
    if ttt is None and args.tiny and tiny_default_ttt and not memory:
        ttt = TTTConfig()
    dtype = args.dtype if args.dtype in ("auto", "bfloat16", "float32") else "auto"
    if args.tiny:
        model = ModelConfig(source="tiny", dtype=dtype)
    elif Path(args.base).is_dir():
        model = ModelConfig(source="local", path=args.base, dtype=dtype)
    else:
        model = ModelConfig(source="hf", hf_repo=args.base, dtype=dtype)
    spec = ModelSpec(seed=0, model=model, ttt=ttt)
    if memory == "e2e":  # sized for the base, read from its config files
        kw = describe_spec(spec).lm_kwargs
        spec = dataclasses.replace(spec, ttt=TTTConfig.from_dict(
            recipes.e2e_memory(int(kw["dim"]), int(kw["context"]))))  # fmt: skip
    return spec


def read_ttt_config(path: str | Path) -> TTTConfig:
    """A ``TTTConfig`` YAML: its keys at the top level, or a training config's ``ttt:``
    section (the configs in ``configs/``)."""
    data = yaml.safe_load(Path(path).read_text())
    if isinstance(data, dict) and "ttt" in data and isinstance(data["ttt"], dict | None):
        if data["ttt"] is None:
            raise ValueError("the training config's ttt: section is empty (no memory)")
        data = data["ttt"]
    return TTTConfig.from_dict(data if data is not None else {})


def load_model_from_args(
    args: argparse.Namespace, tiny_default_ttt: bool = True
) -> tuple[LoadedModel, torch.device, torch.dtype]:
    """``(the model named by add_model_args, in eval mode; device; dtype)``, loaded through
    ``models.load`` from ``model_spec(args)`` (``build``, or ``load_run`` for a run) or, for
    ``--adapter``, ``load_adapter``."""
    from ..models.load import build, load_adapter, load_run

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    spec = model_spec(args, tiny_default_ttt)
    if args.run:
        model, _ = load_run(args.run, device=device)
        model.lm = model.lm.to(dtype=dtype).eval()
        return model, device, dtype
    if args.adapter:
        if not Path(args.adapter).is_dir():
            raise FileNotFoundError(f"--adapter {args.adapter}: no such directory")
        return load_adapter(args.adapter, device=device, dtype=dtype), device, dtype
    try:  # the new TTT weights are seeded (spec.seed): the same command gives the same numbers
        model = build(spec, device, dtype)
    except ValueError as e:
        if spec.ttt is None or "layer spec" not in str(e):
            raise
        raise ValueError(f"--ttt-config {args.ttt_config or '(default)'}: layers: {e}") from e
    model.lm.eval()
    return model, device, dtype


def describe_model(model: LoadedModel, device: torch.device, dtype: torch.dtype) -> str:
    """One line: base, device, dtype and TTT layers."""
    layers = getattr(model.lm, "ttt_layers", [])
    kind = model.lm.ttt_config.kind if layers else "-"
    return (
        f"model: {model.base} on {device} "
        f"({str(dtype).removeprefix('torch.')}); TTT layers {layers or 'none'} (kind {kind})"
    )


# -- outputs and skipped files ------------------------------------------------------------------
def add_force_arg(p: argparse.ArgumentParser, text: str) -> None:
    """``--force``: replace what a previous run of the command left at the output path."""
    p.add_argument("--force", action="store_true", help=text)


def command_line(args: argparse.Namespace) -> str:
    """The command as typed, without ``--force``, ``--debug`` and ``--no-progress`` (recorded
    in a report: what made it)."""
    argv = [
        a for a in getattr(args, "argv", []) if a not in ("--force", "--debug", "--no-progress")
    ]
    return shlex.join(["moshi-ttt", *argv])


def check_report_dir(out: str | Path, force: bool) -> Path:
    """``--out`` of a report command: writable, and not holding a report unless ``force``."""
    return check_no_clobber(out, "--out", REPORT_FILES, force, what="report")


def print_bad_files(
    files: Sequence[dict[str, str]], total: int, full_list: str | Path, limit: int = 10
) -> None:
    """A few lines on stdout: how many of ``total`` files were skipped, the first ``limit`` of
    them with their reasons, and where the full list is."""
    if not files:
        return
    print(f"skipped {len(files)} of {total} files (full list: {full_list}):")
    for f in files[:limit]:
        detail = f": {f['detail']}" if f.get("detail") else ""
        print(f"  {f['name']}: {f['reason']}{detail}")
    if len(files) > limit:
        print(f"  ... {len(files) - limit} more")
