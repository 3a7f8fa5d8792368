"""Statistics over files: per-position sums (``PositionLosses``), the headline metric, binned
and per-file intervals, memory gains and the summary lines of a ``LongContextResult``.

Units: CE in nats per scored token; positions in frames (12.5 Hz); intervals are bootstrap
95 % intervals over files (``eval.stats``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ...format import NUM_CODEBOOKS
from ...recipes import HARM_TOLERANCE
from ...token_weights import FIRST_CODEBOOK_WEIGHT, TEXT_PADDING_WEIGHT
from ..stats import flip_interval, format_p, ratio_difference, ratio_interval, ratio_sum
from .scoring import FileLosses, Variant

NUM_AUDIO = NUM_CODEBOOKS  # Moshi's codebooks, the scored audio


# moshi-finetune's training loss: text CE weighted (PAD/EPAD x0.5) + audio CE weighted (codebook
# 0 x100), the sum of two token-weighted means (two terms: ``_metric_terms``)
MOSHI_LOSS = "moshi_loss"


METRICS = ("audio_ce", "cb0", "cb1_7", "text_ce", MOSHI_LOSS)


METRIC_LABELS = {"audio_ce": "audio CE", "cb0": "cb0 CE", "cb1_7": "cb1-7 CE", "text_ce": "text CE",
                 MOSHI_LOSS: "moshi loss"}  # fmt: skip


COLUMN_LABELS = {"audio_ce": "audio CE", "cb0": "cb0", "cb1_7": "cb1-7", "text_ce": "text CE",
                 MOSHI_LOSS: "moshi loss"}  # fmt: skip


AUTO = "auto"  # the headline metric chosen from what is scored (``choose_metric``)


class PositionLosses:
    """CE sums and token counts per position over files (float64 numpy, grown as needed):
    ``text_sum``/``text_count`` ``[P]``, the same on PAD/EPAD targets ``pad_sum``/``pad_count``
    ``[P]``, ``audio_sum``/``audio_count`` ``[8, P]``, ``files`` ``[P]`` (files reaching
    position p)."""

    def __init__(self, num_codebooks: int = NUM_AUDIO, block_frames: int = 50) -> None:
        if block_frames < 1:
            raise ValueError(f"block_frames must be >= 1, got {block_frames}")
        self.text_sum = np.zeros(0)
        self.text_count = np.zeros(0)
        self.pad_sum = np.zeros(0)
        self.pad_count = np.zeros(0)
        self.audio_sum = np.zeros((num_codebooks, 0))
        self.audio_count = np.zeros((num_codebooks, 0))
        self.files = np.zeros(0)
        # per file, for intervals and equal-length curves: sums over blocks of
        # ``block_frames`` frames, rows text_sum, text_count, the text CE and count on PAD/EPAD
        # targets, audio_sum[K], audio_count[K] (``_rows``)
        self.num_codebooks = num_codebooks
        self.block_frames = block_frames
        self.file_names: list[str] = []
        self.file_frames: list[int] = []
        self.file_blocks: list[np.ndarray] = []
        self.foreign_history: int | None = None  # set for the foreign-history control
        # per file, the text CE and scored mask per position (float32, bool), for metrics on a
        # subset of positions (``eval.recall``: repeated bytes, needles) and mixing with a memory
        self.file_text: list[tuple[np.ndarray, np.ndarray]] = []
        self.file_padding: list[np.ndarray] = []  # per file, bool [T]: scored PAD/EPAD target

    @classmethod
    def of_positions(cls, text_sum: np.ndarray, text_count: np.ndarray, audio_sum: np.ndarray,
                     audio_count: np.ndarray, files: np.ndarray) -> PositionLosses:  # fmt: skip
        """A curve of per-position sums only (no per-file data: no intervals), e.g. an
        analytic one; ``[P]`` text and files, ``[K, P]`` audio; no PAD/EPAD target."""
        out = cls(audio_sum.shape[0])
        P = len(files)
        if text_sum.shape != (P,) or text_count.shape != (P,) or audio_sum.shape[1:] != (P,) \
                or audio_count.shape != audio_sum.shape:  # fmt: skip
            raise ValueError(f"per-position sums of {P} positions expected, got text "
                             f"{text_sum.shape}, {text_count.shape}, audio {audio_sum.shape}, "
                             f"{audio_count.shape}")  # fmt: skip
        out.text_sum, out.text_count, out.files = (np.asarray(a, dtype=np.float64) for a in
                                                   (text_sum, text_count, files))  # fmt: skip
        out.audio_sum = np.asarray(audio_sum, dtype=np.float64)
        out.audio_count = np.asarray(audio_count, dtype=np.float64)
        out.pad_sum, out.pad_count = np.zeros(P), np.zeros(P)
        return out

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
                None if f.text_padding is None else f.text_padding & keep,
            )  # fmt: skip
        if f.audio.shape[0] != self.num_codebooks:
            raise ValueError(f"{name}: {f.audio.shape[0]} codebooks, the curve has "
                             f"{self.num_codebooks}")  # fmt: skip
        text, mask = f.text.float().numpy().copy(), f.text_mask.numpy().copy()
        padding = np.zeros_like(mask) if f.text_padding is None else f.text_padding.numpy() & mask
        self._add_positions(f, padding)
        audio = np.concatenate([f.audio.double().numpy(), f.audio_mask.double().numpy()])
        self._add_blocks(str(len(self.file_names)) if name is None else name, text, mask,
                         padding, self._block_sums(audio))  # fmt: skip

    def _block_sums(self, rows: np.ndarray) -> np.ndarray:
        """``rows [R, T]`` summed over blocks of ``block_frames`` frames: ``[R, blocks]``."""
        starts = np.arange(0, rows.shape[1], self.block_frames)
        return np.add.reduceat(rows, starts, axis=1) if len(starts) else rows

    def _add_blocks(self, name: str, text: np.ndarray, mask: np.ndarray, padding: np.ndarray,
                    audio_blocks: np.ndarray) -> None:  # fmt: skip
        """One file's per-file data: text CE ``[T]``, scored ``[T]``, PAD/EPAD ``[T]``, and its
        audio rows already summed over blocks ``[2K, blocks]`` (sums, then counts)."""
        t = text.astype(np.float64)
        text_rows = np.stack([t, mask, t * padding, padding]).astype(np.float64)
        self.file_blocks.append(np.concatenate([self._block_sums(text_rows), audio_blocks]))
        self.file_names.append(name)
        self.file_frames.append(len(t))
        self.file_text.append((text, mask))
        self.file_padding.append(padding.astype(bool))

    def with_text(self, files: Sequence[tuple[np.ndarray, np.ndarray]]) -> PositionLosses:
        """The same curve with each file's text CE and scored mask replaced by ``files``
        (``(ce [T], scored [T])`` in ``file_names`` order, e.g. a memory mixed into the text
        stream); audio and the PAD/EPAD marks are kept."""
        if len(files) != len(self.file_names):
            raise ValueError(f"{len(files)} files of text CE for a curve of "
                             f"{len(self.file_names)}")  # fmt: skip
        out = PositionLosses(self.num_codebooks, self.block_frames)
        out.foreign_history = self.foreign_history
        out.audio_sum, out.audio_count = self.audio_sum.copy(), self.audio_count.copy()
        out.files = self.files.copy()
        out.text_sum, out.text_count = np.zeros(self.length), np.zeros(self.length)
        out.pad_sum, out.pad_count = np.zeros(self.length), np.zeros(self.length)
        for i, (ce, mask) in enumerate(files):
            T = self.file_frames[i]
            if len(ce) != T or len(mask) != T:
                raise ValueError(f"{self.file_names[i]}: text CE of {len(ce)} positions, the "
                                 f"file has {T}")  # fmt: skip
            ce = np.where(mask, ce, 0.0).astype(np.float32)
            padding = self.file_padding[i] & mask.astype(bool)
            out.text_sum[:T] += ce
            out.text_count[:T] += mask
            out.pad_sum[:T] += ce * padding
            out.pad_count[:T] += padding
            audio_blocks = _rows(self.file_blocks[i], self.num_codebooks)[4]
            out._add_blocks(self.file_names[i], ce, mask.astype(bool), padding, audio_blocks)
        return out

    def _add_positions(self, f: FileLosses, padding: np.ndarray) -> None:
        n = f.text.shape[-1]
        if self.length < n:
            pad = n - self.length
            self.text_sum, self.text_count, self.pad_sum, self.pad_count, self.files = (
                np.pad(a, (0, pad))
                for a in (self.text_sum, self.text_count, self.pad_sum, self.pad_count, self.files)
            )
            self.audio_sum, self.audio_count = (
                np.pad(a, ((0, 0), (0, pad))) for a in (self.audio_sum, self.audio_count)
            )
        text = f.text.double().numpy()
        self.text_sum[:n] += text
        self.text_count[:n] += f.text_mask.double().numpy()
        self.pad_sum[:n] += text * padding
        self.pad_count[:n] += padding
        self.audio_sum[:, :n] += f.audio.double().numpy()
        self.audio_count[:, :n] += f.audio_mask.double().numpy()
        self.files[:n] += 1

    def totals(self, start: int = 0, end: int | None = None) -> dict[str, Any]:
        """Token-weighted mean CE (nats) over positions ``[start, end)``: every one of
        ``METRICS`` (``audio_ce``: all 8 codebooks, ``cb0``: semantic, ``cb1_7``, ``text_ce``,
        ``moshi_loss``), ``codebooks`` (8 values), and the token counts; NaN where nothing was
        scored."""
        x = self._position_rows()[:, start:end].sum(1)
        a_sum, a_cnt = np.split(_rows(x, self.num_codebooks)[4], 2)
        return {
            **{m: ratio_sum(*_metric_terms(x, self.num_codebooks, m)) for m in METRICS},
            "codebooks": [_div(v, n) for v, n in zip(a_sum, a_cnt)],
            "audio_tokens": float(a_cnt.sum()),
            "text_tokens": float(x[1]),
        }

    def _position_rows(self) -> np.ndarray:
        """The per-position arrays as one ``[4 + 2K, P]`` array in the rows' order (``_rows``)."""
        text = np.stack([self.text_sum, self.text_count, self.pad_sum, self.pad_count])
        return np.concatenate([text, self.audio_sum, self.audio_count])

    def binned(self, bin_frames: int) -> dict[str, Any]:
        """Means per position bin of ``bin_frames`` frames: ``start``/``end`` (frames), every
        one of ``METRICS``, ``codebooks`` ``[8][bins]``, ``files``, ``audio_tokens``,
        ``text_tokens`` (lists)."""
        if bin_frames < 1:
            raise ValueError(f"bin_frames must be >= 1, got {bin_frames}")
        P = self.length
        starts = np.arange(0, P, bin_frames)
        if P == 0:
            empty: list[float] = []
            return {
                k: empty for k in ("start", "end", *METRICS, "files", "audio_tokens", "text_tokens")
            } | {"codebooks": []}

        x = np.add.reduceat(self._position_rows(), starts, axis=-1)
        K = self.num_codebooks
        a_sum, a_cnt = np.split(_rows(x, K)[4], 2)
        return {
            "start": starts.tolist(),
            "end": np.minimum(starts + bin_frames, P).tolist(),
            **{m: np.asarray(ratio_sum(*_metric_terms(x, K, m))).tolist() for m in METRICS},
            "codebooks": _div(a_sum, a_cnt).tolist(),
            "files": self.files[starts].tolist(),
            "audio_tokens": a_cnt.sum(0).tolist(),
            "text_tokens": x[1].tolist(),
        }

    def file_totals(
        self, start: int = 0, end: int | None = None
    ) -> dict[str, dict[str, np.ndarray]]:
        """Per file (order ``file_names``): ``{metric: {"sum", "count"}}`` of the CE (nats) and
        token counts over positions ``[start, end)``, rounded down to ``block_frames`` (exact
        for multiples of it): ``[files]``, or ``[terms, files]`` for ``moshi_loss`` (the
        intervals of ``eval.stats`` take both)."""
        B, K = self.block_frames, self.num_codebooks
        a, b = start // B, None if end is None else end // B
        sums = [blocks[:, a:b].sum(1) for blocks in self.file_blocks]
        out = {}
        for m in METRICS:
            n = 2 if m == MOSHI_LOSS else 1
            terms = [_metric_terms(x, K, m) for x in sums]
            num, den = (np.asarray([t[j] for t in terms], dtype=np.float64).reshape(-1, n).T
                        for j in (0, 1))  # fmt: skip
            out[m] = {"sum": num[0], "count": den[0]} if n == 1 else {"sum": num, "count": den}
        return out

    def file_bins(self, bin_frames: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """``(sums, counts)`` ``[terms, files, bins]`` of ``metric`` per position bin
        (``bin_frames`` rounded down to a multiple of ``block_frames``, at least one block;
        terms: 2 for ``moshi_loss``, else 1)."""
        per = max(1, bin_frames // self.block_frames)
        nb = max((x.shape[1] for x in self.file_blocks), default=0)
        n_bins = -(-nb // per)
        terms = 2 if metric == MOSHI_LOSS else 1
        shape = (terms, len(self.file_blocks), n_bins)
        sums, counts = np.zeros(shape), np.zeros(shape)
        for i, blocks in enumerate(self.file_blocks):
            num, den = _metric_terms(blocks, self.num_codebooks, metric)
            starts = np.arange(0, blocks.shape[1], per)
            sums[:, i, : len(starts)] = np.add.reduceat(num, starts, axis=-1)
            counts[:, i, : len(starts)] = np.add.reduceat(den, starts, axis=-1)
        return sums, counts

    def grouped(self, unit: Callable[[str], str]) -> PositionLosses:
        """The same curve with the per-file data summed into units ``unit(name)`` (e.g.
        several sequences of one source file): intervals then resample whole units. Positions
        and totals are unchanged."""
        out = copy.copy(self)
        out.file_names, out.file_frames, out.file_blocks = [], [], []
        out.file_text, out.file_padding = [], []  # per position data stays with the sequences
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
        K = self.num_codebooks
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
                out.pad_sum, out.pad_count = np.zeros(L), np.zeros(L)
                out.audio_sum, out.audio_count = np.zeros((K, L)), np.zeros((K, L))
            t_sum, t_cnt, p_sum, p_cnt, audio = _rows(pos, K)
            out.text_sum += t_sum
            out.text_count += t_cnt
            out.pad_sum += p_sum
            out.pad_count += p_cnt
            out.audio_sum += audio[:K]
            out.audio_count += audio[K:]
            out.files += 1
            out.file_names.append(name)
            out.file_frames.append(L)
            out.file_blocks.append(kept.copy())
        return out


def _rows(x: np.ndarray, K: int) -> tuple[Any, Any, Any, Any, np.ndarray]:
    """A file's rows (``PositionLosses.file_blocks``, or their sums over blocks): ``(text CE
    sum, text count, the same two on PAD/EPAD targets, the audio rows [2K]: sums then
    counts)``."""
    return x[0], x[1], x[2], x[3], x[4 : 4 + 2 * K]


def _metric_terms(x: np.ndarray, K: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """``(CE sums, token weights)`` ``[terms, ...]`` of ``metric`` from rows ``x`` (``_rows``:
    per position, per block, or summed): one term (``audio_ce``, ``cb0``, ``cb1_7``,
    ``text_ce``), or two for ``moshi_loss``: text with PAD/EPAD weighed
    ``TEXT_PADDING_WEIGHT``, audio with codebook 0 weighed ``FIRST_CODEBOOK_WEIGHT``
    (``token_weights``, the training loss's); ``ratio_sum`` gives the metric."""
    t_sum, t_cnt, p_sum, p_cnt, audio = _rows(x, K)
    a_sum, a_cnt = audio[:K], audio[K:]
    if metric == "audio_ce":
        num, den = a_sum.sum(0), a_cnt.sum(0)
    elif metric == "cb0":
        num, den = a_sum[0], a_cnt[0]
    elif metric == "cb1_7":
        num, den = a_sum[1:].sum(0), a_cnt[1:].sum(0)
    elif metric == "text_ce":
        num, den = t_sum, t_cnt
    elif metric == MOSHI_LOSS:
        off, w0 = 1.0 - TEXT_PADDING_WEIGHT, FIRST_CODEBOOK_WEIGHT
        return (np.stack([t_sum - off * p_sum, w0 * a_sum[0] + a_sum[1:].sum(0)]),
                np.stack([t_cnt - off * p_cnt, w0 * a_cnt[0] + a_cnt[1:].sum(0)]))  # fmt: skip
    else:
        raise ValueError(f"metric {metric!r}: expected one of {METRICS}")
    return np.asarray(num)[None], np.asarray(den)[None]


def ppl(ce: Any) -> Any:
    """Perplexity ``exp(CE)`` of a CE in nats (float or list; NaN stays NaN)."""
    if isinstance(ce, list):
        return [ppl(v) for v in ce]
    return float(np.exp(ce)) if ce is not None and np.isfinite(ce) else float("nan")


def _div(num: Any, den: Any) -> Any:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.divide(num, den, out=np.full_like(num, np.nan), where=den > 0)
    return float(out) if out.ndim == 0 else out


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
    sums, counts = curve.file_bins(bin_frames, metric)  # [terms, files, bins]
    F, n_bins = sums.shape[1:]
    idx = np.random.default_rng(0).integers(0, F, size=(1000, F))
    boot = ratio_sum(sums[:, idx].sum(2), counts[:, idx].sum(2))  # [boot, bins]
    means = ratio_sum(sums, counts)  # [files, bins]
    lo, hi, std = (np.full(n_bins, np.nan) for _ in range(3))
    for j in range(n_bins):  # bins without data stay NaN (no warnings)
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
        "n_files": (counts > 0).any(0).sum(0).tolist(),
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
    ka, kb = [ia[n] for n in common], [ib[n] for n in common]
    return (ta["sum"][..., ka], ta["count"][..., ka]), (tb["sum"][..., kb], tb["count"][..., kb])


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
    > 0: the reference is better; stored with this sign for older readers, printed and
    plotted as reference minus curve, the project's sign convention), token-weighted over
    positions ``>= context`` (``beyond_context``, the headline) and ``< context``
    (``within_context``)."""
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
    for name, d in summary["difference"].items():  # stored: name - primary; printed: flipped
        ci = flip_interval(intervals.get(name, {}).get("beyond_context"))
        extra = ""
        if ci and math.isfinite(ci.get("lo", math.nan)):
            extra = (
                f" [95 % CI {ci['lo']:+.4f}, {ci['hi']:+.4f}; p = {format_p(ci['p_value'])}; "
                f"{ci['n']} files]"
            )
        lines.append(
            f"  {label} beyond the context: {primary} - {name} = "
            f"{-d['beyond_context']:+.4f} nats{extra} (inside: {-d['within_context']:+.4f}) "
            f"({sign_note(primary, name)})"
        )
    if "no_ttt" in summary["difference"] and primary != "no_ttt":
        within = summary["difference"]["no_ttt"]["within_context"]
        ci = intervals.get("no_ttt", {}).get("within_context")
        lines.append(harm_line(within, ci, label))
    return lines


def harm_line(base_minus_memory: float, ci: dict[str, Any] | None, label: str) -> str:
    """ "Inside the window: vs the base" for a memory, from ``base - memory`` inside the
    context (and its interval, also ``base - memory``), printed as memory - base (negative:
    the memory helps), with a warning past ``HARM_TOLERANCE``."""
    harm = -base_minus_memory
    text = f"  {label} inside the window: memory - base (gate 0) = {harm:+.4f} nats"
    if ci and math.isfinite(ci.get("lo", math.nan)):
        text += f" [95 % CI {-ci['hi']:+.4f}, {-ci['lo']:+.4f}; {ci['n']} files]"
    text += " (negative: the memory helps)"
    if harm > HARM_TOLERANCE:
        text += (f"  WARNING: the memory makes the model worse where the attention sees "
                 f"everything (tolerance {HARM_TOLERANCE})")  # fmt: skip
    return text


def sign_note(row: str, reference: str) -> str:
    """The sign of ``row - reference`` in words (the project's convention, docs/evaluation.md
    "Sign convention": row minus base, memory minus no memory; negative: lower loss)."""
    if reference in ("no_ttt", "base", "gate=0"):
        return "negative: the memory helps"
    return f"negative: {row} better"
