"""Scoring a file in chunks: the per-position losses of one model (and its controls) on one
file, never the logits of the file.

Definition (the same CE and masks as ``LMModel.forward`` + ``train.loss``): for codes
``[17, T]``, the text CE at frame t and the CE of each of Moshi's 8 codebooks at frame t, in
nats, scored iff the target is not -1 and not lost to its stream's delay (acoustic codebooks
lag one frame: their last frame is never predicted). **Unweighted**: no x100 on codebook 0,
no 0.5 on text padding (``FileLosses.text_padding`` marks the text targets that moshi's loss
weighs 0.5, so that ``statistics`` can form it). The user stream is never scored.

How (``stream_losses``): the file's codes are put in moshi's delay pattern once; the temporal
transformer reads the delayed columns chunk by chunk in moshi streaming mode (attention KV
caches widened to ``context + chunk - 1``, TTT state carried), and the depformer runs
teacher-forced on each chunk; per-chunk CE is kept. This equals token-by-token streaming
(``chunk_frames=1``) and, where the parallel forward is defined the same way,
``LMModel.forward`` (tests check both). ``Variant``: one way to run the model on the file
(full memory, reset every N frames, gates 0, a shorter attention window, foreign history).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from moshi.models.lm import LMModel
from moshi.modules.transformer import set_attention_context
from moshi.utils.compile import no_compile

from ...integration.apply import set_gates, ttt_modules
from ...integration.e2e_scan import InnerLoop, e2e_scan
from ...integration.recall import RecallMemory, mix_file
from ...integration.streaming import chunked_streaming, delayed_inputs, reset_ttt_states
from ...models.lora import lora_modules
from ...token_weights import is_text_padding, step_ce


@dataclass
class FileLosses:
    """Per-position CE of one file, nats, float32 on CPU; position = frame of the target."""

    text: torch.Tensor  # [T]
    text_mask: torch.Tensor  # [T] bool: scored
    audio: torch.Tensor  # [8, T]
    audio_mask: torch.Tensor  # [8, T] bool
    text_padding: torch.Tensor | None = None  # [T] bool: the text target is PAD/EPAD (None: none)


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
    hidden: list[torch.Tensor] | None = None,
) -> FileLosses:
    """Per-position text and per-codebook CE of one file ``codes [17, T]`` (module docstring).

    ``chunk_frames``: frames per streaming call (1 = token-by-token streaming, the definition).
    ``reset_every``: restart the TTT states (only them) before every multiple of that many
    frames. ``observer.chunk(start, end)`` is called after each piece of delayed columns.
    ``hidden``: a list that receives each piece's final hidden states (the text head's input,
    ``[chunk, dim]`` per step of the delayed columns, on the CPU).
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
            if hidden is not None:
                hidden.append(out[0].float().cpu())
            logits = lm.forward_depformer_training(delayed[:, :, a:b], out)  # [1, dq, C, card]
            text_ce[a:b] = step_ce(text_logits[0, 0], delayed[0, 0, a:b])
            audio_ce[:, a:b] = step_ce(logits[0], delayed[0, a0 : a0 + dq, a:b])
            if observer is not None:
                observer.chunk(a, b)
    return undelay_losses(lm, torch.cat([text_ce[None], audio_ce]).cpu(), codes[0].cpu())


@dataclass
class E2EStats:
    """Counts over the files of an evaluation: inner updates, their wall time, rollbacks."""

    updates: int = 0
    update_seconds: float = 0.0
    rollbacks: int = 0

    def ms_per_update(self) -> float:
        return 1000 * self.update_seconds / self.updates if self.updates else float("nan")


def e2e_losses(lm: LMModel, codes: torch.Tensor, loop: InnerLoop | None = None,
               stats: E2EStats | None = None) -> FileLosses:  # fmt: skip
    """Per-position losses of one file ``codes [17, T]`` under the end-to-end memory."""
    check_codes(lm, codes)
    if lm.training:
        raise ValueError("evaluation needs the model in eval mode (lm.eval())")
    loop = loop or InnerLoop.of(lm)
    device = next(lm.parameters()).device
    codes = codes.to(device=device, dtype=torch.long)[None]
    inputs, delayed = delayed_inputs(lm, codes)
    eager = no_compile() if device.type == "cpu" else contextlib.nullcontext()
    with eager, torch.no_grad():
        res = e2e_scan(lm, inputs, delayed, loop, train=False)
    if stats is not None:
        stats.updates += res.updates
        stats.update_seconds += res.update_seconds
        stats.rollbacks += res.rollbacks
    ce = res.ce[0].cpu()
    memory = getattr(lm, "recall", None)
    if isinstance(memory, RecallMemory):  # mixed in as it is while streaming
        ce[0] = _recall_mixed(lm, memory, codes[0].cpu(), ce[0])
    return undelay_losses(lm, ce, codes[0].cpu())


def record_inputs(into: list[torch.Tensor]) -> Any:
    """A forward pre-hook appending the first batch row of a module's input (``[T, dim]``,
    float32, CPU) to ``into``."""

    def hook(_module: torch.nn.Module, args: tuple) -> None:
        into.append(args[0][0].float().cpu())

    return hook


def _recall_mixed(lm: LMModel, memory: RecallMemory, codes: torch.Tensor,
                  text_ce: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The end-to-end scan's text CE per step ``[S]`` with the recall memory mixed in: the
    memory's keys are the base's (the end-to-end memory's output forced to 0: its prime MLPs
    sit after the layers the keys come from), read from one streamed pass."""
    hidden: list[torch.Tensor] = []
    inputs: list[torch.Tensor] = []
    hook = lm.transformer.register_forward_pre_hook(record_inputs(inputs))
    set_gates(lm, 0.0)
    try:
        stream_losses(lm, codes, chunk_frames=250, hidden=hidden)
    finally:
        set_gates(lm, None)
        hook.remove()
    _, delayed = delayed_inputs(lm, codes[None].long())
    target = delayed[0, 0].cpu()
    write = (target >= 0) & (target < lm.text_card)
    return mix_file(memory, torch.cat(hidden), torch.cat(inputs), target, write, text_ce)


def undelay_losses(lm: LMModel, per_step: torch.Tensor, codes: torch.Tensor) -> FileLosses:
    """Per-step CE ``[1 + dep_q, T]`` (text, then the scored audio codebooks) -> per-frame
    ``FileLosses``: step s of a stream with delay d predicts frame s - d of ``codes [17, T]``;
    frames whose target is -1 are not scored."""
    T, a0, dq = codes.shape[-1], lm.audio_offset, lm.dep_q
    rows = [0, *range(a0, a0 + dq)]
    target = codes[rows]
    ce = torch.zeros_like(per_step)
    mask = torch.zeros_like(per_step, dtype=torch.bool)
    for i, row in enumerate(rows):
        d = min(int(lm.delays[row]), T)
        ce[i, : T - d] = per_step[i, d:]
        mask[i, : T - d] = target[i, : T - d] != -1
    ce = torch.where(mask, ce, 0.0)
    return FileLosses(ce[0], mask[0], ce[1:], mask[1:], is_text_padding(target[0]) & mask[0])


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
