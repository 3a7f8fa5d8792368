"""Long-context evaluation: teacher-forced loss against position over whole files.

Definition (the same CE and masks as ``LMModel.forward`` + ``train.loss``): for codes
``[17, T]``, the text CE at frame t and the CE of each of Moshi's 8 codebooks at frame t, in
nats, scored iff the target is not -1 and not lost to its stream's delay (acoustic codebooks
lag one frame: their last frame is never predicted). **Unweighted**: no x100 on codebook 0,
no 0.5 on text padding. The user stream is never scored.

How (``stream_losses``): the file's codes are put in moshi's delay pattern once; the temporal
transformer reads the delayed columns chunk by chunk in moshi streaming mode (attention KV
caches widened to ``context + chunk - 1``, TTT state carried), and the depformer runs
teacher-forced on each chunk; per-chunk CE is kept, never the logits of the file. This equals
token-by-token streaming (``chunk_frames=1``) and, where the parallel forward is defined the
same way, ``LMModel.forward`` (tests check both).

Variants of one model in the same run (``Variant``): ``ttt`` (full memory), ``reset_every_N``
(TTT state restarted every N frames, attention untouched) and ``no_ttt`` (gates forced to 0:
the base model). The headline is the loss difference, control minus full memory, at positions
beyond the attention context (3,000 frames for Moshi), on one metric: ``"auto"`` (the default,
``choose_metric``) takes the audio CE when audio tokens are scored beyond the context, else the
text CE (e.g. text-only shards whose audio rows are -1); callers may name one of ``METRICS``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from moshi.models.lm import LMModel
from moshi.utils.compile import no_compile

from ..integration.apply import set_gates, ttt_modules
from ..integration.streaming import chunked_streaming, delayed_inputs, reset_ttt_states
from .report import Report

FRAME_RATE = 12.5  # frames per second
NUM_AUDIO = 8  # Moshi's codebooks, the scored audio
METRICS = ("audio_ce", "cb0", "cb1_7", "text_ce")
METRIC_LABELS = {"audio_ce": "audio CE", "cb0": "cb0 CE", "cb1_7": "cb1-7 CE", "text_ce": "text CE"}
COLUMN_LABELS = {"audio_ce": "audio CE", "cb0": "cb0", "cb1_7": "cb1-7", "text_ce": "text CE"}
AUTO = "auto"  # the headline metric chosen from what is scored (``choose_metric``)


# -- one file ---------------------------------------------------------------------------------
@dataclass
class FileLosses:
    """Per-position CE of one file, nats, float32 on CPU; position = frame of the target."""

    text: torch.Tensor  # [T]
    text_mask: torch.Tensor  # [T] bool: scored
    audio: torch.Tensor  # [8, T]
    audio_mask: torch.Tensor  # [8, T] bool


class ChunkObserver(Protocol):
    """Watches the primary variant's pass over a file (e.g. the inner-loss recorder)."""

    def watch(self, lm: LMModel) -> contextlib.AbstractContextManager: ...
    def chunk(self, start: int, end: int) -> None: ...
    def end_file(self, frames: int) -> None: ...


def attention_context(lm: LMModel) -> int:
    """The temporal transformer's attention context, frames (0 if unlimited)."""
    return int(lm.transformer.layers[0].self_attn.context or 0)


def check_codes(lm: LMModel, codes: torch.Tensor, name: str = "codes") -> None:
    """``ValueError`` unless ``codes`` is ``[17, T >= 1]`` with ids in range or -1."""
    K = lm.num_codebooks
    if codes.dim() != 2 or codes.shape[0] != K or codes.shape[1] < 1:
        raise ValueError(f"{name}: expected codes [{K}, T >= 1], got {tuple(codes.shape)}")
    text, audio = codes[:1], codes[1:]
    if bool(((text < -1) | (text >= lm.text_card)).any()):
        raise ValueError(f"{name}: text ids must be -1 or in [0, {lm.text_card})")
    if bool(((audio < -1) | (audio >= lm.card)).any()):
        raise ValueError(f"{name}: audio ids must be -1 or in [0, {lm.card})")


def segments(frames: int, chunk: int, reset_every: int | None = None) -> list[tuple[int, int]]:
    """``[start, end)`` pieces of at most ``chunk`` frames, also cut at multiples of
    ``reset_every``."""
    cuts = set(range(0, frames, chunk))
    if reset_every:
        cuts |= set(range(0, frames, reset_every))
    bounds = [*sorted(cuts), frames]
    return list(zip(bounds[:-1], bounds[1:]))


def _step_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Float32 CE ``[..., C]`` of ``logits [..., C, V]``; 0 where the target is outside
    ``[0, V)`` (-1, or the initial token standing in for a delayed frame)."""
    V = logits.shape[-1]
    valid = (target >= 0) & (target < V)
    ce = F.cross_entropy(
        logits.float().reshape(-1, V), target.clamp(0, V - 1).reshape(-1), reduction="none"
    )
    return torch.where(valid, ce.view_as(target), 0.0)


@torch.no_grad()
def stream_losses(
    lm: LMModel,
    codes: torch.Tensor,
    *,
    chunk_frames: int = 250,
    reset_every: int | None = None,
    observer: ChunkObserver | None = None,
    progress: bool = False,
    desc: str = "",
) -> FileLosses:
    """Per-position text and per-codebook CE of one file ``codes [17, T]`` (module docstring).

    ``chunk_frames``: frames per streaming call (1 = token-by-token streaming, the definition).
    ``reset_every``: restart the TTT states (only them) before every multiple of that many
    frames. ``observer.chunk(start, end)`` is called after each piece of delayed columns.
    """
    check_codes(lm, codes)
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
    if reset_every is not None and reset_every < 1:
        raise ValueError(f"reset_every must be >= 1 frame, got {reset_every}")
    if lm.training:
        raise ValueError("evaluation needs the model in eval mode (lm.eval())")
    device = next(lm.parameters()).device
    codes = codes.to(device=device, dtype=torch.long)[None]
    T, a0, dq = codes.shape[-1], lm.audio_offset, lm.dep_q
    inputs, delayed = delayed_inputs(lm, codes)
    text_ce = torch.zeros(T, device=device)
    audio_ce = torch.zeros(dq, T, device=device)
    pieces = segments(T, chunk_frames, reset_every)
    eager = no_compile() if device.type == "cpu" else contextlib.nullcontext()
    with eager, chunked_streaming(lm, 1, max(b - a for a, b in pieces)):
        steps: Iterable[tuple[int, int]] = pieces
        if progress:
            from tqdm import tqdm

            steps = tqdm(pieces, desc=desc or "chunks", unit="chunk", leave=False)
        for a, b in steps:
            if reset_every and a > 0 and a % reset_every == 0:
                reset_ttt_states(lm)
            out, text_logits = lm.forward_text(inputs[:, :, a:b])
            logits = lm.forward_depformer_training(delayed[:, :, a:b], out)  # [1, dq, C, card]
            text_ce[a:b] = _step_ce(text_logits[0, 0], delayed[0, 0, a:b])
            audio_ce[:, a:b] = _step_ce(logits[0], delayed[0, a0 : a0 + dq, a:b])
            if observer is not None:
                observer.chunk(a, b)
    # Undelay: step s of a stream with delay d predicts frame s - d of the codes.
    rows = [0, *range(a0, a0 + dq)]
    per_step = torch.cat([text_ce[None], audio_ce]).cpu()
    target = codes[0, rows].cpu()
    ce = torch.zeros_like(per_step)
    mask = torch.zeros_like(per_step, dtype=torch.bool)
    for i, row in enumerate(rows):
        d = min(int(lm.delays[row]), T)
        ce[i, : T - d] = per_step[i, d:]
        mask[i, : T - d] = target[i, : T - d] != -1
    ce = torch.where(mask, ce, 0.0)
    return FileLosses(ce[0], mask[0], ce[1:], mask[1:])


# -- sums over files ------------------------------------------------------------------------
class PositionLosses:
    """CE sums and token counts per position over files (float64 numpy, grown as needed):
    ``text_sum``/``text_count`` ``[P]``, ``audio_sum``/``audio_count`` ``[8, P]``, ``files``
    ``[P]`` (files reaching position p)."""

    def __init__(self, num_codebooks: int = NUM_AUDIO) -> None:
        self.text_sum = np.zeros(0)
        self.text_count = np.zeros(0)
        self.audio_sum = np.zeros((num_codebooks, 0))
        self.audio_count = np.zeros((num_codebooks, 0))
        self.files = np.zeros(0)

    @property
    def length(self) -> int:
        return len(self.files)

    def add(self, f: FileLosses) -> None:
        n = f.text.shape[-1]
        if self.length < n:
            pad = n - self.length
            self.text_sum, self.text_count, self.files = (
                np.pad(a, (0, pad)) for a in (self.text_sum, self.text_count, self.files)
            )
            self.audio_sum, self.audio_count = (
                np.pad(a, ((0, 0), (0, pad))) for a in (self.audio_sum, self.audio_count)
            )
        self.text_sum[:n] += f.text.double().numpy()
        self.text_count[:n] += f.text_mask.double().numpy()
        self.audio_sum[:, :n] += f.audio.double().numpy()
        self.audio_count[:, :n] += f.audio_mask.double().numpy()
        self.files[:n] += 1

    def totals(self, start: int = 0, end: int | None = None) -> dict[str, Any]:
        """Token-weighted mean CE (nats) over positions ``[start, end)``: ``audio_ce`` (all 8
        codebooks), ``cb0`` (semantic), ``cb1_7``, ``text_ce``, ``codebooks`` (8 values), and
        the token counts; NaN where nothing was scored."""
        s = slice(start, end)
        a_sum, a_cnt = self.audio_sum[:, s].sum(1), self.audio_count[:, s].sum(1)
        return {
            "audio_ce": _div(a_sum.sum(), a_cnt.sum()),
            "cb0": _div(a_sum[0], a_cnt[0]),
            "cb1_7": _div(a_sum[1:].sum(), a_cnt[1:].sum()),
            "text_ce": _div(self.text_sum[s].sum(), self.text_count[s].sum()),
            "codebooks": [_div(x, n) for x, n in zip(a_sum, a_cnt)],
            "audio_tokens": float(a_cnt.sum()),
            "text_tokens": float(self.text_count[s].sum()),
        }

    def binned(self, bin_frames: int) -> dict[str, Any]:
        """Means per position bin of ``bin_frames`` frames: ``start``/``end`` (frames),
        ``audio_ce``, ``cb0``, ``cb1_7``, ``text_ce``, ``codebooks`` ``[8][bins]``, ``files``,
        ``audio_tokens``, ``text_tokens`` (lists)."""
        if bin_frames < 1:
            raise ValueError(f"bin_frames must be >= 1, got {bin_frames}")
        P = self.length
        starts = np.arange(0, P, bin_frames)
        if P == 0:
            empty: list[float] = []
            return {
                k: empty for k in ("start", "end", *METRICS, "files", "audio_tokens", "text_tokens")
            } | {"codebooks": []}

        def red(a: np.ndarray) -> np.ndarray:
            return np.add.reduceat(a, starts, axis=-1)

        a_sum, a_cnt = red(self.audio_sum), red(self.audio_count)
        return {
            "start": starts.tolist(),
            "end": np.minimum(starts + bin_frames, P).tolist(),
            "audio_ce": _div(a_sum.sum(0), a_cnt.sum(0)).tolist(),
            "cb0": _div(a_sum[0], a_cnt[0]).tolist(),
            "cb1_7": _div(a_sum[1:].sum(0), a_cnt[1:].sum(0)).tolist(),
            "text_ce": _div(red(self.text_sum), red(self.text_count)).tolist(),
            "codebooks": _div(a_sum, a_cnt).tolist(),
            "files": self.files[starts].tolist(),
            "audio_tokens": a_cnt.sum(0).tolist(),
            "text_tokens": red(self.text_count).tolist(),
        }


def _div(num: Any, den: Any) -> Any:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.divide(num, den, out=np.full_like(num, np.nan), where=den > 0)
    return float(out) if out.ndim == 0 else out


# -- the headline metric ----------------------------------------------------------------------
def choose_metric(curves: dict[str, PositionLosses], context: int) -> str:
    """The headline metric of ``curves``: ``"audio_ce"`` when some curve scores audio tokens at
    positions ``>= context``, else ``"text_ce"`` when some scores text tokens there. When
    nothing is scored beyond the context (no file reaches past it): ``"audio_ce"`` if any
    audio token is scored, else ``"text_ce"`` if any text token is, else ``"audio_ce"``."""
    for start in (context, 0):
        totals = [c.totals(start) for c in curves.values()]
        if any(t["audio_tokens"] > 0 for t in totals):
            return "audio_ce"
        if any(t["text_tokens"] > 0 for t in totals):
            return "text_ce"
    return "audio_ce"


def check_metric(metric: str) -> str:
    """``metric`` if it is ``"auto"`` or one of ``METRICS``, else ``ValueError``."""
    if metric != AUTO and metric not in METRICS:
        raise ValueError(f"metric {metric!r}: expected 'auto' or one of {METRICS}")
    return metric


def resolve_metric(metric: str, curves: dict[str, PositionLosses], context: int) -> str:
    """``metric`` with ``"auto"`` replaced by ``choose_metric(curves, context)``."""
    check_metric(metric)
    return choose_metric(curves, context) if metric == AUTO else metric


def metric_note(
    metric: str, requested: str, curves: dict[str, PositionLosses], context: int
) -> str:
    """One sentence for the report: the headline metric and why it was chosen."""
    head = f"Headline metric: {METRIC_LABELS[metric]} (`{metric}`)"
    if requested != AUTO:
        return f"{head}, set by the caller."
    beyond = [c.totals(context) for c in curves.values()]
    if any(t["audio_tokens"] > 0 for t in beyond):
        why = "audio tokens are scored beyond the attention context"
    elif any(t["text_tokens"] > 0 for t in beyond):
        why = "no audio token is scored beyond the attention context, text tokens are"
    else:
        scored = "audio" if metric == "audio_ce" else "text"
        why = (
            f"nothing is scored beyond the attention context; {scored} tokens are scored before it"
        )
        if not any(c.totals()[f"{scored}_tokens"] > 0 for c in curves.values()):
            why = "no token is scored"
    return f"{head}, chosen automatically: {why}."


# -- variants and the run -------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One pass of the model: ``gate`` forces every TTT gate (None: as learned; 0: the base
    model), ``reset_every`` restarts the TTT state every that many frames (None: never)."""

    gate: float | None = None
    reset_every: int | None = None


def long_context_variants(
    lm: LMModel, reset_every: int | Sequence[int] | None = None, controls: Sequence[str] = ()
) -> dict[str, Variant]:
    """``{"ttt": full memory, "reset_every_N": ..., "no_ttt": gates 0}`` for a TTT model
    (``controls`` among ``"reset"``, ``"no_ttt"``); ``{"no_ttt": ...}`` without TTT layers.
    ``reset_every`` defaults to the attention context."""
    unknown = set(controls) - {"reset", "no_ttt"}
    if unknown:
        raise ValueError(f"unknown controls {sorted(unknown)}: use 'reset' and/or 'no_ttt'")
    if not ttt_modules(lm):
        return {"no_ttt": Variant()}
    out = {"ttt": Variant()}
    if "reset" in controls:
        if reset_every is None:
            reset_every = attention_context(lm) or 3000
        for n in [reset_every] if isinstance(reset_every, int) else reset_every:
            if int(n) < 1:
                raise ValueError(f"reset_every must be >= 1 frame, got {n}")
            out[f"reset_every_{int(n)}"] = Variant(reset_every=int(n))
    if "no_ttt" in controls:
        out["no_ttt"] = Variant(gate=0.0)
    return out


@dataclass
class LongContextResult:
    """Per-position losses of each variant, over the same files. JSON: ``to_dict(bin)``."""

    variants: dict[str, PositionLosses]
    specs: dict[str, Variant]
    primary: str
    context: int
    chunk_frames: int
    bin_frames: int = 250  # default position bin of the report and ``to_dict``
    files: list[dict[str, Any]] = field(default_factory=list)  # name, frames
    bad: dict[str, Any] = field(default_factory=dict)  # counts and "bad_files"
    timing: dict[str, dict[str, float]] = field(default_factory=dict)
    speedup: dict[str, Any] | None = None
    inner: Any = None  # inner_loss.InnerLossCurves when recorded
    metric: str = AUTO  # headline metric: "auto" (``choose_metric``) or one of ``METRICS``

    def chosen_metric(self, metric: str | None = None) -> str:
        """``metric`` (default: the result's) with ``"auto"`` resolved (``choose_metric``)."""
        return resolve_metric(metric or self.metric, self.variants, self.context)

    def summary(self, metric: str | None = None) -> dict[str, Any]:
        """The headline numbers (``summary_lines`` prints them): ``metric`` (resolved),
        ``context_frames``, ``primary``; per variant the token-weighted CE of every metric and
        the token counts ``beyond_context`` (positions ``>= context``: exactly
        ``variants[v].totals(context)``) and ``within_context`` (``< context``); and
        ``difference[v]`` = variant minus primary on ``metric`` (``beyond_context``,
        ``within_context``; > 0: the primary is better)."""
        m = self.chosen_metric(metric)
        keys = (*METRICS, "audio_tokens", "text_tokens")
        parts = {"beyond_context": (self.context, None), "within_context": (0, self.context)}
        out: dict[str, Any] = {
            "metric": m,
            "context_frames": self.context,
            "primary": self.primary,
        }
        for part, (a, b) in parts.items():
            out[part] = {
                name: {k: c.totals(a, b)[k] for k in keys} for name, c in self.variants.items()
            }
        out["difference"] = {
            name: {
                part: out[part][name][m] - out[part][self.primary][m]
                for part in ("beyond_context", "within_context")
            }
            for name in self.variants
            if name != self.primary
        }
        return out

    def gains(self, reference: str | None = None) -> dict[str, dict[str, Any]]:
        """``memory_gains`` of every other variant against ``reference`` (default: primary)."""
        return memory_gains(self.variants, reference or self.primary, self.context)

    def to_dict(self, bin_frames: int | None = None, metric: str | None = None) -> dict[str, Any]:
        """The numbers as plain JSON types, curves binned by ``bin_frames`` (default: the
        result's); ``metric`` (resolved) and ``summary`` (``summary(metric)`` and its printed
        ``lines``) on ``metric`` (default: the result's)."""
        bin_frames = bin_frames or self.bin_frames
        summary = self.summary(metric)
        return {
            "metric": summary["metric"],
            "summary": summary | {"lines": summary_lines(summary)},
            "primary": self.primary,
            "context_frames": self.context,
            "chunk_frames": self.chunk_frames,
            "bin_frames": bin_frames,
            "variants": {k: vars(v) for k, v in self.specs.items()},
            "files": self.files,
            "bad": self.bad,
            "timing": self.timing,
            "speedup": self.speedup,
            "totals": {k: v.totals() for k, v in self.variants.items()},
            "gains": self.gains(),
            "curves": {k: v.binned(bin_frames) for k, v in self.variants.items()},
        }


def memory_gains(
    curves: dict[str, PositionLosses], reference: str, context: int
) -> dict[str, dict[str, Any]]:
    """For every curve but ``reference``: its loss minus the reference's (nats per token,
    > 0: the reference is better), token-weighted over positions ``>= context``
    (``beyond_context``, the headline) and ``< context`` (``within_context``)."""
    ref = curves[reference]
    out = {}
    for name, c in curves.items():
        if name == reference:
            continue
        entry: dict[str, Any] = {}
        for part, (a, b) in (("beyond_context", (context, None)), ("within_context", (0, context))):
            mine, theirs = c.totals(a, b), ref.totals(a, b)
            entry[part] = {m: mine[m] - theirs[m] for m in METRICS}
            entry[part]["audio_tokens"] = theirs["audio_tokens"]
            entry[part]["text_tokens"] = theirs["text_tokens"]
        out[name] = entry
    return out


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The printed summary of ``LongContextResult.summary()``: the CE of every variant beyond
    and inside the attention context on the headline metric, then each variant minus the
    primary; 4 decimals (the printed values are ``totals(context)[metric]`` rounded)."""
    m, ctx, primary = summary["metric"], summary["context_frames"], summary["primary"]
    label = METRIC_LABELS[m]

    def values(part: str) -> str:
        return ", ".join(f"{k} {v[m]:.4f}" for k, v in summary[part].items())

    lines = [
        f"  {label} beyond the context (>= {ctx} frames): {values('beyond_context')}",
        f"  {label} inside the context (< {ctx} frames): {values('within_context')}",
    ]
    for name, d in summary["difference"].items():
        lines.append(
            f"  {label} beyond the context: {name} - {primary} = "
            f"{d['beyond_context']:+.4f} nats (inside: {d['within_context']:+.4f})"
        )
    return lines


def evaluate_variants(
    lm: LMModel,
    files: Iterable[tuple[str, torch.Tensor]],
    variants: dict[str, Variant],
    *,
    chunk_frames: int = 250,
    primary: str | None = None,
    observer: ChunkObserver | None = None,
    speedup_frames: int = 0,
    bin_frames: int = 250,
    progress: bool = True,
    metric: str = AUTO,
) -> LongContextResult:
    """Run every variant over every file (each file read once), summing per-position losses.

    ``files``: ``(name, codes [17, T])`` pairs, e.g. ``EvalInputs`` (its ``bad`` list goes
    into the result). ``observer`` watches the ``primary`` variant (default: the first).
    ``speedup_frames > 0``: afterwards, time token-by-token streaming against chunks on the
    first file's first frames (``measure_speedup``). ``bin_frames``: the default position bin
    of the result's report; ``metric``: its headline metric (``"auto"``: ``choose_metric``).
    The gates are restored (learned) after.
    """
    check_metric(metric)
    if not variants:
        raise ValueError("no variant to evaluate")
    if bin_frames < 1 or chunk_frames < 1:
        raise ValueError(
            f"bin_frames and chunk_frames must be >= 1, got {bin_frames}, {chunk_frames}"
        )
    primary = primary or next(iter(variants))
    result = LongContextResult(
        variants={k: PositionLosses(lm.dep_q) for k in variants},
        specs=dict(variants),
        primary=primary,
        context=attention_context(lm),
        chunk_frames=chunk_frames,
        bin_frames=bin_frames,
        metric=metric,
    )
    has_ttt = bool(ttt_modules(lm))
    forced = [k for k, v in variants.items() if v.gate is not None or v.reset_every]
    if forced and not has_ttt:
        raise ValueError(f"variants {forced} change TTT gates or states: the model has no TTT")
    seconds = dict.fromkeys(variants, 0.0)
    first: torch.Tensor | None = None
    total = len(files) if hasattr(files, "__len__") else None  # type: ignore[arg-type]
    it: Iterable[tuple[str, torch.Tensor]] = files
    if progress:
        from tqdm import tqdm

        it = tqdm(files, total=total, desc="files", unit="file")
    try:
        for name, codes in it:
            check_codes(lm, codes, name)
            if first is None and speedup_frames > 0:
                first = codes[:, :speedup_frames].clone()
            long_file = codes.shape[-1] > 20 * chunk_frames  # chunk progress bars for these
            for vname, spec in variants.items():
                set_gates(lm, spec.gate)
                watch = observer is not None and vname == primary
                ctx = observer.watch(lm) if watch else contextlib.nullcontext()  # type: ignore[union-attr]
                start = _clock(lm)
                with ctx:
                    losses = stream_losses(
                        lm,
                        codes,
                        chunk_frames=chunk_frames,
                        reset_every=spec.reset_every,
                        observer=observer if watch else None,
                        progress=progress and long_file,
                        desc=vname,
                    )
                seconds[vname] += _clock(lm) - start
                if watch:
                    observer.end_file(codes.shape[-1])  # type: ignore[union-attr]
                result.variants[vname].add(losses)
            result.files.append({"name": name, "frames": int(codes.shape[-1])})
        if first is not None:
            set_gates(lm, variants[primary].gate)
            result.speedup = measure_speedup(lm, first, chunk_frames)
    finally:
        if has_ttt:
            set_gates(lm, None)
    frames = sum(f["frames"] for f in result.files)
    result.timing = {
        k: {"frames": frames, "seconds": s, "frames_per_s": frames / s if s > 0 else float("nan")}
        for k, s in seconds.items()
    }
    bad = getattr(files, "bad", None)
    result.bad = bad.to_dict() if hasattr(bad, "to_dict") else {"files_bad": 0, "bad_files": []}
    return result


def evaluate_long_context(
    lm: LMModel,
    files: Iterable[tuple[str, torch.Tensor]],
    *,
    chunk_frames: int = 250,
    reset_every: int | Sequence[int] | None = None,
    controls: Sequence[str] = ("reset", "no_ttt"),
    observer: ChunkObserver | None = None,
    speedup_frames: int = 0,
    bin_frames: int = 250,
    progress: bool = True,
    metric: str = AUTO,
) -> LongContextResult:
    """Loss against position of the full-memory model and its controls (``Variant``s from
    ``long_context_variants``) over ``files`` (``(name, codes [17, T])``). A model without
    TTT layers gives the one curve ``no_ttt``. See ``evaluate_variants`` for the rest."""
    variants = long_context_variants(lm, reset_every, controls)
    return evaluate_variants(
        lm,
        files,
        variants,
        chunk_frames=chunk_frames,
        observer=observer,
        speedup_frames=speedup_frames,
        bin_frames=bin_frames,
        progress=progress,
        metric=metric,
    )


def _clock(lm: LMModel) -> float:
    if next(lm.parameters()).device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def measure_speedup(lm: LMModel, codes: torch.Tensor, chunk_frames: int) -> dict[str, float]:
    """Frames per second of chunked evaluation vs token-by-token streaming on ``codes
    [17, T]`` (both after a short warm-up), and the largest CE difference between the two."""
    T = codes.shape[-1]
    for chunk in (1, chunk_frames):  # warm-up with the timed shapes: lazy inits, kernels
        stream_losses(lm, codes[:, : min(T, max(chunk, 4))], chunk_frames=chunk)
    out: dict[str, float] = {"frames": float(T), "chunk_frames": float(chunk_frames)}
    results = {}
    for key, chunk in (("token", 1), ("chunked", chunk_frames)):
        start = _clock(lm)
        results[key] = stream_losses(lm, codes, chunk_frames=chunk)
        out[f"{key}_s"] = _clock(lm) - start
        out[f"{key}_frames_per_s"] = T / out[f"{key}_s"]
    out["speedup"] = out["token_s"] / out["chunked_s"]
    a, b = results["token"], results["chunked"]
    out["max_abs_diff"] = float(max((a.text - b.text).abs().max(), (a.audio - b.audio).abs().max()))
    return out


# -- report ---------------------------------------------------------------------------------
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
) -> dict[str, Any]:
    """Add the loss-vs-position section (tables, plots) for named curves (any models or
    variants over the same files) to ``report``; the others are compared against
    ``reference`` (default: the first) on ``metric`` (``audio_ce``, ``cb0``, ``cb1_7``,
    ``text_ce``, or ``"auto"``: ``choose_metric``, audio CE when audio tokens are scored
    beyond the context, else text CE). Table columns where no curve scores anything (e.g.
    the audio columns of text-only data) are left out. Returns (and stores under
    ``report.data``) the numbers, ``metric`` resolved.
    Plots: ``{prefix}loss_vs_position.png``, ``{prefix}gain_vs_position.png`` (with two or more
    curves), ``{prefix}codebooks_vs_position.png`` (when audio is scored)."""
    if not curves:
        raise ValueError("no curve to report")
    requested = check_metric(metric)
    metric = resolve_metric(metric, curves, context)
    col = COLUMN_LABELS[metric]
    reference = reference or next(iter(curves))
    binned = {k: v.binned(bin_frames) for k, v in curves.items()}
    gains = memory_gains(curves, reference, context)
    totals = {k: v.totals() for k, v in curves.items()}
    beyond = {k: v.totals(context) for k, v in curves.items()}
    within = {k: v.totals(0, context) for k, v in curves.items()}
    window = f"{context} frames = {context / FRAME_RATE:g} s" if context else "unlimited"
    report.add_text(
        f"## {title}\n\nAttention context: {window}. Unweighted CE in nats per "
        f"token; position bins of {bin_frames} frames ({bin_frames / FRAME_RATE:g} s)"
        "; means are token-weighted over files. " + metric_note(metric, requested, curves, context)
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
        _headline_text(gains, reference, context, beyond[reference][tokens], metric, reaches)
    )
    if gains:
        g_columns = [
            (f"{col} >= ctx", [g["beyond_context"][metric] for g in gains.values()]),
            (f"{col} < ctx", [g["within_context"][metric] for g in gains.values()]),
        ]
        g_columns += [
            (f"{COLUMN_LABELS[k]} >= ctx", [g["beyond_context"][k] for g in gains.values()])
            for k in beyond_keys
        ]
        _add_columns(report, f"curve - {reference}", list(gains), g_columns)
    _plot_losses(report, binned, context, prefix)
    if gains:
        _plot_gains(report, binned, reference, context, prefix, metric)
    if np.isfinite(np.asarray(binned[reference]["codebooks"], dtype=float)).any():
        _plot_codebooks(report, binned[reference], reference, context, prefix)
    data = {
        "reference": reference,
        "metric": metric,
        "context_frames": context,
        "bin_frames": bin_frames,
        "totals": totals,
        "totals_beyond_context": beyond,
        "totals_within_context": within,
        "gains": gains,
        "curves": binned,
    }
    report.data[f"{prefix}long_context"] = data
    return data


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
    )  # fmt: skip


def _headline_text(
    gains: dict,
    reference: str,
    context: int,
    tokens_beyond: float,
    metric: str = "audio_ce",
    reaches: bool = False,
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
        d = g["beyond_context"][metric]
        verdict = "better" if d > 0 else "worse" if d < 0 else "equal" if d == 0 else "n/a"
        parts.append(f"{name} - {reference} = {d:+.4f} nats ({reference} {verdict})")
    return (
        f"**Headline** ({METRIC_LABELS[metric]} beyond the attention context, >= {context} "
        f"frames, {int(tokens_beyond)} tokens): " + "; ".join(parts) + "."
    )


def _centers(b: dict[str, Any]) -> np.ndarray:
    return (np.asarray(b["start"]) + np.asarray(b["end"]) - 1) / 2


def _mark_context(ax: Any, context: int) -> None:
    if context:
        ax.axvline(context, color="k", ls="--", lw=1, label=f"attention context ({context})")


def _plot_losses(report: Report, binned: dict, context: int, prefix: str) -> None:
    def scored(key: str) -> bool:
        return any(np.isfinite(np.asarray(b[key], dtype=float)).any() for b in binned.values())

    panels = [
        ("audio_ce", "audio CE (8 codebooks)"),
        ("cb0", "codebook 0 (semantic)"),
        ("cb1_7", "codebooks 1-7"),
        ("text_ce", "text CE"),
    ]
    panels = [p for p in panels if scored(p[0])] or panels[:1]
    fig, axes = report.figure(4.0 * len(panels), 3.6, ncols=len(panels))
    for ax, (key, label) in zip(np.atleast_1d(axes), panels):
        for name, b in binned.items():
            ax.plot(_centers(b), np.asarray(b[key], dtype=float), marker=".", label=name)
        _mark_context(ax, context)
        ax.set(title=label, xlabel="position (frames, 80 ms)", ylabel="CE (nats)")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    report.add_figure(fig, f"{prefix}loss_vs_position.png", "Loss against position")


def _plot_gains(
    report: Report, binned: dict, reference: str, context: int, prefix: str, metric: str
) -> None:
    fig, ax = report.figure()
    ref = np.asarray(binned[reference][metric], dtype=float)
    for name, b in binned.items():
        if name != reference:
            mine = np.asarray(b[metric], dtype=float)
            n = min(len(mine), len(ref))
            ax.plot(_centers(b)[:n], mine[:n] - ref[:n], marker=".", label=f"{name} - {reference}")
    ax.axhline(0, color="grey", lw=0.8)
    _mark_context(ax, context)
    label = METRIC_LABELS[metric]
    ax.set(
        xlabel="position (frames, 80 ms)",
        ylabel=f"{label} difference (nats)",
        title=f"Gain of {reference} on {label} (> 0: {reference} better)",
    )
    ax.legend(fontsize=7)
    report.add_figure(
        fig, f"{prefix}gain_vs_position.png", f"{label} difference against {reference}"
    )


def _plot_codebooks(report: Report, b: dict, name: str, context: int, prefix: str) -> None:
    fig, ax = report.figure()
    for k, values in enumerate(b["codebooks"]):
        ax.plot(_centers(b), np.asarray(values, dtype=float), label=f"cb{k}")
    _mark_context(ax, context)
    ax.set(xlabel="position (frames, 80 ms)", ylabel="CE (nats)", title=f"Per codebook: {name}")
    ax.legend(fontsize=7, ncol=3)
    report.add_figure(fig, f"{prefix}codebooks_vs_position.png", f"Per-codebook CE ({name})")


def write_run_info(report: Report, result: LongContextResult, setup: dict[str, Any]) -> None:
    """Setup, files, bad files, timing and speed-up sections, and ``report.data`` entries."""
    rows = [[k, _flat(v)] for k, v in setup.items()]
    rows += [
        ["files evaluated", len(result.files)],
        ["frames", sum(f["frames"] for f in result.files)],
        ["longest file (frames)", max((f["frames"] for f in result.files), default=0)],
        ["chunk (frames)", result.chunk_frames],
        ["variants", "; ".join(f"{k}: {_describe(v)}" for k, v in result.specs.items())],
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


def _flat(value: Any) -> str:
    """A table cell for a setup value: dicts as ``key: value`` pairs."""
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_flat(v)}" for k, v in value.items())
    return str(value)


def _describe(v: Variant) -> str:
    parts = ["gates " + ("learned" if v.gate is None else f"forced to {v.gate:g}")]
    if v.reset_every:
        parts.append(f"TTT reset every {v.reset_every} frames")
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
