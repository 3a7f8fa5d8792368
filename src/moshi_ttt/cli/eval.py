"""``moshi-ttt eval ...``: evaluation commands (a thin shell over ``moshi_ttt.eval``).

    moshi-ttt eval long-context DATA --out DIR (--adapter DIR | --base REPO_OR_DIR | --tiny)
    moshi-ttt eval inner-loss   DATA --out DIR --adapter DIR
    moshi-ttt eval gating       DATA --out DIR --adapter DIR --gates 0,1e-3,learned,1 [--generate]

``DATA``: a directory of audio (LibriLight ``<speaker>/<book>/*.flac``), one audio file, a JSONL
index, or a tokenized shards directory; of stereo audio one channel is used, ``--channel``
(default right: the user's in moshi-finetune's layout), and the command says which. Each
command writes ``DIR/report.md``, ``DIR/report.json`` and PNG plots (a ``DIR`` holding a report
is refused without ``--force``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import (
    add_force_arg,
    add_model_args,
    check_report_dir,
    command_line,
    describe_model,
    load_model_from_args,
    print_bad_files,
)
from .eval_compare import add_compare_parsers
from .eval_pairs import add_pair_parsers
from .generate import add_channel_arg


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``eval`` and its subcommands on an ``add_subparsers()`` object."""
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model (long-context loss, inner loss, gate sweep, ...)",
        description="Evaluation commands; each writes OUT/report.md, report.json and plots.",
    )
    sub = p.add_subparsers(dest="eval_command", required=True, metavar="BENCHMARK")
    _add_long_context(sub)
    _add_inner_loss(sub)
    _add_gating(sub)
    add_pair_parsers(sub)  # sblimp / swuggy / storycloze (cli/eval_pairs.py)
    add_compare_parsers(sub)  # compare / summary (cli/eval_compare.py)
    return p


# -- shared arguments -------------------------------------------------------------------------
def add_eval_common_args(p: argparse.ArgumentParser) -> None:
    """``DATA``, ``--out``, the model (``--adapter | --base | --tiny`` ...), ``--no-progress``."""
    p.add_argument(
        "data",
        metavar="DATA",
        help="audio dir (LibriLight layout) or file, JSONL index, or shards dir",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="report directory")
    add_force_arg(p, "replace a report already in --out")
    add_model_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_control_args(p: argparse.ArgumentParser, controls: str) -> None:
    p.add_argument(
        "--controls",
        default=controls,
        help="comma list of 'reset' (TTT state reset), 'no_ttt' (gates 0), 'window' (shorter "
        "attention window), 'foreign' (another file's distant history), or 'none' "
        f"(default: {controls})",
    )
    p.add_argument(
        "--window",
        type=int,
        nargs="+",
        metavar="W",
        help="attention window(s) of the window control, frames (default: a quarter of the "
        "context, 750 for Moshi)",
    )
    p.add_argument(
        "--foreign-history",
        type=int,
        metavar="D",
        help="frames of history replaced by another file's in the foreign control "
        "(default: the attention context)",
    )
    p.add_argument(
        "--reset-every",
        type=int,
        nargs="+",
        metavar="N",
        help="frames between TTT resets of the reset control (default: the attention context)",
    )


def _add_run_args(p: argparse.ArgumentParser) -> None:
    add_channel_arg(p)
    p.add_argument(
        "--chunk-frames",
        type=int,
        default=250,
        metavar="N",
        help="frames per streaming call (default 250; 1 = token by token)",
    )
    p.add_argument(
        "--bin-frames",
        type=int,
        default=250,
        metavar="N",
        help="position bin in frames (default 250 = 20 s)",
    )
    p.add_argument(
        "--audio-stream",
        choices=["moshi", "user"],
        default="moshi",
        help="stream that carries the audio (default moshi: scored)",
    )
    p.add_argument(
        "--other-stream",
        choices=["zero", "silence"],
        default="zero",
        help="fill of the other audio stream: -1 or Mimi silence (default zero)",
    )
    p.add_argument(
        "--text",
        choices=["zero", "pad"],
        default="zero",
        help="text stream: -1 (no text loss) or PAD every frame (default zero)",
    )
    p.add_argument(
        "--metric",
        choices=["auto", "audio_ce", "cb0", "cb1_7", "text_ce", "moshi_loss"],
        default="auto",
        help="headline metric (default auto: audio CE when audio tokens are scored beyond "
        "the attention context, else text CE; moshi_loss: moshi-finetune's training loss, "
        "text with PAD/EPAD x0.5 + audio with codebook 0 x100)",
    )
    p.add_argument(
        "--equal-length",
        nargs="+",
        default=["auto"],
        metavar="L",
        help="equal-length curves: only files of >= L frames, cropped to L (default auto: "
        "the median file length; 'none' for none)",
    )
    p.add_argument("--max-files", type=int, metavar="N", help="only the first N files")
    p.add_argument("--max-frames", type=int, metavar="N", help="cut files to N frames")
    p.add_argument(
        "--speedup-frames",
        type=int,
        default=250,
        metavar="N",
        help="time token-by-token streaming vs chunks on the first N frames of the "
        "first file (default 250; 0 skips)",
    )


def _add_long_context(sub: Any) -> None:
    p = sub.add_parser(
        "long-context",
        help="loss against position over whole long files",
        description="Per-position text and per-codebook CE over whole files, "
        "chunked streaming with the TTT state carried; controls: TTT reset "
        "every N frames, gates forced to 0.",
    )
    add_eval_common_args(p)
    _add_run_args(p)
    _add_control_args(p, "reset,no_ttt")
    p.set_defaults(func=run_long_context)


def _add_inner_loss(sub: Any) -> None:
    p = sub.add_parser(
        "inner-loss",
        help="TTT inner losses l0/lprev/lafter against position",
        description="The inner-loss diagnostic (Figure 5) per TTT layer, beside "
        "the long-context loss of the same run.",
    )
    add_eval_common_args(p)
    _add_run_args(p)
    _add_control_args(p, "no_ttt")
    p.set_defaults(func=run_inner_loss)


def _add_gating(sub: Any) -> None:
    p = sub.add_parser(
        "gating",
        help="long-context loss with the gates forced to values",
        description="Long-context loss per forced gate value (and, with "
        "--generate, a generated sample per value).",
    )
    add_eval_common_args(p)
    _add_run_args(p)
    p.add_argument(
        "--gates",
        default="0,1e-3,learned,1.0",
        help="comma list of gate values and 'learned' (default 0,1e-3,learned,1.0)",
    )
    p.add_argument(
        "--generate", action="store_true", help="also generate a short sample per gate value"
    )
    p.add_argument(
        "--generate-input",
        metavar="WAV",
        help="user audio for --generate (default: the first audio file of DATA)",
    )
    p.add_argument(
        "--generate-seconds",
        type=float,
        default=10.0,
        help="seconds of input for --generate (default 10)",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed for --generate")
    p.set_defaults(func=run_gating)


# -- running ----------------------------------------------------------------------------------
def _controls(text: str) -> tuple[str, ...]:
    items = tuple(c.strip() for c in text.split(",") if c.strip())
    return () if items in ((), ("none",)) else items


def _check_numbers(args: argparse.Namespace) -> None:
    for name in ("chunk_frames", "bin_frames"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.speedup_frames < 0:
        raise ValueError("--speedup-frames must be >= 0")
    for name in ("max_files", "max_frames"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if any(n < 1 for n in getattr(args, "reset_every", None) or ()):
        raise ValueError(f"--reset-every must be >= 1 frames, got {args.reset_every}")
    if any(n < 1 for n in getattr(args, "window", None) or ()):
        raise ValueError(f"--window must be >= 1 frames, got {args.window}")
    if (getattr(args, "foreign_history", None) or 1) < 1:
        raise ValueError(f"--foreign-history must be >= 1 frames, got {args.foreign_history}")
    _equal_lengths(args)


def _equal_lengths(args: argparse.Namespace) -> list[int] | str:
    """``--equal-length``: ``"auto"``, ``[]`` (none) or frames."""
    values = list(getattr(args, "equal_length", None) or ["auto"])
    if values in (["auto"], ["none"]):
        return "auto" if values == ["auto"] else []
    try:
        frames = [int(v) for v in values]
    except ValueError:
        raise ValueError(f"--equal-length: 'auto', 'none' or frames, got {values}") from None
    if any(v < 1 for v in frames):
        raise ValueError(f"--equal-length must be >= 1 frames, got {frames}")
    return frames


def _prepare(args: argparse.Namespace) -> tuple[Any, Any, Any, dict[str, Any]]:
    """Check the arguments, load the model, open the inputs: ``(lm, the LoadedModel, inputs,
    setup)``."""
    from ..eval.inputs import EvalInputs, StreamPlacement
    from ..models.load import load_codec
    from ..models.provenance import provenance

    _check_numbers(args)
    placement = StreamPlacement(args.audio_stream, args.other_stream, args.text)
    if not Path(args.data).exists():  # before loading a 15 GB model
        raise FileNotFoundError(f"evaluation data not found: {args.data}")
    check_report_dir(args.out, args.force)
    loaded, device, dtype = load_model_from_args(args)
    lm = loaded.lm
    model = describe_model(loaded, device, dtype)
    print(model)
    shards = (Path(args.data) / "shards.json").is_file() or Path(args.data).name == "shards.json"
    mimi = None if shards else load_codec(loaded, device=device)[0]
    inputs = EvalInputs(
        args.data, mimi, placement, max_files=args.max_files, max_frames=args.max_frames,
        channel=args.channel,
    )  # fmt: skip
    setup = {
        "command": command_line(args),
        "model": model.removeprefix("model: "),
        "provenance": provenance(loaded),  # report.json's "provenance" (write_run_info)
        # channels_used: the live counter, filled as the files are read (before the report)
        "data": inputs.describe() | {"channels_used": inputs.channels_used},
        "dtype": str(dtype).removeprefix("torch."),
    }
    return lm, loaded, inputs, setup


def _finish(result: Any, args: argparse.Namespace, inputs: Any = None) -> None:
    """Print the summary (the channel used of stereo ``inputs``; ``long_context.summary_lines``:
    per variant the CE beyond and inside the attention context on the headline metric,
    4 decimals, and the differences against the primary); no usable file is an error (after
    the report is written)."""
    from ..eval.long_context import summary_lines

    out = args.out
    bad = result.bad.get("bad_files", [])
    if inputs is not None and (line := inputs.channel_line()):
        print(line)
    print(f"evaluated {len(result.files)} files ({len(bad)} skipped); wrote {out}/report.md")
    print_bad_files(bad, len(result.files) + len(bad), f"{out}/report.json")
    if result.files:
        summary = result.summary()
        for line in summary_lines(summary):
            print(line)
        if note := _interval_note(summary):
            print(f"  {note}: the differences above have no 95 % CI or p-value")
    if result.speedup:
        print(f"  chunked vs token-by-token streaming: x{result.speedup['speedup']:.1f}")
    if not result.files:
        raise ValueError(f"no usable file in {args.data} (see {out}/report.md)")


def _interval_note(summary: dict[str, Any]) -> str | None:
    """The ``note`` of the file intervals (``"n = 1: no interval (fewer than 5 files)"``)
    when there are too few files for them, else None."""
    for entry in summary.get("intervals", {}).get("difference", {}).values():
        for ci in entry.values():
            if isinstance(ci, dict) and ci.get("note"):
                return str(ci["note"])
    return None


def _run_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "chunk_frames": args.chunk_frames,
        "speedup_frames": args.speedup_frames,
        "bin_frames": args.bin_frames,
        "progress": not args.no_progress,
    }


def run_long_context(args: argparse.Namespace) -> Any:
    from ..eval.long_context import evaluate_long_context, write_long_context_report

    lm, _, inputs, setup = _prepare(args)
    controls = _controls(args.controls)
    result = evaluate_long_context(
        lm, inputs, reset_every=args.reset_every, controls=controls, window=args.window,
        foreign_history=args.foreign_history, equal_lengths=_equal_lengths(args),
        **_run_kwargs(args),
    )  # fmt: skip
    result.metric = args.metric
    write_long_context_report(result, args.out, setup=setup)
    _finish(result, args, inputs)
    return result


def run_inner_loss(args: argparse.Namespace) -> Any:
    from ..eval.inner_loss import evaluate_inner_loss, write_inner_loss_report

    lm, _, inputs, setup = _prepare(args)
    controls = _controls(args.controls)
    result = evaluate_inner_loss(
        lm, inputs, reset_every=args.reset_every, controls=controls, **_run_kwargs(args)
    )
    result.metric = args.metric
    report = write_inner_loss_report(result, args.out, setup=setup)
    for layer, v in report.data.get("inner_loss", {}).get("verdicts", {}).items():
        print(f"  {layer}: {v['text']}")
    _finish(result, args, inputs)
    return result


def run_gating(args: argparse.Namespace) -> Any:
    from ..eval.gating import evaluate_gating, generate_per_gate, parse_gates, write_gating_report
    from ..models.load import load_codec

    gates = parse_gates(args.gates)
    if args.generate_input and not Path(args.generate_input).is_file():
        raise FileNotFoundError(f"--generate-input not found: {args.generate_input}")
    if args.generate_seconds <= 0:
        raise ValueError(f"--generate-seconds must be > 0, got {args.generate_seconds}")
    lm, loaded, inputs, setup = _prepare(args)
    result = evaluate_gating(lm, inputs, gates, **_run_kwargs(args))
    result.metric = args.metric
    samples = None
    if args.generate:
        used = [f["name"] for f in result.files] if inputs.kind != "shards" else []
        wav = args.generate_input or next(iter(used), None)
        if wav is None:
            raise ValueError("--generate needs --generate-input WAV (no usable audio in DATA)")
        mimi, tokenizer = load_codec(loaded, device=next(lm.parameters()).device)
        samples = generate_per_gate(
            lm, mimi, tokenizer, wav, gates, args.out, seconds=args.generate_seconds,
            seed=args.seed, channel=args.channel,
        )  # fmt: skip
        setup["generate_input"] = str(wav)
    write_gating_report(result, args.out, setup=setup, samples=samples)
    for label, s in (samples or {}).items():
        print(f"  {label}: {s['text'] or '(silence)'}")
    _finish(result, args, inputs)
    return result
