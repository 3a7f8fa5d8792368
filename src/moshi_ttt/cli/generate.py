"""``moshi-ttt generate``: offline streaming inference from the command line.

    moshi-ttt generate --adapter DIR --input user.wav --output out.wav
    moshi-ttt generate --tiny --input user.wav --output out.wav --text out.txt
    moshi-ttt generate --base kyutai/moshiko-pytorch-bf16 --ttt-config ttt.yaml --input ...

The input is read and the outputs checked before the model loads: an unreadable or non-finite
input, an output path that cannot be written, does not end in ``.wav`` or (without ``--force``)
already exists is refused. A stereo input gives one channel, ``--channel`` (default right: the
user's in moshi-finetune's layout, left = Moshi), or both averaged (``mix``); the command says
which it used.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..generate import CHANNELS, DEFAULT_CHANNEL, check_wav_suffix
from ..outputs import check_output_file
from .common import add_force_arg, add_model_args, describe_model, load_model_from_args


def add_generate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``generate`` subcommand on an ``add_subparsers()`` object."""
    p = subparsers.add_parser(
        "generate",
        help="run Moshi (with TTT layers) on a user recording, frame by frame",
        description="Offline streaming inference: Mimi encode, LMGen step by step, Mimi decode. "
        "Writes the output wav and Moshi's text stream and prints the real-time factor.",
    )
    add_model_args(p)
    p.add_argument("--input", required=True, metavar="WAV", help="user audio (any rate)")
    add_channel_arg(p)
    p.add_argument(
        "--output", required=True, metavar="WAV", help="Moshi's audio (24 kHz mono, .wav only)"
    )
    p.add_argument("--text", metavar="TXT", help="Moshi's text stream (default: OUTPUT.txt)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--max-seconds", type=float, help="only the first seconds of the input")
    p.add_argument("--temp", type=float, default=0.8, help="audio sampling temperature")
    p.add_argument("--temp-text", type=float, default=0.7, help="text sampling temperature")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_force_arg(p, "replace existing --output / --text files")
    p.set_defaults(func=run_generate)
    return p


def run_generate(args: argparse.Namespace) -> dict[str, Any]:
    """Load the model and codec named by ``args``, run ``generate``, print the summary."""
    from ..generate import CHANNEL_TEXT, generate, read_audio
    from ..models.load import load_codec

    text_path = check_inputs(args)
    # decodable, non-empty, finite: before loading a 15 GB model
    _, used = read_audio(args.input, channel=args.channel)
    option = "" if used == "mono" else f" (--channel {args.channel})"
    print(f"input: {args.input}, {CHANNEL_TEXT[used]}{option}")
    loaded, device, dtype = load_model_from_args(args)
    lm = loaded.lm
    mimi, tokenizer = load_codec(loaded, device=device)
    print(describe_model(loaded, device, dtype))
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
        channel=args.channel,
    )
    print(f"wrote {stats['output_wav']} and {stats['text_path']}")
    print(
        f"real-time factor: {stats['rtf']:.3f} ({stats['wall_s']:.2f} s for "
        f"{stats['audio_s']:.2f} s of audio, {stats['ms_per_frame']:.1f} ms per 80 ms frame)"
    )
    if "e2e_updates" in stats:  # the end-to-end memory learned while it streamed
        print(f"end-to-end memory: {stats['e2e_updates']} updates, "
              f"{stats['e2e_ms_per_update']:.1f} ms each, {stats['e2e_rollbacks']} rolled "
              "back")  # fmt: skip
    return stats


def add_channel_arg(p: argparse.ArgumentParser) -> None:
    """``--channel left|right|mix``: which channel of a stereo input is the user's."""
    p.add_argument(
        "--channel",
        choices=CHANNELS,
        default=DEFAULT_CHANNEL,
        help="channel of a stereo input to use: left, right or mix (both averaged); default "
        f"{DEFAULT_CHANNEL}, the user's in moshi-finetune's layout (left = Moshi, right = user)",
    )


def check_inputs(args: argparse.Namespace) -> str:
    """Numbers, the input file and the output paths, before any loading; returns the text
    output path (``--text`` or ``OUTPUT.txt``)."""
    if not Path(args.input).is_file():
        raise FileNotFoundError(f"input audio not found: {args.input} (--input)")
    if args.max_seconds is not None and not args.max_seconds > 0:
        raise ValueError(f"--max-seconds must be > 0, got {args.max_seconds}")
    for name in ("temp", "temp_text"):
        value = getattr(args, name)
        if not value >= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    text_path = args.text or str(Path(args.output).with_suffix(".txt"))
    check_wav_suffix(args.output, "--output")
    outputs = {"--output": Path(args.output), "--text": Path(text_path)}
    if outputs["--output"].absolute() == outputs["--text"].absolute():
        raise ValueError(f"--text {text_path}: the same file as --output")
    for key, path in outputs.items():
        if path.absolute() == Path(args.input).absolute():
            raise ValueError(f"{key} {path}: is the input file; choose another path")
        check_output_file(path, key, args.force)
    return text_path
