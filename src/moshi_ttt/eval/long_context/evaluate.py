"""Evaluating a model over files: every variant scored on every file (``evaluate_variants``),
sums and intervals gathered into one ``LongContextResult``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence

import torch
from moshi.models.lm import LMModel

from ...integration.apply import set_gates, ttt_modules
from ...integration.e2e import e2e_layers
from .scoring import (
    ChunkObserver,
    Variant,
    _clock,
    attention_context,
    attention_window,
    check_codes,
    e2e_losses,
    is_gate_zero_base,
    long_context_variants,
    measure_speedup,
    splice_history,
    stream_losses,
)
from .statistics import AUTO, LongContextResult, PositionLosses, check_metric


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
    e2e = bool(e2e_layers(lm))  # the end-to-end memory learns by its scan (``e2e_losses``)
    resets = [k for k, v in variants.items() if v.reset_every]
    if e2e and resets:
        raise ValueError(f"variants {resets}: the end-to-end memory has no reset control "
                         "(its fast weights start over with every file); use --controls "
                         "no_ttt")  # fmt: skip
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
            if e2e and spec.gate != 0:
                losses = e2e_losses(lm, codes)
            else:
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
    curves of the report (``"auto"``: ``auto_equal_length``; ``()``: none). An end-to-end
    memory has no ``reset`` control (its fast weights start over with every file): it is left
    out. See ``evaluate_variants`` for the rest."""
    if e2e_layers(lm):
        controls = [c for c in controls if c != "reset"]
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
