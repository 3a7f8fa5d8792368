"""The inner-loss diagnostic ("Figure 5") beside the long-context loss of the same run.

For each TTT layer (``TTTLayer``: kinds linear/mlp; In-Place TTT has no inner loss), the
core's probe (``moshi_ttt.layer.record_inner_loss``) gives per token and head the inner
reconstruction MSE with the initial weights (``l0``), the weights at the start of the token's
mini-batch (``lprev``) and the weights the token's output uses (``lafter``). They are recorded
during the chunked long-context pass of the full-memory variant, averaged over heads and files,
binned by position (the TTT step = frame of the temporal transformer's input).

A healthy memory: ``l0 > lprev > lafter``, and the memory gap ``l0 - lprev`` (what the
accumulated fast weights give over W0) grows with position. The report compares that with the
model-loss change of the same run (``ttt`` minus ``no_ttt``, negative: the memory helps; the
inner one plotted as ``lprev - l0``) on the scored metric (``"auto"``:
audio CE when audio tokens are scored beyond the context, else text CE; ``choose_metric``): the
seeds' run saw a 99 % inner improvement and no model-loss improvement.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from moshi.models.lm import LMModel

from ..format import FRAME_RATE
from ..layer import InnerLossProbe, TTTLayer, record_inner_loss
from ..ttt import InnerLoss
from .long_context import (
    AUTO,
    METRIC_LABELS,
    LongContextResult,
    PositionLosses,
    check_metric,
    evaluate_long_context,
    resolve_metric,
    write_result_section,
    write_run_info,
)
from .report import Report, coincidence_labels, curve_style, plot_bin_frames

NAMES = ("l0", "lprev", "lafter")


class InnerLossCurves:
    """Per layer, sums over files of ``l0``/``lprev``/``lafter`` (mean over heads) per
    position, float64 ``[3, P]``, and ``count [P]`` (files reaching position p)."""

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.count: dict[str, np.ndarray] = {}

    def add(self, layer: str, losses: np.ndarray) -> None:
        """``losses [3, T]``: one file's l0, lprev, lafter per position."""
        n = losses.shape[-1]
        s = self.sums.setdefault(layer, np.zeros((3, 0)))
        c = self.count.setdefault(layer, np.zeros(0))
        if s.shape[-1] < n:
            s = np.pad(s, ((0, 0), (0, n - s.shape[-1])))
            c = np.pad(c, (0, n - len(c)))
        s[:, :n] += losses
        c[:n] += 1
        self.sums[layer], self.count[layer] = s, c

    @property
    def layers(self) -> list[str]:
        return sorted(self.sums, key=_layer_key)

    def binned(self, bin_frames: int) -> dict[str, dict[str, list[float]]]:
        """Per layer: ``start``, ``end`` (frames), ``l0``, ``lprev``, ``lafter`` bin means."""
        out = {}
        for layer in self.layers:
            s, c = self.sums[layer], self.count[layer]
            starts = np.arange(0, len(c), bin_frames)
            sums, cnt = np.add.reduceat(s, starts, axis=-1), np.add.reduceat(c, starts)
            means = np.divide(sums, cnt, out=np.full_like(sums, np.nan), where=cnt > 0)
            out[layer] = {
                "start": starts.tolist(),
                "end": np.minimum(starts + bin_frames, len(c)).tolist(),
                **{n: means[i].tolist() for i, n in enumerate(NAMES)},
            }
        return out


class InnerLossRecorder:
    """A ``ChunkObserver`` for ``evaluate_variants``: probes every ``TTTLayer`` during the
    primary variant's pass, reduces each chunk to ``[3, C]`` per layer (mean over heads)."""

    def __init__(self) -> None:
        self.curves = InnerLossCurves()
        self._probe: InnerLossProbe | None = None
        self._parts: dict[str, list[torch.Tensor]] = defaultdict(list)

    @contextmanager
    def watch(self, lm: LMModel) -> Iterator[None]:
        with record_inner_loss(lm) as probe:
            self._probe = probe
            try:
                yield
            finally:
                self._probe = None

    def chunk(self, start: int, end: int) -> None:
        assert self._probe is not None
        for name, records in self._probe.records.items():
            loss = InnerLoss.cat(records)  # each [B, H, C]
            stacked = torch.stack([loss.l0, loss.lprev, loss.lafter]).float()
            self._parts[layer_label(name)].append(stacked.mean(dim=(1, 2)).cpu())
        self._probe.records.clear()

    def end_file(self, frames: int) -> None:
        for layer, parts in self._parts.items():
            losses = torch.cat(parts, dim=-1).double().numpy()
            if losses.shape[-1] != frames:
                raise RuntimeError(f"{layer}: inner loss for {losses.shape[-1]} of {frames} frames")
            self.curves.add(layer, losses)
        self._parts.clear()


def layer_label(name: str) -> str:
    """``"transformer.layers.12.ttt.layer"`` -> ``"layer 12"`` (else the name itself)."""
    m = re.search(r"layers\.(\d+)\.", name)
    return f"layer {m.group(1)}" if m else name


def _layer_key(label: str) -> tuple[int, str]:
    m = re.search(r"(\d+)$", label)
    return (int(m.group(1)) if m else 1 << 30, label)


def evaluate_inner_loss(
    lm: LMModel,
    files: Iterable[tuple[str, torch.Tensor]],
    *,
    chunk_frames: int = 250,
    controls: Sequence[str] = ("no_ttt",),
    reset_every: int | Sequence[int] | None = None,
    speedup_frames: int = 0,
    bin_frames: int = 250,
    progress: bool = True,
    metric: str = AUTO,
) -> LongContextResult:
    """The long-context run (``evaluate_long_context``: the full-memory model and
    ``controls``) with the inner losses of every ``TTTLayer`` recorded on the full-memory
    pass; ``result.inner`` is the ``InnerLossCurves``; ``metric``: the model-loss metric of
    its report (``"auto"``: ``choose_metric``)."""
    if not any(isinstance(m, TTTLayer) for m in lm.modules()):
        raise ValueError(
            "inner-loss needs a model with TTT-Linear/MLP layers (In-Place TTT and base models "
            "have no inner loss)"
        )
    recorder = InnerLossRecorder()
    result = evaluate_long_context(
        lm,
        files,
        chunk_frames=chunk_frames,
        controls=controls,
        reset_every=reset_every,
        observer=recorder,
        speedup_frames=speedup_frames,
        bin_frames=bin_frames,
        progress=progress,
        metric=metric,
    )
    result.inner = recorder.curves
    return result


# -- verdict --------------------------------------------------------------------------------
def _trend(values: np.ndarray) -> tuple[str, float, float]:
    """``(word, first, last)``: mean of the first and the last quarter of the bins."""
    q = max(1, len(values) // 4)
    first, last = float(np.mean(values[:q])), float(np.mean(values[-q:]))
    tol = 0.1 * max(abs(first), abs(last), 1e-12)
    word = "rises" if last > first + tol else "falls" if last < first - tol else "is stable"
    return word, first, last


def verdict(curve: dict[str, list[float]]) -> dict[str, Any]:
    """The per-layer verdict from binned ``l0``/``lprev``/``lafter``: how many bins keep
    ``l0 > lprev > lafter``, how the memory gap ``l0 - lprev`` and the step gap
    ``lprev - lafter`` evolve (first vs last quarter of the bins), ``text``."""
    l0, lp, la = (np.asarray(curve[n], dtype=float) for n in NAMES)
    ok = np.isfinite(l0) & np.isfinite(lp) & np.isfinite(la)
    l0, lp, la = l0[ok], lp[ok], la[ok]
    if len(l0) == 0:
        return {"text": "no data", "ordering_bins": 0, "bins": 0}
    order = (l0 > lp) & (lp > la)
    n, k = len(order), int(order.sum())
    holds = f"holds in {k} of {n} bins"
    holds = "holds in every bin" if k == n else "never holds" if k == 0 else holds
    mem_word, mem_first, mem_last = _trend(l0 - lp)
    step_word, step_first, step_last = _trend(lp - la)
    rel = float((l0[-1] - la[-1]) / l0[-1]) if l0[-1] != 0 else float("nan")
    where = "below" if rel >= 0 else "above"
    text = (
        f"l0 > lprev > lafter {holds}; memory gap l0 - lprev {mem_word} ({mem_first:.4g} -> "
        f"{mem_last:.4g}); step gap lprev - lafter {step_word} ({step_first:.4g} -> "
        f"{step_last:.4g}); last bin: lafter {abs(rel):.1%} {where} l0."
    )
    return {
        "ordering_bins": k,
        "bins": n,
        "ordering_holds": k == n,
        "memory_gap": {"trend": mem_word, "first": mem_first, "last": mem_last},
        "step_gap": {"trend": step_word, "first": step_first, "last": step_last},
        "relative_improvement_last_bin": rel,
        "text": text,
    }


# -- report ---------------------------------------------------------------------------------
def write_inner_loss_section(
    report: Report,
    curves: InnerLossCurves,
    *,
    bin_frames: int = 250,
    model_curves: dict[str, PositionLosses] | None = None,
    context: int = 0,
    reference: str = "ttt",
    baseline: str = "no_ttt",
    prefix: str = "",
    metric: str = AUTO,
) -> dict[str, Any]:
    """Per-layer plots of l0/lprev/lafter against position, each beside the model's loss of
    the same run (``model_curves``) on ``metric`` (``"auto"``: audio CE when audio tokens are
    scored beyond ``context``, else text CE; or one of ``long_context.METRICS``), the
    verdicts, and a comparison plot of the relative inner change ``(lprev - l0) / l0`` with the
    relative model change ``(reference - baseline) / baseline`` on that metric (negative: the
    memory helps). Returns (and
    stores under ``report.data``) the numbers, ``metric`` resolved (None without
    ``model_curves``)."""
    check_metric(metric)
    model_curves = model_curves or {}
    model_metric = resolve_metric(metric, model_curves, context) if model_curves else None
    lengths = [len(c) for c in curves.count.values()] + [v.length for v in model_curves.values()]
    requested, bin_frames = bin_frames, plot_bin_frames(bin_frames, max(lengths, default=0))
    binned = curves.binned(bin_frames)
    model_binned = {k: v.binned(bin_frames) for k, v in model_curves.items()}
    verdicts = {layer: verdict(c) for layer, c in binned.items()}
    report.add_text(
        "## Inner loss (Figure 5)\n\nInner reconstruction MSE of each TTT layer, mean "
        "over heads and files, against the TTT step (input frame): `l0` (initial "
        "weights), `lprev` (weights at the start of the token's mini-batch), `lafter` "
        "(weights the token's output uses). "
        + (
            f"Position bins of {bin_frames} frames (requested {requested}; files are only "
            f"{max(lengths)} frames)."
            if bin_frames != requested
            else f"Position bins of {bin_frames} frames."
        )
        + (
            f" Beside it: the model's {METRIC_LABELS[model_metric]} (`{model_metric}`) of the "
            "same run."
            if model_metric
            else ""
        )
    )
    report.add_text("\n".join(f"- **{layer}**: {v['text']}" for layer, v in verdicts.items()))
    for layer, c in binned.items():
        if model_metric is None:
            fig, ax = report.figure(5.5, 3.8)
            axes = [ax]
        else:
            fig, (ax, ax2) = report.figure(11.0, 3.8, ncols=2)
            axes = [ax, ax2]
        x = (np.asarray(c["start"]) + np.asarray(c["end"]) - 1) / 2
        labels = coincidence_labels({n: c[n] for n in NAMES})
        for i, n in enumerate(NAMES):
            ax.plot(x, np.asarray(c[n], dtype=float), label=labels[n], **curve_style(i, len(x)))
        ax.set(title=f"{layer}: inner loss", xlabel="position (frames)", ylabel="MSE")
        ax.legend(fontsize=7)
        if model_metric is not None:
            labels = coincidence_labels({k: b[model_metric] for k, b in model_binned.items()})
            for i, (name, b) in enumerate(model_binned.items()):
                xb = (np.asarray(b["start"]) + np.asarray(b["end"]) - 1) / 2
                y = np.asarray(b[model_metric], dtype=float)
                ax2.plot(xb, y, label=labels[name], **curve_style(i, len(y)))
            label = METRIC_LABELS[model_metric]
            ax2.set(
                title=f"model: {label} (same run)", xlabel="position (frames)", ylabel="CE (nats)"
            )
            ax2.legend(fontsize=7)
        if context:
            for a in axes:
                a.axvline(context, color="k", ls="--", lw=1)
        slug = re.sub(r"\W+", "_", layer).strip("_")
        report.add_figure(fig, f"{prefix}inner_loss_{slug}.png", f"Inner loss, {layer}")
    if binned:
        _plot_comparison(
            report, binned, model_binned, reference, baseline, context, prefix, model_metric
        )
    data = {
        "metric": model_metric,
        "bin_frames": bin_frames,
        "bin_frames_requested": requested,
        "curves": binned,
        "verdicts": verdicts,
        "seconds_per_frame": 1 / FRAME_RATE,
    }
    report.data[f"{prefix}inner_loss"] = data
    return data


def _plot_comparison(
    report, binned, model_binned, reference, baseline, context, prefix, metric
) -> None:
    fig, ax = report.figure()
    for i, (layer, c) in enumerate(binned.items()):
        l0, lp = np.asarray(c["l0"], dtype=float), np.asarray(c["lprev"], dtype=float)
        x = (np.asarray(c["start"]) + np.asarray(c["end"]) - 1) / 2
        ax.plot(x, (lp - l0) / l0, label=f"{layer}: (lprev - l0) / l0", **curve_style(i, len(x)))
    if metric is not None and reference in model_binned and baseline in model_binned:
        ref = np.asarray(model_binned[reference][metric], dtype=float)
        base = np.asarray(model_binned[baseline][metric], dtype=float)
        n = min(len(ref), len(base))
        b = model_binned[reference]
        x = (np.asarray(b["start"]) + np.asarray(b["end"]) - 1) / 2
        ax.plot(
            x[:n],
            (ref[:n] - base[:n]) / base[:n],
            "k-",
            marker="s",
            label=f"model {METRIC_LABELS[metric]}: ({reference} - {baseline}) / {baseline}",
        )
    if context:
        ax.axvline(context, color="k", ls="--", lw=1)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(
        xlabel="position (frames)",
        ylabel="relative change, memory - no memory",
        title="Inner loss vs model loss: relative change (negative: the memory helps)",
    )
    ax.legend(fontsize=7)
    report.add_figure(
        fig, f"{prefix}inner_vs_model_gain.png",
        "The memory's relative change of the inner loss (lprev vs l0) and of the model loss "
        f"({reference} vs {baseline}); negative: the memory helps",
    )  # fmt: skip


def write_inner_loss_report(
    result: LongContextResult,
    out_dir: str | Path,
    *,
    bin_frames: int | None = None,
    setup: dict[str, Any] | None = None,
    metric: str | None = None,
) -> Report:
    """``report.md``/``report.json``/plots: the inner-loss section and, beside it, the
    long-context section of the same run (``bin_frames``, ``metric``: default the result's;
    ``report.json``'s ``metric`` is the resolved one)."""
    bin_frames = bin_frames or result.bin_frames
    metric = check_metric(metric or result.metric)
    report = Report("Inner-loss diagnostic (Figure 5)", out_dir)
    report.data["metric"] = result.chosen_metric(metric)
    write_run_info(report, result, setup or {})
    if result.files and isinstance(result.inner, InnerLossCurves):
        write_inner_loss_section(
            report,
            result.inner,
            bin_frames=bin_frames,
            model_curves=result.variants,
            context=result.context,
            reference=result.primary,
            metric=metric,
        )
    write_result_section(report, result, bin_frames, metric)
    report.data["result"] = result.to_dict(bin_frames, metric)
    report.write()
    return report
