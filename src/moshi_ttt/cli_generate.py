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

from .cli_common import add_model_args, describe_model, load_model_from_args


def add_generate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``generate`` subcommand on an ``add_subparsers()`` object."""
    p = subparsers.add_parser(
        "generate",
        help="run Moshi (with TTT layers) on a user recording, frame by frame",
        description="Offline streaming inference: Mimi encode, LMGen step by step, Mimi decode. "
        "Writes the output wav and Moshi's text stream and prints the real-time factor.",
    )
    add_model_args(p)
    p.add_argument("--input", required=True, metavar="WAV", help="user audio (any rate, mono)")
    p.add_argument("--output", required=True, metavar="WAV", help="Moshi's audio (24 kHz)")
    p.add_argument("--text", metavar="TXT", help="Moshi's text stream (default: OUTPUT.txt)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--max-seconds", type=float, help="only the first seconds of the input")
    p.add_argument("--temp", type=float, default=0.8, help="audio sampling temperature")
    p.add_argument("--temp-text", type=float, default=0.7, help="text sampling temperature")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_generate)
    return p


def run_generate(args: argparse.Namespace) -> dict[str, Any]:
    """Load the model and codec named by ``args``, run ``generate``, print the summary."""
    from .checkpoints.loading import load_codec
    from .generate import generate

    if not Path(args.input).is_file():  # before loading a 15 GB model
        raise FileNotFoundError(f"input audio not found: {args.input}")
    lm, info, device, dtype = load_model_from_args(args)
    mimi, tokenizer = load_codec(lm, info, device=device)
    text_path = args.text or str(Path(args.output).with_suffix(".txt"))
    print(describe_model(lm, device, dtype))
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
