"""The long-context report: its markdown section (tables, headline text), the plots
(loss and gain against position, per codebook) and the run information.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ...format import FRAME_RATE
from ..report import (
    Report,
    coincidence_labels,
    curve_style,
    legend_outside,
    plot_bin_frames,
    row_line_style,
    row_styles,
)
from ..stats import fmt_interval, format_p
from .scoring import Variant
from .statistics import (
    AUTO,
    COLUMN_LABELS,
    METRIC_LABELS,
    METRICS,
    MOSHI_LOSS,
    LongContextResult,
    PositionLosses,
    binned_intervals,
    check_metric,
    file_intervals,
    flip_interval,
    memory_gains,
    metric_note,
    ppl,
    resolve_metric,
    sign_note,
)


def write_long_context_section(
    report: Report,
    curves: dict[str, PositionLosses],
    *,
    context: int,
    bin_frames: int = 250,
    reference: str | None = None,
    prefix: str = "",
    title: str = "Loss against position",
    metric: str = AUTO,
    equal_lengths: Sequence[int] = (),
    reference_is_base: bool | None = None,
    gain_plot: bool = True,
    styles: dict[str, dict[str, str]] | None = None,
) -> dict[str, Any]:
    """Add the loss-vs-position section (tables, plots) for named curves (any models or
    variants over the same files) to ``report``; the others are compared against
    ``reference`` (default: the first) on ``metric`` (``audio_ce``, ``cb0``, ``cb1_7``,
    ``text_ce``, or ``"auto"``: ``choose_metric``, audio CE when audio tokens are scored
    beyond the context, else text CE). Table columns where no curve scores anything (e.g.
    the audio columns of text-only data) are left out. Returns (and stores under
    ``report.data``) the numbers, ``metric`` resolved.
    Plots: ``{prefix}loss_vs_position.png``, ``{prefix}gain_vs_position.png`` (with two or more
    curves), ``{prefix}codebooks_vs_position.png`` (when audio is scored). Curves with per-file
    data get 95 % bootstrap intervals over files (totals, differences, bands on the plot).
    ``equal_lengths``: for each L, a sub-section of the same over the files of at least L
    frames cropped to L (``PositionLosses.equal_length``; prefix ``eq<L>_``).

    Signs (docs/evaluation.md, "Sign convention": memory minus no memory, negative: the memory
    helps): when ``reference`` is the memory (``eval long-context``'s primary), differences
    are shown as reference - curve; when it is the base without memory (``reference_is_base``,
    default: the reference is named ``"base"``, as in the demos), as curve - reference. The
    stored ``gains`` / ``intervals.difference`` stay curve - reference. ``gain_plot=False``
    leaves out ``gain_vs_position.png`` (a caller drawing its own). ``styles``: the report's
    row -> colour and marker map (``eval.report.row_styles``, default: of these curves)."""
    if not curves:
        raise ValueError("no curve to report")
    requested = check_metric(metric)
    metric = resolve_metric(metric, curves, context)
    col = COLUMN_LABELS[metric]
    reference = reference or next(iter(curves))
    base_ref = reference == "base" if reference_is_base is None else reference_is_base
    requested, longest = bin_frames, max(v.length for v in curves.values())
    bin_frames = plot_bin_frames(requested, longest)
    binned = {k: v.binned(bin_frames) for k, v in curves.items()}
    gains = memory_gains(curves, reference, context)
    totals = {k: v.totals() for k, v in curves.items()}
    beyond = {k: v.totals(context) for k, v in curves.items()}
    within = {k: v.totals(0, context) for k, v in curves.items()}
    window = f"{context} frames = {context / FRAME_RATE:g} s" if context else "unlimited"
    intervals = file_intervals(curves, reference, context, metric)
    report.add_text(
        f"## {title}\n\nAttention context: {window}. Unweighted CE in nats per "
        f"token; perplexity = exp(CE) of the same tokens; position bins of {bin_frames} frames "
        f"({bin_frames / FRAME_RATE:g} s"
        + (
            f"; requested {requested}; files are only {longest} frames"
            if bin_frames != requested
            else ""
        )
        + "); means are token-weighted over files; intervals are "
        "95 % bootstrap intervals over files. " + metric_note(metric, requested, curves, context)
    )
    audio = any(t["audio_tokens"] > 0 for t in totals.values())
    text = any(t["text_tokens"] > 0 for t in totals.values())
    beyond_keys = [k for k in ("audio_ce", "cb0", "text_ce") if k != metric]
    columns: list[tuple[str, list[Any]]] = [
        (COLUMN_LABELS[k], [t[k] for t in totals.values()]) for k in METRICS
    ]
    columns += [
        (f"{col} < ctx", [t[metric] for t in within.values()]),
        (f"{col} >= ctx", [t[metric] for t in beyond.values()]),
    ]
    columns += [
        (
            f"{col} >= ctx [95 % CI]",
            [
                fmt_interval(intervals["totals"].get(k, {}).get("beyond_context", {}), 1, 4)
                for k in totals
            ],
        ),
        (f"ppl {col} >= ctx", [ppl(t[metric]) for t in beyond.values()]),
    ]
    columns += [
        (f"{COLUMN_LABELS[k]} >= ctx", [t[k] for t in beyond.values()]) for k in beyond_keys
    ]
    if audio:
        columns.append(("audio tokens", [int(t["audio_tokens"]) for t in totals.values()]))
    if text:
        columns.append(("text tokens", [int(t["text_tokens"]) for t in totals.values()]))
    _add_columns(report, "curve", list(totals), columns)
    tokens = "text_tokens" if metric == "text_ce" else "audio_tokens"
    reaches = max(c.length for c in curves.values()) > context
    report.add_text(
        _headline_text(
            gains, reference, context, beyond[reference][tokens], metric, reaches,
            intervals["difference"], base_ref,
        )
    )  # fmt: skip
    if gains:  # stored as curve - reference; shown by the convention (``_signed``)
        diff = intervals["difference"]
        sg = 1.0 if base_ref else -1.0

        def ci(k: str, part: str = "beyond_context") -> dict[str, Any]:
            d = diff.get(k, {}).get(part, {})
            return (d if base_ref else flip_interval(d)) or {}

        g_columns = [
            (f"{col} >= ctx", [sg * g["beyond_context"][metric] for g in gains.values()]),
            ("95 % CI (files)", [fmt_interval(ci(k), 1, 4, "difference") for k in gains]),
            ("p", [_p(ci(k)) for k in gains]),
            (f"{col} < ctx", [sg * g["within_context"][metric] for g in gains.values()]),
        ]
        g_columns += [
            (f"{COLUMN_LABELS[k]} >= ctx", [sg * g["beyond_context"][k] for g in gains.values()])
            for k in beyond_keys
        ]
        what = "each curve minus " + reference if base_ref else f"{reference} minus each curve"
        report.add_text(
            f"Differences: {what}, nats per token ({_sign_words(reference, base_ref)}; "
            'docs/evaluation.md, "Sign convention").'
        )
        _add_columns(report, _diff_label("curve", reference, base_ref), list(gains), g_columns)
        foreign = [k for k, d in diff.items() if "beyond_foreign_history" in d]
        for k in foreign:
            d = ci(k, "beyond_foreign_history")
            report.add_text(
                f"Foreign-history control `{k}`: beyond the replaced history and one attention "
                f"window (>= {d['start_frame']} frames, where attention sees only this file), "
                f"{_diff_label(k, reference, base_ref)} = {fmt_interval(d, 1, 4, 'difference')} "
                f"nats, p = {_p(d)} ({d['n']} files; "
                + ("positive" if base_ref else "negative")
                + ": the model uses this file's past)."
            )
    bands = {k: binned_intervals(v, bin_frames, metric) for k, v in curves.items()}
    styles = styles or row_styles(curves)  # one colour and marker per curve in every plot
    others = sorted((k for k in curves if k != reference and np.isfinite(beyond[k][metric])),
                    key=lambda k: beyond[k][metric])  # fmt: skip
    banded = [reference, *others[:BANDED_OTHERS]]  # bands that do not bury each other
    _plot_losses(report, binned, context, prefix, bands, metric, styles, banded)
    if gains and gain_plot:
        _plot_gains(report, binned, reference, context, prefix, metric, base_ref, styles)
    if np.isfinite(np.asarray(binned[reference]["codebooks"], dtype=float)).any():
        _plot_codebooks(report, binned[reference], reference, context, prefix)
    data = {
        "reference": reference,
        "metric": metric,
        "context_frames": context,
        "bin_frames": bin_frames,
        "bin_frames_requested": requested,
        "totals": totals,
        "totals_beyond_context": beyond,
        "totals_within_context": within,
        "gains": gains,
        "intervals": intervals,
        "sign": "gains and intervals.difference are stored as curve - reference (> 0: the "
        "reference better), as before; report.md, the plots and the printed lines show the "
        "memory minus no memory: reference - curve, or curve - reference when the reference "
        "is the base (reference_is_base); negative: the memory helps",
        "reference_is_base": base_ref,
        "perplexity": {
            k: {"all": ppl(totals[k][metric]), "beyond_context": ppl(beyond[k][metric])}
            for k in curves
        },
        "curves": binned,
        "curve_intervals": bands,
        "population": "all files reaching each bin (late bins: long files only)"
        if not prefix.startswith("eq")
        else "equal length: the same files in every bin",
        "equal_lengths": [],
    }
    report.data[f"{prefix}long_context"] = data
    for L in equal_lengths:
        eq = {k: v.equal_length(L) for k, v in curves.items() if v.file_blocks}
        eq = {k: v for k, v in eq.items() if v.file_blocks}
        if not eq or reference not in eq:
            report.add_text(f"Equal-length curves at {L} frames: no file is that long.")
            continue
        n = len(eq[reference].file_blocks)
        sub = write_long_context_section(
            report, eq, context=context, bin_frames=requested, reference=reference,
            prefix=f"{prefix}eq{L}_", metric=metric, reference_is_base=base_ref,
            gain_plot=gain_plot, styles=styles,
            title=f"Equal-length curves: {n} files of >= {L} frames ({L / FRAME_RATE:g} s), "
            f"cropped to {L}; every bin averages the same files",
        )  # fmt: skip
        data["equal_lengths"].append({"frames": L, "files": n, "prefix": f"{prefix}eq{L}_"})
        del sub
    return data


def _p(ci: dict[str, Any]) -> str:
    return format_p(ci.get("p_value"))


def _add_columns(
    report: Report, first: str, names: list[str], columns: list[tuple[str, list[Any]]]
) -> None:
    """A table with ``names`` as first column and ``columns`` (header, values) after it,
    leaving out the float columns with no finite value (nothing scored in them)."""

    def scored(values: list[Any]) -> bool:
        return any(not isinstance(v, float) or np.isfinite(v) for v in values)

    kept = [(h, v) for h, v in columns if scored(v)]
    rows = [[name, *(v[i] for _, v in kept)] for i, name in enumerate(names)]
    report.add_table([first, *(h for h, _ in kept)], rows)


def write_result_section(
    report: Report, result: LongContextResult, bin_frames: int, metric: str | None = None
) -> None:
    """The loss-vs-position section of ``result``'s variants (against its primary, on
    ``metric``, default the result's), or a line saying that no usable file was evaluated."""
    if not result.files:
        report.add_text("No usable file: nothing was evaluated.")
        return
    write_long_context_section(
        report, result.variants, context=result.context, bin_frames=bin_frames,
        reference=result.primary, metric=metric or result.metric,
        equal_lengths=result.resolved_equal_lengths(),
    )  # fmt: skip


def _headline_text(
    gains: dict,
    reference: str,
    context: int,
    tokens_beyond: float,
    metric: str = "audio_ce",
    reaches: bool = False,
    intervals: dict[str, Any] | None = None,
    base_ref: bool = False,
) -> str:
    if not gains:
        return f"Headline: one curve only ({reference}): nothing to compare."
    if tokens_beyond == 0:
        if reaches:
            return (
                f"Headline: no {METRIC_LABELS[metric]} token is scored beyond the attention "
                f"context ({context} frames): the memory beyond the window is not measured "
                "by this run on this metric."
            )
        return (
            f"Headline: no file reaches past the attention context ({context} frames): "
            "the memory beyond the window is not measured by this run."
        )
    parts = []
    for name, g in gains.items():
        d = g["beyond_context"][metric] * (1.0 if base_ref else -1.0)  # negative: the memory
        better = name if base_ref else reference  # helps (the curve, or the reference)
        verdict = "better" if d < 0 else "worse" if d > 0 else "equal" if d == 0 else "n/a"
        ci = (intervals or {}).get(name, {}).get("beyond_context", {})
        ci = (ci if base_ref else flip_interval(ci)) or {}
        extra = ""
        if math.isfinite(ci.get("lo", math.nan)):
            extra = f", 95 % CI [{ci['lo']:+.4f}, {ci['hi']:+.4f}], p = {_p(ci)}"
        parts.append(
            f"{_diff_label(name, reference, base_ref)} = {d:+.4f} nats ({better} {verdict}{extra})"
        )
    what = f"each curve minus {reference}" if base_ref else f"{reference} minus each control"
    return (
        f"**Headline** ({METRIC_LABELS[metric]} beyond the attention context, >= {context} "
        f"frames, {int(tokens_beyond)} tokens; {what}, {_sign_words(reference, base_ref)}): "
        + "; ".join(parts)
        + "."
    )


def _diff_label(curve: str, reference: str, base_ref: bool) -> str:
    """``curve - reference`` against the base, ``reference - curve`` against the memory."""
    return f"{curve} - {reference}" if base_ref else f"{reference} - {curve}"


def _sign_words(reference: str, base_ref: bool) -> str:
    return "negative: the curve better than the base" if base_ref else sign_note(reference, "")


def _centers(b: dict[str, Any]) -> np.ndarray:
    return (np.asarray(b["start"]) + np.asarray(b["end"]) - 1) / 2


def _mark_context(ax: Any, context: int) -> None:
    if context:
        ax.axvline(context, color="k", ls="--", lw=1, label=f"attention context ({context})")


BANDED_OTHERS = 2  # the loss plot shades the reference's interval and the best 2 others'


def _plot_losses(
    report: Report,
    binned: dict,
    context: int,
    prefix: str,
    bands: dict[str, dict[str, Any]] | None = None,
    metric: str | None = None,
    styles: dict[str, dict[str, str]] | None = None,
    banded: list[str] | None = None,
) -> None:
    """Loss against position, one panel per scored metric, legend outside the data; the
    95 % band of ``metric`` for the curves in ``banded`` (default: all)."""

    def scored(key: str) -> bool:
        return any(np.isfinite(np.asarray(b[key], dtype=float)).any() for b in binned.values())

    panels = [
        ("audio_ce", "audio CE (8 codebooks)"),
        ("cb0", "codebook 0 (semantic)"),
        ("cb1_7", "codebooks 1-7"),
        ("text_ce", "text CE"),
    ]
    panels = [p for p in panels if scored(p[0])] or panels[:1]
    if metric == MOSHI_LOSS:  # the headline first (moshi-finetune's weighted text + audio)
        panels.insert(0, (MOSHI_LOSS, "moshi loss (text + audio, weighted)"))
    styles = styles or row_styles(binned)
    banded = list(binned) if banded is None else banded
    fig, axes = report.figure(max(10.0, 4.5 * len(panels)), 5.0, ncols=len(panels))
    for ax, (key, label) in zip(np.atleast_1d(axes), panels):
        labels = coincidence_labels({name: b[key] for name, b in binned.items()})
        for i, (name, b) in enumerate(binned.items()):
            y = np.asarray(b[key], dtype=float)
            style = row_line_style(styles[name], i, len(y))
            ax.plot(_centers(b), y, label=labels[name], **style)
            band = (bands or {}).get(name, {})
            if key == metric and name in banded and len(band.get("lo", [])) == len(b[key]):
                lo, hi = (np.asarray(band[k], dtype=float) for k in ("lo", "hi"))
                ax.fill_between(_centers(b), lo, hi, color=style["color"], alpha=0.15, lw=0)
        _mark_context(ax, context)
        ax.set(title=label, xlabel="position (frames, 80 ms)", ylabel="CE (nats)")
    legend_outside(np.atleast_1d(axes)[-1])
    shaded = "every curve" if set(banded) >= set(binned) else ", ".join(banded)
    report.add_figure(
        fig,
        f"{prefix}loss_vs_position.png",
        "Loss against position (shaded: 95 % bootstrap interval over files of the headline "
        f"metric, for {shaded}"
        + ("" if shaded == "every curve" else ": the reference and the two curves lowest "
           "beyond the window, so that bands do not cover each other; every curve's is in "
           "report.json, curve_intervals")
        + ")",
    )  # fmt: skip


def _plot_gains(
    report: Report,
    binned: dict,
    reference: str,
    context: int,
    prefix: str,
    metric: str,
    base_ref: bool = False,
    styles: dict[str, dict[str, str]] | None = None,
) -> None:
    styles = styles or row_styles(binned)
    fig, ax = report.figure(10.0, 5.0)
    ref = np.asarray(binned[reference][metric], dtype=float)
    diffs = {}
    for name, b in binned.items():
        if name != reference:
            mine = np.asarray(b[metric], dtype=float)
            n = min(len(mine), len(ref))
            d = mine[:n] - ref[:n] if base_ref else ref[:n] - mine[:n]
            diffs[_diff_label(name, reference, base_ref)] = (name, _centers(b)[:n], d)
    labels = coincidence_labels({k: v[2] for k, v in diffs.items()})
    for i, (label, (name, x, y)) in enumerate(diffs.items()):
        ax.plot(x, y, label=labels[label], **row_line_style(styles[name], i, len(y)))
    ax.axhline(0, color="grey", lw=0.8)
    _mark_context(ax, context)
    label = METRIC_LABELS[metric]
    what = f"each curve - {reference}" if base_ref else f"{reference} - each curve"
    ax.set(
        xlabel="position (frames, 80 ms)",
        ylabel=f"{label} difference (nats)",
        title=f"{what}, {label} ({_sign_words(reference, base_ref)})",
    )
    legend_outside(ax)
    report.add_figure(
        fig, f"{prefix}gain_vs_position.png",
        f"{label}: {what} ({_sign_words(reference, base_ref)})",
    )  # fmt: skip


def _plot_codebooks(report: Report, b: dict, name: str, context: int, prefix: str) -> None:
    fig, ax = report.figure()
    curves = {f"cb{k}": np.asarray(values, dtype=float) for k, values in enumerate(b["codebooks"])}
    labels = coincidence_labels(curves)
    for i, (cb, y) in enumerate(curves.items()):
        ax.plot(_centers(b), y, label=labels[cb], **curve_style(i, len(y)))
    _mark_context(ax, context)
    ax.set(xlabel="position (frames, 80 ms)", ylabel="CE (nats)", title=f"Per codebook: {name}")
    ax.legend(fontsize=7, ncol=3)
    report.add_figure(fig, f"{prefix}codebooks_vs_position.png", f"Per-codebook CE ({name})")


def write_run_info(report: Report, result: LongContextResult, setup: dict[str, Any]) -> None:
    """Setup, files, bad files, timing and speed-up sections, and ``report.data`` entries.

    ``setup["provenance"]`` (``models.provenance.provenance``: the model's source, run,
    checkpoint, step and weights sha256) goes to ``report.data["provenance"]``; the setup
    table shows its label."""
    provenance = setup.get("provenance")
    rows = [
        [k, v.get("label", _flat(v)) if k == "provenance" and isinstance(v, dict) else _flat(v)]
        for k, v in setup.items()
    ]
    setup = {k: v for k, v in setup.items() if k != "provenance"}
    rows += [
        ["files evaluated", len(result.files)],
        ["frames", sum(f["frames"] for f in result.files)],
        ["longest file (frames)", max((f["frames"] for f in result.files), default=0)],
        ["chunk (frames)", result.chunk_frames],
        [
            "variants",
            "; ".join(
                f"{k}: {_describe(v, result.gate_zero_is_base)}" for k, v in result.specs.items()
            ),
        ],
    ]
    report.add_text("## Setup")
    report.add_table(["", ""], [[str(k), str(v)] for k, v in rows])
    bad = result.bad.get("bad_files", [])
    report.add_text(f"## Bad files\n\n{len(bad)} skipped, {len(result.files)} used.")
    if bad:
        report.add_table(
            ["file", "reason", "detail"], [[b["name"], b["reason"], b["detail"]] for b in bad]
        )
    report.add_text("## Speed")
    report.add_table(
        ["variant", "frames", "seconds", "frames/s"],
        [[k, int(t["frames"]), t["seconds"], t["frames_per_s"]] for k, t in result.timing.items()],
    )
    if result.speedup:
        s = result.speedup
        report.add_text(
            f"Chunked ({int(s['chunk_frames'])} frames) vs token-by-token streaming on the "
            f"first {int(s['frames'])} frames of the first file: {s['chunked_frames_per_s']:.1f}"
            f" vs {s['token_frames_per_s']:.1f} frames/s, **speed-up x{s['speedup']:.1f}**; "
            f"largest CE difference {s['max_abs_diff']:.2e} nats."
        )
    report.data["setup"] = setup
    if provenance is not None:
        report.data["provenance"] = provenance


def _flat(value: Any) -> str:
    """A table cell for a setup value: dicts as ``key: value`` pairs."""
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_flat(v)}" for k, v in value.items())
    return str(value)


def _describe(v: Variant, gate_zero_is_base: bool = True) -> str:
    parts = ["gates " + ("learned" if v.gate is None else f"forced to {v.gate:g}")]
    if v.gate == 0:
        parts.append(
            "= the base model" if gate_zero_is_base else "= base + LoRA, NOT the base model"
        )
    if v.reset_every:
        parts.append(f"TTT reset every {v.reset_every} frames")
    if v.context:
        parts.append(f"attention window {v.context} frames")
    if v.foreign_history:
        parts.append(f"first {v.foreign_history} frames from another file (not scored)")
    return ", ".join(parts)


def write_long_context_report(
    result: LongContextResult,
    out_dir: Any,
    *,
    bin_frames: int | None = None,
    setup: dict[str, Any] | None = None,
    title: str = "Long-context evaluation",
    extra: Callable[[Report], None] | None = None,
    metric: str | None = None,
) -> Report:
    """``out_dir/report.md`` + ``report.json`` + plots for a ``LongContextResult``;
    ``extra(report)`` may add sections before writing; ``bin_frames`` defaults to the
    result's, ``metric`` (the headline metric, ``"auto"`` or one of ``METRICS``) too.
    ``report.json``: ``metric`` (resolved), ``setup``, ``long_context``, ``result`` (with
    ``result.summary``). Returns the written ``Report``."""
    bin_frames = bin_frames or result.bin_frames
    metric = check_metric(metric or result.metric)
    report = Report(title, out_dir)
    report.data["metric"] = result.chosen_metric(metric)
    write_run_info(report, result, setup or {})
    write_result_section(report, result, bin_frames, metric)
    if extra is not None:
        extra(report)
    report.data["result"] = result.to_dict(bin_frames, metric)
    report.write()
    return report
