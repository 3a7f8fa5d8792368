"""The end-to-end memory's inner loop over a sequence: three forms of one definition.

Steps ``[0, S)`` of a sequence (moshi's delayed columns: step ``t`` reads ``inputs[:, :, t]`` and
predicts ``delayed[:, :, t]``) are cut into chunks of K steps. Chunk ``i = [s, e)`` is scored with
the fast weights ``W_i`` of every ``E2ELayer``; then ``W_i`` takes ``InnerLoop.steps`` SGD steps
(``ttt.e2e.inner_sgd_step``) on that chunk's own next-token loss (its tokens are known once its
steps are past), and ``W_{i+1}`` serves the next chunk. Frames keep the weights they were
computed with: what the attention of a later frame reads of an earlier one is what streaming
computed then (frame ``t`` of chunk ``j`` always used ``W_j``). The inner loss of a sequence is
moshi-finetune's weighting over the chunk: ``sum(w CE)/sum(w)`` for text plus the same for audio
(``token_weights``).

- ``e2e_reference``: the definition, plainly: for every chunk the whole prefix ``[0, e)`` goes
  through ``LMModel.forward_text`` with every frame's weights, the update is a per-sequence loop;
- ``e2e_scan``: the training and evaluation form: the layers below the first memory run once
  over the sequence; each chunk recomputes only the layers from the first memory up, over the
  chunk and the receptive field their attention needs (``R = n_after * (C - 1)`` frames, 0 when
  the memory is in the last layer);
- streaming (``e2e_stream.E2EStreamer``, ``e2e_stream.LiveE2E`` in ``LMGen``): frame by frame,
  on moshi's KV caches; at a chunk's end the update runs through the same function as the
  scan's, from the prime MLP inputs recorded while streaming.

With ``train=True`` the scan keeps the graph through every inner step, so the outer loss
backpropagates into the initial fast weights and the inner learning rates (first order: the
inner gradients are constants; ``second_order``: through them too).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from moshi.models.lm import LMModel, LMOutput, _undelay_sequence
from moshi.modules.streaming import StreamingModule
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..token_weights import (
    FIRST_CODEBOOK_WEIGHT,
    TEXT_PADDING_WEIGHT,
    audio_weights,
    step_ce,
    text_weights,
)
from ..ttt.e2e import inner_sgd_step
from .config import TTTConfig
from .e2e import E2ELayer, Segment, chunk_frames, e2e_layers, fast_copy
from .streaming import delayed_inputs

Weights = list[tuple[torch.Tensor, torch.Tensor]]  # per memory layer: (w_in, w_out), [B, ...]
History = list[tuple[int, int, Weights]]  # (start, end, weights) of every chunk so far


@dataclass(frozen=True)
class InnerLoop:
    """How the fast weights learn (``TTTConfig.e2e_*`` resolved for a model)."""

    chunk: int
    steps: int = 1
    clip: float = 0.0
    decay: float = 0.0
    second_order: bool = False
    first_codebook_weight: float = FIRST_CODEBOOK_WEIGHT
    text_padding_weight: float = TEXT_PADDING_WEIGHT

    def __post_init__(self) -> None:
        if self.chunk < 1:
            raise ValueError(f"e2e_chunk must be >= 1 frame, got {self.chunk}")
        if self.steps < 1:
            raise ValueError(f"e2e_steps must be >= 1, got {self.steps}")

    @classmethod
    def of(cls, lm: LMModel, **overrides: float | int | bool) -> InnerLoop:
        """The loop of a model with ``apply_ttt(kind="e2e")`` (its ``ttt_config``)."""
        cfg = getattr(lm, "ttt_config", None)
        if not isinstance(cfg, TTTConfig) or cfg.kind != "e2e" or not e2e_layers(lm):
            raise ValueError("this model has no end-to-end memory (apply_ttt with kind: e2e)")
        values = {"chunk": chunk_frames(cfg.e2e_chunk, model_context(lm)), "steps": cfg.e2e_steps,
                  "clip": cfg.e2e_clip, "decay": cfg.e2e_decay,
                  "second_order": cfg.e2e_second_order}  # fmt: skip
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]


@dataclass
class ScanResult:
    """What a pass over a batch gives.

    Attributes:
        text_logits: ``[B, 1, S, text_card]``, each chunk scored before its own update.
        audio_logits: ``[B, dep_q, S, card]`` (zeros where a chunk had no audio to score).
        ce: per-step CE ``[B, 1 + dep_q, S]`` (float32, detached; 0 off the scored tokens).
        rollbacks: sequence-chunks whose update was not finite and was rolled back.
        update_seconds: wall time of the inner updates (gradient and step).
        updates: inner steps taken, summed over the sequences (chunks x steps x B).
        weights: the fast weights after the last update.
    """

    text_logits: torch.Tensor
    audio_logits: torch.Tensor
    ce: torch.Tensor
    rollbacks: int = 0
    update_seconds: float = 0.0
    updates: int = 0
    weights: Weights = field(default_factory=list)


def model_context(lm: LMModel) -> int | None:
    """The temporal transformer's attention context in frames (None: unbounded)."""
    return lm.transformer.layers[0].self_attn.context


def receptive_field(lm: LMModel) -> int:
    """Frames before a chunk that its recomputation needs: ``(C - 1)`` per attention layer after
    the first memory layer (the whole past without a context: -1)."""
    layers = e2e_layers(lm)
    after = len(lm.transformer.layers) - 1 - layers[0][0]
    C = model_context(lm)
    if after == 0:
        return 0
    return -1 if C is None else after * (C - 1)


def memory_layers(lm: LMModel) -> list[tuple[int, E2ELayer]]:
    """``e2e_layers(lm)``, refusing a model without the memory or with a position embedding the
    chunk recomputation cannot shift."""
    layers = e2e_layers(lm)
    if not layers:
        raise ValueError("this model has no end-to-end memory (apply_ttt with kind: e2e)")
    if lm.transformer.positional_embedding in ("sin", "sin_rope"):
        raise ValueError("the end-to-end memory needs a rope/none positional embedding (the "
                         "chunk recomputation shifts positions)")  # fmt: skip
    return layers


@contextlib.contextmanager
def not_streaming(modules: nn.Module) -> Iterator[None]:
    """Run ``modules`` as plain (non-streaming) modules for a while: their streaming states
    (moshi's ``_streaming_state``: KV caches, offsets, fast weights) are set aside untouched
    and put back after."""
    saved = [(m, m._streaming_state) for m in modules.modules() if isinstance(m, StreamingModule)]
    for m, _ in saved:
        m._streaming_state = None
    try:
        yield
    finally:
        for m, st in saved:
            m._streaming_state = st


def _segments(history: History, current: tuple[int, int, Weights], a: int, e: int,
              k: int) -> list[Segment]:  # fmt: skip
    """Memory layer ``k``'s weights for frames ``[a, e)``, relative to ``a``."""
    out = []
    for s0, e0, w in [*history, current]:
        lo, hi = max(s0, a), min(e0, e)
        if lo < hi:
            out.append((lo - a, hi - a, w[k]))
    return out


def chunk_logits(lm: LMModel, h: torch.Tensor, a: int, s: int, e: int, history: History,
                 current: Weights, delayed: torch.Tensor,
                 audio: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Logits of steps ``[s, e)`` recomputed from ``h [B, e - a, dim]`` (the first memory
    layer's prime-MLP input at steps ``[a, e)``), chunk ``[s, e)`` with ``current`` weights and
    earlier frames with theirs (``history``): ``(text [B, 1, n, Vt], audio [B, dq, n, V] or
    None)``."""
    layers = dict(e2e_layers(lm))
    first = min(layers)
    cur = (s, e, current)
    order = {idx: k for k, idx in enumerate(sorted(layers))}
    with not_streaming(lm.transformer.layers[first:]):  # a recomputation, not new frames
        x = layers[first](h, fast=_segments(history, cur, a, e, order[first]), layer=False)
        for idx in range(first + 1, len(lm.transformer.layers)):
            layer = lm.transformer.layers[idx]
            if idx in layers:
                x = layer(x, fast=_segments(history, cur, a, e, order[idx]))
            else:
                x = layer(x)
    out = x[:, s - a :]
    if lm.out_norm is not None:
        out = lm.out_norm(out)
    text = lm.text_linear(out)[:, None]
    if not audio:
        return text, None
    return text, lm.forward_depformer_training(delayed[:, :, s:e], out)


def chunk_ce(lm: LMModel, text: torch.Tensor, audio: torch.Tensor | None, delayed: torch.Tensor,
             s: int, e: int) -> torch.Tensor:  # fmt: skip
    """Per-step CE ``[B, 1 + dq, e - s]`` (0 off the scored tokens)."""
    a0, dq = lm.audio_offset, lm.dep_q
    t = step_ce(text[:, 0], delayed[:, 0, s:e])
    if audio is None:
        au = torch.zeros(t.shape[0], dq, t.shape[1], device=t.device)
    else:
        au = step_ce(audio, delayed[:, a0 : a0 + dq, s:e])
    return torch.cat([t[:, None], au], dim=1)


def inner_loss(lm: LMModel, ce: torch.Tensor, delayed: torch.Tensor, s: int, e: int,
               loop: InnerLoop) -> torch.Tensor:  # fmt: skip
    """Per-sequence inner loss ``[B]`` of a chunk from its CE ``[B, 1 + dq, n]``."""
    a0, dq = lm.audio_offset, lm.dep_q
    tt, ta = delayed[:, :1, s:e], delayed[:, a0 : a0 + dq, s:e]
    wt = text_weights(tt, (tt >= 0) & (tt < lm.text_card), loop.text_padding_weight)
    wa = audio_weights((ta >= 0) & (ta < lm.card), loop.first_codebook_weight)
    text = (wt * ce[:, :1]).sum((1, 2)) / wt.sum((1, 2)).clamp_min(1e-9)
    audio = (wa * ce[:, 1:]).sum((1, 2)) / wa.sum((1, 2)).clamp_min(1e-9)
    return text + audio


def has_audio(lm: LMModel, delayed: torch.Tensor, s: int, e: int) -> bool:
    ta = delayed[:, lm.audio_offset : lm.audio_offset + lm.dep_q, s:e]
    return bool(((ta >= 0) & (ta < lm.card)).any())


def initial_weights(lm: LMModel, batch: int, train: bool) -> Weights:
    """Every memory layer's initial fast weights for ``batch`` sequences (the parameters:
    graph-connected when ``train``, else detached copies in float32 at least, so that small
    updates are not lost to a bf16 model's rounding)."""
    out = []
    for _, layer in e2e_layers(lm):
        w_in, w_out = layer.e2e.initial()
        if train:
            out.append((w_in.expand(batch, -1, -1), w_out.expand(batch, -1, -1)))
        else:
            out.append(tuple(fast_copy(w, batch) for w in (w_in, w_out)))  # type: ignore[arg-type]
    return out


def update(lm: LMModel, h: torch.Tensor, a: int, s: int, e: int, history: History,
           weights: Weights, delayed: torch.Tensor, loop: InnerLoop, train: bool,
           init: Weights, grads_log: GradLog | None = None,
           scored: torch.Tensor | None = None) -> tuple[Weights, torch.Tensor, int]:  # fmt: skip
    """``loop.steps`` inner steps on chunk ``[s, e)``: ``(new weights, ok [B], rollbacks)``.

    ``grads_log``: a ``GradLog`` that records every inner gradient, or replays recorded ones
    instead of computing them (tests: the first-order meta-gradient is the gradient of the
    outer loss with the inner gradients held fixed). ``scored``: the chunk's CE already
    computed from ``weights`` (with a graph to them): the first step's forward is not redone."""
    audio = has_audio(lm, delayed, s, e)
    lrs = [m.e2e.lr() for _, m in e2e_layers(lm)]
    ok_all = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
    for step in range(loop.steps):
        with torch.enable_grad():
            flat = [w for pair in weights for w in pair]
            if step == 0 and scored is not None:
                ce = scored
            else:
                if not train:
                    flat = [w.detach().requires_grad_(True) for w in flat]
                    weights = [(flat[2 * k], flat[2 * k + 1]) for k in range(len(weights))]
                text, au = chunk_logits(lm, h, a, s, e, history, weights, delayed, audio)
                ce = chunk_ce(lm, text, au, delayed, s, e)
            loss = inner_loss(lm, ce, delayed, s, e, loop)
            finite = torch.isfinite(loss)
            grads = torch.autograd.grad(
                torch.where(finite, loss, 0.0).sum(), flat, allow_unused=True,
                create_graph=train and loop.second_order, retain_graph=train,
            )  # fmt: skip
            grads = [
                None
                if g is None
                else torch.where(finite.view((-1,) + (1,) * (g.dim() - 1)), g, float("nan"))
                for g in grads
            ]
            if grads_log is not None:
                grads = grads_log.apply(grads)
            flat_init = [w for pair in init for w in pair]
            lr_list = [lr if train else lr.detach() for lr in lrs for _ in range(2)]
            new, ok = inner_sgd_step(flat, grads, flat_init, lr_list, clip=loop.clip,
                                     decay=loop.decay)  # fmt: skip
        if not train:
            new = [w.detach() for w in new]
        weights = [(new[2 * k], new[2 * k + 1]) for k in range(len(weights))]
        ok_all = ok_all & ok
    return weights, ok_all, int((~ok_all).sum())


@dataclass
class GradLog:
    """Inner gradients in order: recorded (``replay=False``) or handed back (``replay=True``)."""

    grads: list[list[torch.Tensor | None]] = field(default_factory=list)
    replay: bool = False
    position: int = 0

    def apply(self, grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        if not self.replay:
            self.grads.append([None if g is None else g.detach().clone() for g in grads])
            return grads
        self.position += 1
        return self.grads[self.position - 1]


class _Stop(Exception):
    """Raised by the trunk's hook once the first memory layer's input is captured."""


def trunk(lm: LMModel, inputs: torch.Tensor) -> torch.Tensor:
    """The first memory layer's prime-MLP input ``[B, S, dim]`` for ``inputs [B, 17, S]``
    (under ``no_grad``: the base is frozen): the model's own embeddings (its forward, stopped
    as the transformer starts), then the layers up to the first memory layer, each called as a
    module (so FSDP2 gathers each unit whole and none is left half run)."""
    first, _ = e2e_layers(lm)[0]
    captured: list[torch.Tensor] = []

    def grab(module: nn.Module, args: tuple) -> None:
        captured.append(args[0])
        raise _Stop

    handle = lm.transformer.register_forward_pre_hook(grab)
    try:
        with torch.no_grad(), contextlib.suppress(_Stop):
            lm.forward_text(inputs)
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError("the model's forward did not reach its transformer")
    x = captured[0]
    layers = lm.transformer.layers
    with torch.no_grad():
        for i in range(first):
            x = layers[i](x)
        return layers[first](x, prime=False)


def e2e_scan(lm: LMModel, inputs: torch.Tensor, delayed: torch.Tensor, loop: InnerLoop,
             train: bool = False, grads_log: GradLog | None = None) -> ScanResult:  # fmt: skip
    """The scan of the module docstring over ``inputs, delayed [B, 17, S]`` (``train`` under
    ``no_grad`` is the evaluation: nothing to backpropagate into)."""
    memory_layers(lm)
    train = train and torch.is_grad_enabled()
    if train and loop.second_order:  # fused attention kernels have no double backward
        with sdpa_kernel([SDPBackend.MATH]):
            return _scan(lm, inputs, delayed, loop, train, grads_log)
    return _scan(lm, inputs, delayed, loop, train, grads_log)


def _scan(lm: LMModel, inputs: torch.Tensor, delayed: torch.Tensor, loop: InnerLoop,
          train: bool, grads_log: GradLog | None) -> ScanResult:  # fmt: skip
    B, _, S = inputs.shape
    h = trunk(lm, inputs)
    R = receptive_field(lm)
    init = initial_weights(lm, B, train)
    weights, history = init, []
    previous: Weights | None = None
    texts, audios, ces = [], [], []
    rollbacks, updates, seconds = 0, 0, 0.0
    need_audio = has_audio(lm, delayed, 0, S) or train
    for s in range(0, S, loop.chunk):
        e = min(S, s + loop.chunk)
        a = 0 if R < 0 else max(0, s - R)
        last = e >= S  # no update after the last chunk
        # One forward scores the chunk and, with a graph to the weights, gives the first inner
        # gradient (evaluation: to leaf copies of the weights, dropped after the update).
        start = time.perf_counter()
        with torch.set_grad_enabled(train or not last):
            if not train and not last:
                weights = [(wi.detach().requires_grad_(True), wo.detach().requires_grad_(True))
                           for wi, wo in weights]  # fmt: skip
            text, au = chunk_logits(lm, h[:, a:e], a, s, e, history, weights, delayed,
                                    need_audio)  # fmt: skip
            ce = chunk_ce(lm, text, au, delayed, s, e)
            bad = ~torch.isfinite(ce.detach()).reshape(B, -1).all(1)
            if bool(bad.any()) and previous is not None:  # the last update broke these rows
                rollbacks += int(bad.sum())
                weights = [tuple(torch.where(bad.view(-1, 1, 1), p, w) for p, w in zip(pw, ww))
                           for pw, ww in zip(previous, weights)]  # type: ignore[misc]  # fmt: skip
                text, au = chunk_logits(lm, h[:, a:e], a, s, e, history, weights, delayed,
                                        need_audio)  # fmt: skip
                ce = chunk_ce(lm, text, au, delayed, s, e)
        keep = (lambda t: t) if train else (lambda t: t.detach())  # noqa: E731
        texts.append(keep(text))
        audios.append(keep(au) if au is not None
                      else text.new_zeros(B, lm.dep_q, e - s, lm.card))  # fmt: skip
        ces.append(ce.detach())
        if not last:
            new, _, n_bad = update(lm, h[:, a:e], a, s, e, history, weights, delayed, loop,
                                   train, init, grads_log, scored=ce)  # fmt: skip
            seconds += time.perf_counter() - start
            rollbacks += n_bad
            updates += loop.steps * B
            history.append((s, e, weights if train else
                            [(wi.detach(), wo.detach()) for wi, wo in weights]))  # fmt: skip
            if R >= 0:  # forget what no later chunk's receptive field reaches
                history = [c for c in history if c[1] > e - R]
            previous, weights = weights, new
    return ScanResult(torch.cat(texts, 2), torch.cat(audios, 2), torch.cat(ces, 2), rollbacks,
                      seconds, updates, weights)  # fmt: skip


def e2e_forward(lm: LMModel, codes: torch.Tensor, loop: InnerLoop | None = None,
                train: bool = True) -> tuple[LMOutput, ScanResult]:  # fmt: skip
    """``LMModel.forward(codes)`` for a model with an end-to-end memory: the same ``LMOutput``
    (logits aligned with ``codes [B, 17, T]``, NaN and False off the scored positions), every
    chunk scored before its own update. ``train``: keep the graph through the inner loop (the
    memory's parameters get the outer gradient; the base must be frozen).

    The scan runs *as* the model's forward (``lm(codes)`` with the scan in place of
    ``LMModel.forward`` for the call), so whatever wraps the model's call (FSDP2's gathering of
    the parameters, its gradient hooks) wraps the scan too."""
    loop = loop or InnerLoop.of(lm)
    if train and torch.is_grad_enabled():
        memory = {id(p) for _, m in e2e_layers(lm) for p in m.e2e.parameters()}
        trained = [n for n, p in lm.named_parameters() if p.requires_grad and id(p) not in memory]
        if trained:
            raise ValueError(
                f"the end-to-end memory is meta-trained on a frozen base, but {len(trained)} "
                f"base parameters are trained (e.g. {trained[0]}); set model.train_base: false "
                "and lora.enable: false")  # fmt: skip
    found: list[ScanResult] = []

    def scan_forward(codes: torch.Tensor) -> LMOutput:
        out, res = _scan_output(lm, codes, loop, train)
        found.append(res)
        return out

    lm.forward = scan_forward  # type: ignore[method-assign]  # for this call only
    try:
        out = lm(codes)
    finally:
        del lm.forward
    return out, found[0]


def _scan_output(lm: LMModel, codes: torch.Tensor, loop: InnerLoop,
                 train: bool) -> tuple[LMOutput, ScanResult]:  # fmt: skip
    inputs, delayed = delayed_inputs(lm, codes)
    res = e2e_scan(lm, inputs, delayed, loop, train=train)
    dq, a0 = lm.dep_q, lm.audio_offset
    logits, mask = _undelay_sequence(lm.delays[a0 : a0 + dq], res.audio_logits,
                                     fill_value=float("nan"))  # fmt: skip
    mask &= codes[:, a0 : a0 + dq] != lm.zero_token_id
    text, text_mask = _undelay_sequence(lm.delays[:1], res.text_logits, fill_value=float("nan"))
    text_mask &= codes[:, :1] != lm.zero_token_id
    return LMOutput(logits, mask, text, text_mask), res


# -- the definition -------------------------------------------------------------------------
def e2e_reference(lm: LMModel, inputs: torch.Tensor, delayed: torch.Tensor,
                  loop: InnerLoop) -> tuple[torch.Tensor, Weights]:  # fmt: skip
    """Per-step CE ``[B, 1 + dq, S]`` and final weights by the plain definition (module
    docstring): every chunk recomputes the whole prefix through ``forward_text``, the inner loss
    and the SGD rule are written out per sequence. Slow; for tests."""
    layers = [m for _, m in memory_layers(lm)]
    B, _, S = inputs.shape
    a0, dq = lm.audio_offset, lm.dep_q
    weights: Weights = initial_weights(lm, B, train=False)
    init = [(wi.clone(), wo.clone()) for wi, wo in weights]
    history: History = []
    ces = []

    def forward(ws: Weights, e: int, s: int) -> torch.Tensor:
        hooks = [m.e2e.register_forward_pre_hook(
            lambda mod, args, kw, k=k: (args, {**kw, "fast": _segments(history, (s, e, ws), 0,
                                                                       e, k)}),
            with_kwargs=True) for k, m in enumerate(layers)]  # fmt: skip
        try:
            out, text = lm.forward_text(inputs[:, :, :e])
            audio = lm.forward_depformer_training(delayed[:, :, :e], out)
        finally:
            for hk in hooks:
                hk.remove()
        rows = [
            step_ce(text[:, 0, s:e], delayed[:, 0, s:e])[:, None],
            step_ce(audio[:, :, s:e], delayed[:, a0 : a0 + dq, s:e]),
        ]
        return torch.cat(rows, 1)

    for s in range(0, S, loop.chunk):
        e = min(S, s + loop.chunk)
        with torch.no_grad():
            ces.append(forward(weights, e, s))
        if e >= S:
            break
        new = weights
        for _ in range(loop.steps):
            flat = [w.detach().requires_grad_(True) for pair in new for w in pair]
            ws = [(flat[2 * k], flat[2 * k + 1]) for k in range(len(layers))]
            ce = forward(ws, e, s)
            grads = []
            for b in range(B):  # one sequence at a time, its own loss
                loss = 0.0
                tt = delayed[b, 0, s:e]
                wt = torch.where((tt == 3) | (tt == 0), loop.text_padding_weight, 1.0)
                wt = wt * ((tt >= 0) & (tt < lm.text_card))
                if wt.sum() > 0:
                    loss = loss + (wt * ce[b, 0]).sum() / wt.sum()
                ta = delayed[b, a0 : a0 + dq, s:e]
                wa = ((ta >= 0) & (ta < lm.card)).float()
                wa[0] *= loop.first_codebook_weight
                if wa.sum() > 0:
                    loss = loss + (wa * ce[b, 1:]).sum() / wa.sum()
                g = torch.autograd.grad(loss, flat, retain_graph=True, allow_unused=True)
                grads.append([torch.zeros_like(f[b]) if gi is None else gi[b]
                              for f, gi in zip(flat, g)])  # fmt: skip
            stepped = []
            for b in range(B):
                norm = torch.sqrt(sum((g**2).sum() for g in grads[b]))
                scale = min(1.0, loop.clip / (float(norm) + 1e-6)) if loop.clip > 0 else 1.0
                row = []
                for k, (f, g) in enumerate(zip(flat, grads[b])):
                    lr = float(layers[k // 2].e2e.lr().detach())
                    w = f[b].detach() - lr * scale * g
                    w0 = init[k // 2][k % 2][b]
                    row.append(w + loop.decay * (w0 - w))
                stepped.append(row)
            new = [(torch.stack([stepped[b][2 * k] for b in range(B)]),
                    torch.stack([stepped[b][2 * k + 1] for b in range(B)]))
                   for k in range(len(layers))]  # fmt: skip
        history.append((s, e, weights))
        weights = new
    return torch.cat(ces, 2), weights
