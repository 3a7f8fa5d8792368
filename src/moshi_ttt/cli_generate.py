"""``moshi-ttt generate``: offline streaming inference from the command line.

    moshi-ttt generate --adapter DIR --input user.wav --output out.wav
    moshi-ttt generate --tiny --input user.wav --output out.wav --text out.txt
    moshi-ttt generate --base kyutai/moshiko-pytorch-bf16 --ttt-config ttt.yaml --input ...

User errors are ``ValueError`` / ``FileNotFoundError`` (``moshi-ttt`` prints them as one line).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_generate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``generate`` subcommand on an ``add_subparsers()`` object."""
    p = subparsers.add_parser(
        "generate",
        help="run Moshi (with TTT layers) on a user recording, frame by frame",
        description="Offline streaming inference: Mimi encode, LMGen step by step, Mimi decode. "
        "Writes the output wav and Moshi's text stream and prints the real-time factor.",
    )
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--adapter", metavar="DIR", help="adapter directory (its base is loaded)")
    model.add_argument(
        "--tiny", action="store_true", help="tiny random Moshi + tiny Mimi (CPU demo/tests)"
    )
    model.add_argument(
        "--base", metavar="REPO_OR_DIR", help="HF repo id, checkpoint or merged directory"
    )
    p.add_argument(
        "--ttt-config",
        metavar="YAML",
        help="TTTConfig to apply to --tiny/--base (--tiny default: TTTConfig(); --base: none)",
    )
    p.add_argument("--input", required=True, metavar="WAV", help="user audio (any rate, mono)")
    p.add_argument("--output", required=True, metavar="WAV", help="Moshi's audio (24 kHz)")
    p.add_argument("--text", metavar="TXT", help="Moshi's text stream (default: OUTPUT.txt)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="LM dtype; auto: bfloat16 on GPU, float32 on CPU")  # fmt: skip
    p.add_argument("--max-seconds", type=float, help="only the first seconds of the input")
    p.add_argument("--temp", type=float, default=0.8, help="audio sampling temperature")
    p.add_argument("--temp-text", type=float, default=0.7, help="text sampling temperature")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_generate)
    return p


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


def run_generate(args: argparse.Namespace) -> dict[str, Any]:
    """Load the model and codec named by ``args``, run ``generate``, print the summary."""
    from .generate import generate
    from .integration import TTTConfig, apply_ttt
    from .integration.adapter import load_adapter
    from .integration.loading import load_base_lm, load_codec

    device = resolve_device(args.device)
    dtype = DTYPES.get(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if not Path(args.input).is_file():  # before loading a 15 GB model
        raise FileNotFoundError(f"input audio not found: {args.input}")
    if args.adapter and args.ttt_config:
        raise ValueError("--ttt-config cannot be combined with --adapter (it records its own)")
    if args.adapter:
        lm, info = load_adapter(args.adapter, device=device, dtype=dtype)
    else:
        lm, info = load_base_lm("tiny" if args.tiny else args.base, device=device, dtype=dtype)
        if args.ttt_config:
            apply_ttt(lm, TTTConfig.from_yaml(args.ttt_config))
        elif args.tiny:
            apply_ttt(lm, TTTConfig())
    mimi, tokenizer = load_codec(lm, info, device=device)
    text_path = args.text or str(Path(args.output).with_suffix(".txt"))
    layers = getattr(lm, "ttt_layers", [])
    kind = lm.ttt_config.kind if layers else "-"
    print(f"model: {lm.moshi_ttt_base} on {device} ({str(dtype).removeprefix('torch.')}); "
          f"TTT layers {layers or 'none'} (kind {kind})")  # fmt: skip
    stats = generate(
        lm,
        mimi,
        tokenizer,
        args.input,
        args.output,
        text_path,
        seed=args.seed,
        max_seconds=args.max_seconds,
        temp=args.temp,
        temp_text=args.temp_text,
        progress=not args.no_progress,
    )
    print(f"wrote {stats['output_wav']} and {stats['text_path']}")
    print(
        f"real-time factor: {stats['rtf']:.3f} ({stats['wall_s']:.2f} s for "
        f"{stats['audio_s']:.2f} s of audio, {stats['ms_per_frame']:.1f} ms per 80 ms frame)"
    )
    return stats
