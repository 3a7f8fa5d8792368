"""``moshi-ttt eval sblimp | swuggy | storycloze``: a thin shell over ``eval.pair_report``.

    moshi-ttt eval swuggy DATA/lexical --split dev --adapter runs/x/adapter --out eval/swuggy
    moshi-ttt eval sblimp DATA --base kyutai/moshiko-pytorch-bf16 --out eval/sblimp
    moshi-ttt eval storycloze DATA/sSC --tiny --out /tmp/sc --max-items 20
    moshi-ttt eval sblimp DATA --text-fill greedy --score text+audio --out eval/sblimp_im
    moshi-ttt eval sblimp DATA --protocol-sweep --out eval/sblimp_sweep

``add_pair_parsers(eval_subparsers)`` registers the three commands on ``moshi-ttt eval``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from ..eval.likelihood import FILLS, REDUCTIONS, SCORED, STREAMS, TEXT_FILLS
from ..eval.pair_report import TITLES
from ..eval.pairs import (
    PairSet,
    read_storycloze,
    read_zerospeech_lexical,
    read_zerospeech_syntactic,
)
from .common import add_force_arg, add_model_args, check_report_dir, command_line


def _readers(args: argparse.Namespace) -> dict[str, Callable[[], PairSet]]:
    return {
        "swuggy": lambda: read_zerospeech_lexical(args.data, args.split),
        "sblimp": lambda: read_zerospeech_syntactic(args.data, args.split),
        "storycloze": lambda: read_storycloze(args.data),
    }


def add_pair_parsers(subparsers: Any) -> dict[str, argparse.ArgumentParser]:
    """Register ``sblimp``, ``swuggy`` and ``storycloze`` on an ``add_subparsers()`` object."""
    helps = {
        "sblimp": ("sBLIMP: grammatical vs ungrammatical sentences", "syntactic"),
        "swuggy": ("sWUGGY: words vs non-words", "lexical"),
        "storycloze": ("spoken StoryCloze: true vs false story endings", None),
    }
    parsers = {}
    for name, (text, part) in helps.items():
        p = subparsers.add_parser(
            name,
            help=text,
            description=f"{TITLES[name]}: pairwise accuracy of Moshi's audio log-likelihood "
            "(ties count 0.5). Writes OUT/report.md, report.json, scores.csv and plots.",
        )
        where = (
            f"ZeroSpeech 2021 root, {part}/ or {part}/SPLIT/ (with gold.csv)"
            if part
            else "directory of <n>_<uuid>_correct.wav / _incorrect.wav (any depth)"
        )
        p.add_argument("data", help=where)
        p.add_argument("--out", required=True, metavar="DIR", help="report directory")
        add_force_arg(p, "replace a report already in --out")
        add_model_args(p)
        if part:
            p.add_argument("--split", choices=["dev", "test"], default="dev", help="default dev")
        p.add_argument(
            "--codebooks",
            default="0",
            help="codebooks scored: 0 (semantic, default), 0-7, all, 0,1,2",
        )
        p.add_argument(
            "--reduction",
            choices=REDUCTIONS,
            default="mean",
            help="headline: mean per token or sum (both are reported)",
        )
        p.add_argument(
            "--stream",
            choices=STREAMS,
            default="moshi",
            help="stream carrying the audio (user: needs dep_q = 16)",
        )
        p.add_argument(
            "--other-stream",
            choices=FILLS,
            default="zero",
            help="other audio stream: zero (-1) or Mimi-encoded silence",
        )
        p.add_argument(
            "--text-fill",
            "--text",
            dest="text",
            choices=TEXT_FILLS,
            default="zero",
            help="text stream: zero (-1, default), pad (PAD 3 every frame) or greedy (the "
            "model's own greedy text fed back causally: Inner Monologue)",
        )
        p.add_argument(
            "--score",
            choices=SCORED,
            default="audio",
            help="streams scored: audio (default) or text+audio (plus the log-likelihood of "
            "the filled text; needs --text-fill pad or greedy)",
        )
        p.add_argument(
            "--protocol-sweep",
            action="store_true",
            help="also score under every text fill x codebooks (0, all) x reduction x scored "
            "streams and tabulate how far the accuracy moves (one forward per text fill)",
        )
        p.add_argument("--batch-size", type=int, default=16, help="files per forward")
        p.add_argument(
            "--max-items",
            type=int,
            metavar="N",
            help="quick run: ~N pairs (whole groups drawn at random, seed 0)",
        )
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.set_defaults(func=run_pairs, benchmark=name)
        parsers[name] = p
    return parsers


def run_pairs(args: argparse.Namespace) -> dict[str, Any]:
    """CLI body: check the output and read the pairs (user errors first), load the model,
    score, write the report; nothing scored is an error (after the report is written)."""
    from ..eval.likelihood import ScoringConfig, parse_codebooks, stream_size
    from ..eval.pair_report import evaluate_pairs
    from ..models.load import load_codec
    from ..models.provenance import provenance
    from .common import describe_model, load_model_from_args, print_bad_files

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    if args.max_items is not None and args.max_items < 1:
        raise ValueError(f"--max-items must be positive, got {args.max_items}")
    parse_codebooks(args.codebooks, 64)  # syntax, before loading a large model
    ScoringConfig(text=args.text, score=args.score)  # text+audio needs text: before loading
    pairs = _readers(args)[args.benchmark]().sample(args.max_items)
    if not pairs.pairs:
        raise ValueError(f"{pairs.source}: no complete pair ({len(pairs.problems)} unpaired)")
    check_report_dir(args.out, args.force)
    loaded, device, dtype = load_model_from_args(args)
    lm = loaded.lm
    mimi, _ = load_codec(loaded, device=device)
    config = ScoringConfig(
        stream=args.stream,
        other_stream=args.other_stream,
        text=args.text,
        codebooks=parse_codebooks(args.codebooks, stream_size(lm)),
        score=args.score,
    )
    model = describe_model(loaded, device, dtype)
    print(model)
    data = evaluate_pairs(
        pairs,
        lm,
        mimi,
        args.out,
        config,
        args.reduction,
        args.batch_size,
        progress=not args.no_progress,
        model=model,
        setup={"command": command_line(args), "provenance": provenance(loaded)},
        sweep=args.protocol_sweep,
    )
    bad = [{"name": k, "reason": v} for k, v in data["bad_files"].items()]
    print_bad_files(bad, len(pairs.paths()), f"{args.out}/report.json")
    if data["n_pairs"] == 0:  # not "nan % over 0 pairs" with exit 0
        raise ValueError(
            f"{pairs.source}: no pair could be scored ({data['n_bad_files']} of "
            f"{data['n_files']} files unusable); report: {args.out}/report.md"
        )
    print(
        f"{args.benchmark}: accuracy {100 * data['accuracy']:.2f} % ({args.reduction}) over "
        f"{data['n_pairs']} pairs; {data['n_bad_files']} bad files; wrote {args.out}/report.md"
    )
    if "sweep" in data:
        sw = data["sweep"]
        print(
            f"protocol sweep: {len(sw['rows'])} protocols, accuracy spread (max - min) "
            f"{100 * sw['spread']:.2f} points; max {sw['max']}; min {sw['min']}"
        )
    return data
