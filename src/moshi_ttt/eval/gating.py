"""Gate sweep: the long-context loss of a TTT model with its gates forced to a list of values.

``gates`` mixes floats and ``None`` (= the learned gates), e.g. ``parse_gates("0,1e-3,learned,1")``.
A forced value replaces ``tanh(alpha)`` of every gated TTT branch (and scales In-Place TTT's
correction): 0 is the base model. Each value is one ``Variant`` of the same chunked run
(``long_context.evaluate_variants``); optionally a short generated sample per value
(``generate_per_gate``) shows what the numbers sound like (the seeds' "not talkative" model).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from moshi.models.lm import LMModel

from ..generate import DEFAULT_CHANNEL, generate
from ..integration.apply import set_gates, ttt_modules
from .long_context import (
    LongContextResult,
    Variant,
    evaluate_variants,
    write_result_section,
    write_run_info,
)
from .report import Report

LEARNED = "learned"


def parse_gates(spec: str | Sequence[float | str | None]) -> list[float | None]:
    """``"0,1e-3,learned,1.0"`` (or a list) -> ``[0.0, 0.001, None, 1.0]``; order kept."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[float | None] = []
    for item in items:
        text = str(item).strip().lower() if item is not None else LEARNED
        if text in (LEARNED, "none"):
            value = None
        else:
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"gate {item!r}: expected a number or 'learned'") from None
            if value != value or abs(value) == float("inf"):
                raise ValueError(f"gate {item!r} must be finite")
        if value not in out:
            out.append(value)
    if not out:
        raise ValueError("no gate value given")
    return out


def gate_label(gate: float | None) -> str:
    return LEARNED if gate is None else f"gate={gate:g}"


def evaluate_gating(
    lm: LMModel,
    files: Iterable[tuple[str, torch.Tensor]],
    gates: Sequence[float | None],
    *,
    chunk_frames: int = 250,
    speedup_frames: int = 0,
    bin_frames: int = 250,
    progress: bool = True,
) -> LongContextResult:
    """Per-position losses with the gates forced to each value (``gate_label`` names the
    curves; the reference is ``learned`` when listed, else the first)."""
    if not ttt_modules(lm):
        raise ValueError("gating needs a model with TTT layers (--adapter, or --ttt-config)")
    variants = {gate_label(g): Variant(gate=g) for g in gates}
    primary = LEARNED if LEARNED in variants else next(iter(variants))
    return evaluate_variants(
        lm,
        files,
        variants,
        chunk_frames=chunk_frames,
        primary=primary,
        speedup_frames=speedup_frames,
        bin_frames=bin_frames,
        progress=progress,
    )


def generate_per_gate(
    lm: LMModel,
    mimi: Any,
    tokenizer: Any,
    input_wav: str | Path,
    gates: Sequence[float | None],
    out_dir: str | Path,
    *,
    seconds: float = 10.0,
    seed: int = 0,
    progress: bool = False,
    channel: str = DEFAULT_CHANNEL,
) -> dict[str, dict[str, Any]]:
    """For each gate value, ``generate`` Moshi's answer to the first ``seconds`` of
    ``input_wav`` (same seed; of a stereo input its ``channel``): ``{label: {"text", "wav",
    "rtf"}}``; wavs in ``out_dir``."""
    out: dict[str, dict[str, Any]] = {}
    try:
        for g in gates:
            label = gate_label(g)
            set_gates(lm, g)
            slug = label.replace("=", "_")
            stats = generate(
                lm,
                mimi,
                tokenizer,
                input_wav,
                Path(out_dir) / f"sample_{slug}.wav",
                Path(out_dir) / f"sample_{slug}.txt",
                seed=seed,
                max_seconds=seconds,
                progress=progress,
                channel=channel,
            )
            out[label] = {
                "text": stats["text"],
                "wav": Path(stats["output_wav"]).name,
                "rtf": stats["rtf"],
            }
    finally:
        set_gates(lm, None)
    return out


def write_gating_report(
    result: LongContextResult,
    out_dir: str | Path,
    *,
    bin_frames: int | None = None,
    setup: dict[str, Any] | None = None,
    samples: dict[str, dict[str, Any]] | None = None,
) -> Report:
    """``report.md``/``report.json``/plots: a table of the loss per gate value (all positions
    and beyond the attention context), the curves, and the generated samples if any."""
    bin_frames = bin_frames or result.bin_frames
    report = Report("Gate sweep", out_dir)
    write_run_info(report, result, setup or {})
    if result.files:
        rows = []
        for label, curve in result.variants.items():
            t, b = curve.totals(), curve.totals(result.context)
            rows.append([label, t["audio_ce"], t["cb0"], t["text_ce"], b["audio_ce"], b["cb0"]])
        report.add_text("## Loss per gate value")
        report.add_table(
            ["gates", "audio CE", "cb0", "text CE", "audio CE >= ctx", "cb0 >= ctx"], rows
        )
    write_result_section(report, result, bin_frames)
    if samples:
        report.add_text("## Generated samples\n\nSame input and seed for every gate value.")
        rows = [[k, v["text"] or "(silence)", v["wav"]] for k, v in samples.items()]
        report.add_table(["gates", "text", "wav"], rows)
        report.data["samples"] = samples
    report.data["result"] = result.to_dict(bin_frames)
    report.write()
    return report
