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
import copy
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from moshi.models.lm import LMModel
from moshi.modules.transformer import set_attention_context
from moshi.utils.compile import no_compile

from ..format import FRAME_RATE, NUM_CODEBOOKS
from ..integration.apply import set_gates, ttt_modules
from ..integration.streaming import chunked_streaming, delayed_inputs, reset_ttt_states
from ..models.lora import lora_modules
from ..recipes import HARM_TOLERANCE
from .report import Report
from .stats import fmt_interval, ratio_difference, ratio_interval

NUM_AUDIO = NUM_CODEBOOKS  # Moshi's codebooks, the scored audio
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

    def __init__(self, num_codebooks: int = NUM_AUDIO, block_frames: int = 50) -> None:
        if block_frames < 1:
            raise ValueError(f"block_frames must be >= 1, got {block_frames}")
        self.text_sum = np.zeros(0)
        self.text_count = np.zeros(0)
        self.audio_sum = np.zeros((num_codebooks, 0))
        self.audio_count = np.zeros((num_codebooks, 0))
        self.files = np.zeros(0)
        # per file, for intervals and equal-length curves: sums over blocks of
        # ``block_frames`` frames, rows text_sum, text_count, audio_sum[K], audio_count[K]
        self.block_frames = block_frames
        self.file_names: list[str] = []
        self.file_frames: list[int] = []
        self.file_blocks: list[np.ndarray] = []
        self.foreign_history: int | None = None  # set for the foreign-history control

    @property
    def length(self) -> int:
        return len(self.files)

    def add(self, f: FileLosses, name: str | None = None, start: int = 0) -> None:
        """Add one file's losses; ``name`` identifies it in the per-file data (default: its
        index); positions before ``start`` are left out (as if not scored)."""
        if start > 0:
            keep = torch.arange(f.text.shape[-1]) >= start
            f = FileLosses(
                torch.where(keep, f.text, 0.0), f.text_mask & keep,
                torch.where(keep, f.audio, 0.0), f.audio_mask & keep,
            )  # fmt: skip
        self._add_positions(f)
        rows = np.concatenate(
            [
                f.text.double().numpy()[None],
                f.text_mask.double().numpy()[None],
                f.audio.double().numpy(),
                f.audio_mask.double().numpy(),
            ]
        )
        starts = np.arange(0, rows.shape[1], self.block_frames)
        self.file_blocks.append(np.add.reduceat(rows, starts, axis=1) if len(starts) else rows)
        self.file_names.append(str(len(self.file_names)) if name is None else name)
        self.file_frames.append(int(rows.shape[1]))

    def _add_positions(self, f: FileLosses) -> None:
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

    def file_totals(
        self, start: int = 0, end: int | None = None
    ) -> dict[str, dict[str, np.ndarray]]:
        """Per file (order ``file_names``): ``{metric: {"sum", "count"}}`` of the CE (nats) and
        token counts over positions ``[start, end)``, rounded down to ``block_frames`` (exact
        for multiples of it)."""
        B, K = self.block_frames, (len(self.file_blocks[0]) - 2) // 2 if self.file_blocks else 0
        a, b = start // B, None if end is None else end // B
        out: dict[str, dict[str, list[float]]] = {m: {"sum": [], "count": []} for m in METRICS}
        for blocks in self.file_blocks:
            x = blocks[:, a:b].sum(1)
            a_sum, a_cnt = x[2 : 2 + K], x[2 + K :]
            for m, (num, den) in {
                "audio_ce": (a_sum.sum(), a_cnt.sum()),
                "cb0": (a_sum[0], a_cnt[0]),
                "cb1_7": (a_sum[1:].sum(), a_cnt[1:].sum()),
                "text_ce": (x[0], x[1]),
            }.items():
                out[m]["sum"].append(float(num))
                out[m]["count"].append(float(den))
        return {m: {k: np.asarray(v) for k, v in d.items()} for m, d in out.items()}

    def file_bins(self, bin_frames: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """``(sums, counts)`` ``[files, bins]`` of ``metric`` per position bin (``bin_frames``
        rounded down to a multiple of ``block_frames``, at least one block)."""
        per = max(1, bin_frames // self.block_frames)
        nb = max((x.shape[1] for x in self.file_blocks), default=0)
        n_bins = -(-nb // per)
        sums, counts = (
            np.zeros((len(self.file_blocks), n_bins)),
            np.zeros((len(self.file_blocks), n_bins)),
        )
        K = (len(self.file_blocks[0]) - 2) // 2 if self.file_blocks else 0
        for i, blocks in enumerate(self.file_blocks):
            num, den = _metric_rows(blocks, K, metric)
            starts = np.arange(0, blocks.shape[1], per)
            sums[i, : len(starts)] = np.add.reduceat(num, starts)
            counts[i, : len(starts)] = np.add.reduceat(den, starts)
        return sums, counts

    def grouped(self, unit: Callable[[str], str]) -> PositionLosses:
        """The same curve with the per-file data summed into units ``unit(name)`` (e.g.
        several sequences of one source file): intervals then resample whole units. Positions
        and totals are unchanged."""
        out = copy.copy(self)
        out.file_names, out.file_frames, out.file_blocks = [], [], []
        index: dict[str, int] = {}
        for name, T, blocks in zip(self.file_names, self.file_frames, self.file_blocks):
            key = unit(name)
            if key not in index:
                index[key] = len(out.file_names)
                out.file_names.append(key)
                out.file_frames.append(T)
                out.file_blocks.append(blocks.copy())
                continue
            i = index[key]
            have = out.file_blocks[i]
            width = max(have.shape[1], blocks.shape[1])
            merged = np.zeros((have.shape[0], width))
            merged[:, : have.shape[1]] += have
            merged[:, : blocks.shape[1]] += blocks
            out.file_blocks[i] = merged
            out.file_frames[i] = max(out.file_frames[i], T)
        return out

    def equal_length(self, frames: int) -> PositionLosses:
        """The curve of the files of at least ``frames`` frames, each cropped to ``frames``
        (rounded down to ``block_frames``), so every bin averages the same files. Positions
        are resolved to blocks: a block's sums sit at its first position, so bins and
        boundaries that are multiples of ``block_frames`` are exact."""
        B = self.block_frames
        n_blocks = frames // B
        if n_blocks < 1:
            raise ValueError(f"equal length {frames} frames is shorter than a block ({B})")
        K = (len(self.file_blocks[0]) - 2) // 2 if self.file_blocks else self.audio_sum.shape[0]
        out = PositionLosses(K, B)
        L = n_blocks * B
        for name, T, blocks in zip(self.file_names, self.file_frames, self.file_blocks):
            if T < L:
                continue
            kept = blocks[:, :n_blocks]
            pos = np.zeros((kept.shape[0], L))
            pos[:, ::B] = kept
            if out.length == 0:
                out.text_sum, out.text_count, out.files = np.zeros(L), np.zeros(L), np.zeros(L)
                out.audio_sum, out.audio_count = np.zeros((K, L)), np.zeros((K, L))
            out.text_sum += pos[0]
            out.text_count += pos[1]
            out.audio_sum += pos[2 : 2 + K]
            out.audio_count += pos[2 + K :]
            out.files += 1
            out.file_names.append(name)
            out.file_frames.append(L)
            out.file_blocks.append(kept.copy())
        return out


def _metric_rows(blocks: np.ndarray, K: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(CE sums, token counts) per block of ``metric`` from a file's block rows."""
    a_sum, a_cnt = blocks[2 : 2 + K], blocks[2 + K :]
    if metric == "audio_ce":
        return a_sum.sum(0), a_cnt.sum(0)
    if metric == "cb0":
        return a_sum[0], a_cnt[0]
    if metric == "cb1_7":
        return a_sum[1:].sum(0), a_cnt[1:].sum(0)
    if metric == "text_ce":
        return blocks[0], blocks[1]
    raise ValueError(f"metric {metric!r}: expected one of {METRICS}")


def ppl(ce: Any) -> Any:
    """Perplexity ``exp(CE)`` of a CE in nats (float or list; NaN stays NaN)."""
    if isinstance(ce, list):
        return [ppl(v) for v in ce]
    return float(np.exp(ce)) if ce is not None and np.isfinite(ce) else float("nan")


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
    """One pass of the model: ``gate`` forces every TTT gate (None: as learned; 0: no TTT,
    i.e. the base model plus whatever else was trained, LoRA or embeddings), ``reset_every``
    restarts the TTT state every that many frames (None: never), ``context`` shortens the
    attention window to that many frames for this pass (None: the model's),
    ``foreign_history`` replaces the file's first that many frames (all 17 rows) with another
    file's (the previous one; the first file gets the last one) and scores only the positions
    after them (None: the file as it is)."""

    gate: float | None = None
    reset_every: int | None = None
    context: int | None = None
    foreign_history: int | None = None


CONTROLS = ("reset", "no_ttt", "window", "foreign")


def long_context_variants(
    lm: LMModel,
    reset_every: int | Sequence[int] | None = None,
    controls: Sequence[str] = (),
    *,
    window: int | Sequence[int] | None = None,
    foreign_history: int | None = None,
) -> dict[str, Variant]:
    """The variants of ``controls`` (among ``CONTROLS``) for ``lm``.

    A TTT model: ``ttt`` (full memory), ``reset_every_N`` (``"reset"``; N defaults to the
    attention context), ``no_ttt`` (``"no_ttt"``: gates 0), ``window_W`` (``"window"``: the
    attention window cut to W frames, default a quarter of the context, 750 for Moshi; with
    ``no_ttt`` also ``no_ttt_window_W``: does the memory recover what attention lost?),
    ``foreign_history_D`` (``"foreign"``: the first D frames, default the context, from another
    file: does the model use *this* file's past?). A model without TTT layers: ``no_ttt``,
    ``no_ttt_window_W`` and ``foreign_history_D`` as asked."""
    unknown = set(controls) - set(CONTROLS)
    if unknown:
        raise ValueError(f"unknown controls {sorted(unknown)}: use any of {', '.join(CONTROLS)}")
    context = attention_context(lm) or 3000
    windows = [max(1, context // 4)] if window is None else _ints(window, "window")
    has_ttt = bool(ttt_modules(lm))
    out = {"ttt": Variant()} if has_ttt else {"no_ttt": Variant()}
    if has_ttt and "reset" in controls:
        for n in _ints(context if reset_every is None else reset_every, "reset_every"):
            out[f"reset_every_{n}"] = Variant(reset_every=n)
    if has_ttt and "no_ttt" in controls:
        out["no_ttt"] = Variant(gate=0.0)
    if "window" in controls:
        for w in windows:
            if has_ttt:
                out[f"window_{w}"] = Variant(context=w)
            if not has_ttt or "no_ttt" in controls:
                out[f"no_ttt_window_{w}"] = Variant(gate=0.0 if has_ttt else None, context=w)
    if "foreign" in controls:
        d = _ints(context if foreign_history is None else foreign_history, "foreign_history")[0]
        out[f"foreign_history_{d}"] = Variant(foreign_history=d)
    return out


def _ints(value: int | Sequence[int], name: str) -> list[int]:
    values = [int(value)] if isinstance(value, (int, np.integer)) else [int(v) for v in value]
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{name} must be >= 1 frame, got {value}")
    return values


@contextlib.contextmanager
def attention_window(lm: LMModel, context: int | None) -> Any:
    """Temporarily set the temporal transformer's attention context to ``context`` frames
    (None: leave it); restored after."""
    if context is None:
        yield
        return
    old = attention_context(lm)
    set_attention_context(lm.transformer, int(context))
    try:
        yield
    finally:
        set_attention_context(lm.transformer, old or None)


def splice_history(codes: torch.Tensor, donor: torch.Tensor, frames: int) -> torch.Tensor:
    """``codes [17, T]`` with its first ``min(frames, T)`` frames replaced by ``donor``'s
    (repeated if the donor is shorter)."""
    n = min(frames, codes.shape[-1])
    if donor.shape[-1] < 1:
        raise ValueError("foreign history: the donor file is empty")
    reps = -(-n // donor.shape[-1])
    out = codes.clone()
    out[:, :n] = donor.repeat(1, reps)[:, :n].to(codes)
    return out


def is_gate_zero_base(lm: LMModel) -> bool:
    """Whether gates 0 leave exactly the base model: no LoRA and no trainable non-TTT weight
    was added (False where the run trained LoRA; then ``no_ttt`` is base + LoRA)."""
    return not lora_modules(lm)


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
    equal_lengths: Sequence[int] | str = "auto"  # equal-length curves: frames, "auto" or ()
    gate_zero_is_base: bool = True  # False: gates 0 leave base + LoRA, not the base model

    def resolved_equal_lengths(self) -> list[int]:
        """``equal_lengths`` with ``"auto"`` resolved (``auto_equal_length``)."""
        if isinstance(self.equal_lengths, str):
            if self.equal_lengths != "auto":
                raise ValueError(f"equal_lengths: 'auto' or frames, got {self.equal_lengths!r}")
            block = next(iter(self.variants.values())).block_frames
            auto = auto_equal_length([f["frames"] for f in self.files], self.bin_frames, block)
            return [auto] if auto else []
        return [int(v) for v in self.equal_lengths]

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
        out["intervals"] = file_intervals(self.variants, self.primary, self.context, m)
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
            "curve_intervals": {
                k: binned_intervals(v, bin_frames, summary["metric"])
                for k, v in self.variants.items()
            },
            "equal_length": {
                str(L): {k: v.equal_length(L).binned(bin_frames) for k, v in self.variants.items()}
                for L in self.resolved_equal_lengths()
            },
            "per_file": per_file_data(self.variants, self.context),
            "gate_zero_is_base": self.gate_zero_is_base,
        }


def auto_equal_length(frames: Sequence[int], bin_frames: int, block: int = 1) -> int:
    """The default equal length: the median file length rounded down to a multiple of
    ``bin_frames`` (of ``block`` when shorter than a bin), so that about half the files
    enter the equal-length curve; 0 (none) with fewer than 2 files of that length."""
    if len(frames) < 2:
        return 0
    med = int(np.median(np.asarray(frames)))
    L = med // bin_frames * bin_frames or med // block * block
    return L if L > 0 and sum(f >= L for f in frames) >= 2 else 0


def binned_intervals(curve: PositionLosses, bin_frames: int, metric: str) -> dict[str, Any]:
    """Per position bin of ``metric``: a 95 % bootstrap interval over files of the
    token-weighted mean (``lo``, ``hi``), the spread of the per-file means (``file_std``)
    and the files with a scored token (``n_files``); empty without per-file data."""
    if not curve.file_blocks:
        return {"lo": [], "hi": [], "file_std": [], "n_files": []}
    sums, counts = curve.file_bins(bin_frames, metric)
    F = sums.shape[0]
    idx = np.random.default_rng(0).integers(0, F, size=(1000, F))
    num, den = sums[idx].sum(1), counts[idx].sum(1)  # [boot, bins]
    boot = np.divide(num, den, out=np.full(num.shape, np.nan), where=den > 0)
    means = np.divide(sums, counts, out=np.full(sums.shape, np.nan), where=counts > 0)
    lo, hi, std = (np.full(sums.shape[1], np.nan) for _ in range(3))
    for j in range(sums.shape[1]):  # bins without data stay NaN (no warnings)
        col = boot[:, j][np.isfinite(boot[:, j])]
        if col.size:
            lo[j], hi[j] = np.quantile(col, [0.025, 0.975])
        m = means[:, j][np.isfinite(means[:, j])]
        if m.size > 1:
            std[j] = m.std(ddof=1)
    return {
        "lo": lo.tolist(),
        "hi": hi.tolist(),
        "file_std": std.tolist(),
        "n_files": (counts > 0).sum(0).tolist(),
    }


def file_intervals(
    curves: dict[str, PositionLosses], reference: str, context: int, metric: str
) -> dict[str, Any]:
    """Bootstrap over files (95 %, seed 0) on ``metric``: per curve the CE beyond and within
    the context (``ratio_interval``), and per other curve its difference to ``reference``
    (``ratio_difference``, paired on file names; > 0: the reference is better). Curves
    without per-file data are left out."""
    parts = {"beyond_context": (context, None), "within_context": (0, context)}
    out: dict[str, Any] = {"totals": {}, "difference": {}}
    ref = curves.get(reference)
    for name, c in curves.items():
        if not c.file_blocks:
            continue
        out["totals"][name] = {
            part: ratio_interval(*_sc(c.file_totals(a, b)[metric]))
            for part, (a, b) in parts.items()
        }
        if name == reference or ref is None or not ref.file_blocks:
            continue
        entry = {}
        start = _foreign_start(c, context)
        parts_c = dict(parts)
        if start is not None:
            parts_c["beyond_foreign_history"] = (start, None)
        for part, (a, b) in parts_c.items():
            mine, theirs = _aligned(c, ref, a, b, metric)
            entry[part] = ratio_difference(*mine, *theirs)
            if part == "beyond_foreign_history":
                entry[part]["start_frame"] = a
        out["difference"][name] = entry
    return out


def _foreign_start(c: PositionLosses, context: int) -> int | None:
    d = getattr(c, "foreign_history", None)
    return None if d is None else d + context


def _sc(d: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return d["sum"], d["count"]


def _aligned(
    a: PositionLosses, b: PositionLosses, start: int, end: int | None, metric: str
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Per-file (sum, count) of two curves over their common files, in one order."""
    ta, tb = a.file_totals(start, end)[metric], b.file_totals(start, end)[metric]
    ia = {n: i for i, n in enumerate(a.file_names)}
    ib = {n: i for i, n in enumerate(b.file_names)}
    common = [n for n in a.file_names if n in ib]
    xa = [np.asarray([t[k][ia[n]] for n in common]) for t, k in ((ta, "sum"), (ta, "count"))]
    xb = [np.asarray([t[k][ib[n]] for n in common]) for t, k in ((tb, "sum"), (tb, "count"))]
    return (xa[0], xa[1]), (xb[0], xb[1])


def per_file_data(curves: dict[str, PositionLosses], context: int) -> dict[str, Any]:
    """Per variant and file, the CE sums and token counts of every metric over all
    positions, beyond and within the context (for ``eval compare``): ``{variant: {"names",
    "frames", "<part>": {metric: {"sum": [...], "count": [...]}}}}``."""
    parts = {"all": (0, None), "beyond_context": (context, None), "within_context": (0, context)}
    out = {}
    for name, c in curves.items():
        if not c.file_blocks:
            continue
        entry: dict[str, Any] = {"names": list(c.file_names), "frames": list(c.file_frames)}
        for part, (a, b) in parts.items():
            entry[part] = {
                m: {k: v.tolist() for k, v in d.items()} for m, d in c.file_totals(a, b).items()
            }
        out[name] = entry
    return out


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
    intervals = summary.get("intervals", {}).get("difference", {})
    for name, d in summary["difference"].items():
        ci = intervals.get(name, {}).get("beyond_context")
        extra = ""
        if ci and math.isfinite(ci.get("lo", math.nan)):
            extra = (
                f" [95 % CI {ci['lo']:+.4f}, {ci['hi']:+.4f}; p = {ci['p_value']:.3g}; "
                f"{ci['n']} files]"
            )
        lines.append(
            f"  {label} beyond the context: {name} - {primary} = "
            f"{d['beyond_context']:+.4f} nats (inside: {d['within_context']:+.4f}){extra}"
        )
    if "no_ttt" in summary["difference"] and primary != "no_ttt":
        within = summary["difference"]["no_ttt"]["within_context"]
        ci = intervals.get("no_ttt", {}).get("within_context")
        lines.append(harm_line(within, ci, label))
    return lines


def harm_line(base_minus_memory: float, ci: dict[str, Any] | None, label: str) -> str:
    """ "Inside the window: vs the base" for a memory, from ``base - memory`` inside the
    context (and its interval, also ``base - memory``), with a warning past
    ``HARM_TOLERANCE``."""
    harm = -base_minus_memory
    text = f"  {label} inside the window: memory - base (gate 0) = {harm:+.4f} nats"
    if ci and math.isfinite(ci.get("lo", math.nan)):
        text += f" [95 % CI {-ci['hi']:+.4f}, {-ci['lo']:+.4f}; {ci['n']} files]"
    if harm > HARM_TOLERANCE:
        text += (f"  WARNING: the memory makes the model worse where the attention sees "
                 f"everything (tolerance {HARM_TOLERANCE})")  # fmt: skip
    return text


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
    if variants[primary].foreign_history:
        raise ValueError(f"the primary variant {primary!r} cannot be a foreign-history control")
    context = attention_context(lm)
    block = math.gcd(bin_frames, context) if context else bin_frames
    result = LongContextResult(
        variants={k: PositionLosses(lm.dep_q, block) for k in variants},
        specs=dict(variants),
        primary=primary,
        context=attention_context(lm),
        chunk_frames=chunk_frames,
        bin_frames=bin_frames,
        metric=metric,
        gate_zero_is_base=is_gate_zero_base(lm),
    )
    for k, v in variants.items():
        result.variants[k].foreign_history = v.foreign_history
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
    foreign = {k: v for k, v in variants.items() if v.foreign_history}
    history = max((v.foreign_history or 0 for v in variants.values()), default=0)
    first_file: tuple[str, torch.Tensor] | None = None
    donor: torch.Tensor | None = None

    def run(vname: str, spec: Variant, name: str, codes: torch.Tensor) -> None:
        set_gates(lm, spec.gate)
        watch = observer is not None and vname == primary
        ctx = observer.watch(lm) if watch else contextlib.nullcontext()  # type: ignore[union-attr]
        start = _clock(lm)
        with ctx, attention_window(lm, spec.context):
            losses = stream_losses(
                lm,
                codes,
                chunk_frames=chunk_frames,
                reset_every=spec.reset_every,
                observer=observer if watch else None,
                progress=progress and codes.shape[-1] > 20 * chunk_frames,
                desc=vname,
            )
        seconds[vname] += _clock(lm) - start
        if watch:
            observer.end_file(codes.shape[-1])  # type: ignore[union-attr]
        result.variants[vname].add(losses, name, start=spec.foreign_history or 0)

    try:
        for name, codes in it:
            check_codes(lm, codes, name)
            if first is None and speedup_frames > 0:
                first = codes[:, :speedup_frames].clone()
            for vname, spec in variants.items():
                if spec.foreign_history:
                    if donor is not None:
                        run(vname, spec, name, splice_history(codes, donor, spec.foreign_history))
                else:
                    run(vname, spec, name, codes)
            if foreign:
                if first_file is None:
                    first_file = (name, codes.clone())
                donor = codes[:, :history].clone()
            result.files.append({"name": name, "frames": int(codes.shape[-1])})
        if first_file is not None and len(result.files) > 1 and donor is not None:
            name, codes = first_file  # the first file's foreign history: the last file's
            for vname, spec in foreign.items():
                run(vname, spec, name, splice_history(codes, donor, spec.foreign_history or 0))
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
    window: int | Sequence[int] | None = None,
    foreign_history: int | None = None,
    equal_lengths: Sequence[int] | str = "auto",
) -> LongContextResult:
    """Loss against position of the full-memory model and its controls (``Variant``s from
    ``long_context_variants``: ``reset``, ``no_ttt``, ``window``, ``foreign``) over ``files``
    (``(name, codes [17, T])``). A model without TTT layers gives the curve ``no_ttt`` (and
    its window / foreign-history controls). ``equal_lengths``: frames of the equal-length
    curves of the report (``"auto"``: ``auto_equal_length``; ``()``: none). See
    ``evaluate_variants`` for the rest."""
    variants = long_context_variants(
        lm, reset_every, controls, window=window, foreign_history=foreign_history
    )
    result = evaluate_variants(
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
    result.equal_lengths = equal_lengths if isinstance(equal_lengths, str) else list(equal_lengths)
    return result


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
    equal_lengths: Sequence[int] = (),
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
    frames cropped to L (``PositionLosses.equal_length``; prefix ``eq<L>_``)."""
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
    intervals = file_intervals(curves, reference, context, metric)
    report.add_text(
        f"## {title}\n\nAttention context: {window}. Unweighted CE in nats per "
        f"token; perplexity = exp(CE) of the same tokens; position bins of {bin_frames} frames "
        f"({bin_frames / FRAME_RATE:g} s); means are token-weighted over files; intervals are "
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
            intervals["difference"],
        )
    )  # fmt: skip
    if gains:
        diff = intervals["difference"]
        g_columns = [
            (f"{col} >= ctx", [g["beyond_context"][metric] for g in gains.values()]),
            (
                "95 % CI (files)",
                [
                    fmt_interval(diff.get(k, {}).get("beyond_context", {}), 1, 4, "difference")
                    for k in gains
                ],
            ),
            ("p", [_p(diff.get(k, {}).get("beyond_context", {})) for k in gains]),
            (f"{col} < ctx", [g["within_context"][metric] for g in gains.values()]),
        ]
        g_columns += [
            (f"{COLUMN_LABELS[k]} >= ctx", [g["beyond_context"][k] for g in gains.values()])
            for k in beyond_keys
        ]
        _add_columns(report, f"curve - {reference}", list(gains), g_columns)
        foreign = {
            k: d["beyond_foreign_history"] for k, d in diff.items() if "beyond_foreign_history" in d
        }
        for k, d in foreign.items():
            report.add_text(
                f"Foreign-history control `{k}`: beyond the replaced history and one attention "
                f"window (>= {d['start_frame']} frames, where attention sees only this file), "
                f"{k} - {reference} = {fmt_interval(d, 1, 4, 'difference')} nats, "
                f"p = {_p(d)} ({d['n']} files; > 0: the model uses this file's past)."
            )
    bands = {k: binned_intervals(v, bin_frames, metric) for k, v in curves.items()}
    _plot_losses(report, binned, context, prefix, bands, metric)
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
        "intervals": intervals,
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
            report, eq, context=context, bin_frames=bin_frames, reference=reference,
            prefix=f"{prefix}eq{L}_", metric=metric,
            title=f"Equal-length curves: {n} files of >= {L} frames ({L / FRAME_RATE:g} s), "
            f"cropped to {L}; every bin averages the same files",
        )  # fmt: skip
        data["equal_lengths"].append({"frames": L, "files": n, "prefix": f"{prefix}eq{L}_"})
        del sub
    return data


def _p(ci: dict[str, Any]) -> str:
    p = ci.get("p_value")
    return "-" if p is None or not math.isfinite(p) else f"{p:.3g}"


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
        ci = (intervals or {}).get(name, {}).get("beyond_context", {})
        extra = ""
        if math.isfinite(ci.get("lo", math.nan)):
            extra = f", 95 % CI [{ci['lo']:+.4f}, {ci['hi']:+.4f}], p = {_p(ci)}"
        parts.append(f"{name} - {reference} = {d:+.4f} nats ({reference} {verdict}{extra})")
    return (
        f"**Headline** ({METRIC_LABELS[metric]} beyond the attention context, >= {context} "
        f"frames, {int(tokens_beyond)} tokens): " + "; ".join(parts) + "."
    )


def _centers(b: dict[str, Any]) -> np.ndarray:
    return (np.asarray(b["start"]) + np.asarray(b["end"]) - 1) / 2


def _mark_context(ax: Any, context: int) -> None:
    if context:
        ax.axvline(context, color="k", ls="--", lw=1, label=f"attention context ({context})")


def _plot_losses(
    report: Report,
    binned: dict,
    context: int,
    prefix: str,
    bands: dict[str, dict[str, Any]] | None = None,
    metric: str | None = None,
) -> None:
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
            (line,) = ax.plot(_centers(b), np.asarray(b[key], dtype=float), marker=".", label=name)
            band = (bands or {}).get(name, {})
            if key == metric and len(band.get("lo", [])) == len(b[key]):
                lo, hi = (np.asarray(band[k], dtype=float) for k in ("lo", "hi"))
                ax.fill_between(_centers(b), lo, hi, color=line.get_color(), alpha=0.2, lw=0)
        _mark_context(ax, context)
        ax.set(title=label, xlabel="position (frames, 80 ms)", ylabel="CE (nats)")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    report.add_figure(
        fig,
        f"{prefix}loss_vs_position.png",
        "Loss against position (shaded: 95 % bootstrap interval over files, headline metric)",
    )


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
