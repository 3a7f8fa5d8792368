"""Log-likelihood of audio files under Moshi: audio -> Mimi codes -> ``LMModel.forward``.

Each file is read as mono, resampled to Mimi's 24 kHz (ZeroSpeech is 16 kHz) and encoded once
(``CodeCache``). Its ``T`` frames (80 ms each) of ``S = lm.n_q // 2`` codebooks are placed in
``codes [B, 17, T]`` on one stream, the other rows filled as ``ScoringConfig`` says, and one
batched, right-padded teacher-forced forward under ``no_grad`` gives, per file and codebook
``k``, ``sum_t log p(c_{k,t} | past)`` (nats) over the tokens that ``LMOutput.mask`` scores
(not -1, not lost to the codebook's delay). The last ``delay`` frames are dropped per file, so a
score does not depend on what else is in the batch (causal model, padding after the end).
The text row holds -1 (fill ``zero``), PAD 3 (``pad``) or the model's own greedy text
(``greedy``, Inner Monologue: ``greedy_text``, a first causal streaming pass); the text tokens'
log-likelihood is computed too (``Score.text_ll``), for score ``text+audio``.

A file that is missing, unreadable or shorter than one frame is never fatal: it is reported in
the second result of ``score_audio`` with the reason.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from .. import schema
from ..format import TEXT_PAD, ZERO_TOKEN
from ..generate import read_wav
from ..integration.streaming import delayed_inputs

CodeCache = dict[str, "torch.Tensor | str"]
"""Mimi codes per audio path (``[S, T]`` int16 on CPU), or why the file could not be used."""

STREAMS = ("moshi", "user")
FILLS = ("zero", "silence")
TEXT_FILLS = ("zero", "pad", "greedy")
REDUCTIONS = ("mean", "sum")
SCORED = ("audio", "text+audio")


@dataclass(frozen=True)
class ScoringConfig:
    """How audio is presented to Moshi and scored.

    - ``stream``: ``"moshi"`` puts the audio in Moshi's own stream (rows 1-8, scored by the
      depformer); ``"user"`` in the user stream (rows 9-16), which only a model whose depformer
      predicts that stream too (``dep_q == n_q``) can score.
    - ``other_stream``: ``"zero"`` (-1, the zero embedding) or ``"silence"`` (Mimi codes of
      digital silence as long as the audio).
    - ``text``: the text fill: ``"zero"`` (-1, no text token), ``"pad"`` (text PAD 3 on every
      frame of the audio) or ``"greedy"`` (Inner Monologue: the model's own greedy text, fed
      back causally frame by frame in a first streaming pass, ``greedy_text``).
    - ``codebooks``: the codebooks of the audio stream in the score (0 = semantic).
    - ``score``: ``"audio"`` (the audio tokens of ``codebooks``) or ``"text+audio"`` (plus the
      log-likelihood of the text tokens that fill the text stream: log p(audio, text), the
      joint of the audio with that text; meaningless, so refused, with ``text="zero"``).
    """

    stream: Literal[STREAMS] = "moshi"
    other_stream: Literal[FILLS] = "zero"
    text: Literal[TEXT_FILLS] = "zero"
    codebooks: tuple[int, ...] = (0,)
    score: Literal[SCORED] = "audio"

    def __post_init__(self) -> None:
        schema.validate(self)

    def rules(self) -> None:
        """The text fill must put text to score; codebooks distinct, sorted (``schema``)."""
        if self.score == "text+audio" and self.text == "zero":
            raise ValueError(
                "score: 'text+audio' needs text tokens to score, but text fill 'zero' puts none "
                "(-1 is the zero embedding, never scored): use text fill 'pad' or 'greedy', or "
                "score 'audio'"
            )
        cbs = self.codebooks
        if not cbs or min(cbs) < 0 or len(set(cbs)) < len(cbs):
            raise ValueError(f"codebooks: expected distinct non-negative ints, got {cbs!r}")
        object.__setattr__(self, "codebooks", tuple(sorted(cbs)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def forward_key(self) -> tuple[str, str, str]:
        """What the forward pass depends on (stream, other stream, text fill): configs with the
        same key share one pass (codebooks, score and reduction are read out of it)."""
        return (self.stream, self.other_stream, self.text)


def parse_codebooks(text: str, num_codebooks: int = 8) -> tuple[int, ...]:
    """``"0"``, ``"0,2,5"``, ``"0-7"`` or ``"all"`` -> sorted codebook indices."""
    text = text.strip().lower()
    if text == "all":
        return tuple(range(num_codebooks))
    out: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ValueError(f"codebooks {text!r}: expected e.g. 0, 0-7, 0,1,2 or all") from None
    if not out or max(out) >= num_codebooks:
        raise ValueError(f"codebooks {text!r}: expected indices in 0..{num_codebooks - 1}")
    return tuple(sorted(out))


def codebooks_label(codebooks: Sequence[int]) -> str:
    """``(0,)`` -> ``"0"``, ``(0, ..., 7)`` -> ``"0-7"``, else comma separated."""
    cbs = sorted(codebooks)
    if len(cbs) > 1 and cbs == list(range(cbs[0], cbs[-1] + 1)):
        return f"{cbs[0]}-{cbs[-1]}"
    return ",".join(map(str, cbs))


@dataclass(frozen=True, eq=False)
class Score:
    """Log-likelihood of one file: ``ll[k]`` = sum of log p (nats) over the ``n[k]`` scored
    tokens of codebook ``k`` of the audio stream (``[S]`` each); ``frames`` = T;
    ``text_ll`` / ``text_n``: the same for the text tokens that filled the text stream (0 and
    0 with text fill ``zero``); ``text``: those tokens (empty with ``zero``)."""

    frames: int
    ll: np.ndarray = field(repr=False)
    n: np.ndarray = field(repr=False)
    text_ll: float = 0.0
    text_n: int = 0
    text: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)

    def total(self, codebooks: Sequence[int], text: bool = False) -> tuple[float, int]:
        """(sum of log p, token count) over ``codebooks`` (and the text tokens if ``text``)."""
        idx = list(codebooks)
        s, n = float(self.ll[idx].sum()), int(self.n[idx].sum())
        return (s + self.text_ll, n + self.text_n) if text else (s, n)

    def value(self, reduction: str, codebooks: Sequence[int], text: bool = False) -> float:
        """``"sum"``: total log p; ``"mean"``: per scored token (NaN with no token); ``text``:
        the text tokens count too (``score="text+audio"``)."""
        s, n = self.total(codebooks, text)
        if reduction == "sum":
            return s
        if reduction == "mean":
            return s / n if n else float("nan")
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def stream_size(lm: Any) -> int:
    """Codebooks per audio stream (8 for Moshi: ``n_q`` 16 = Moshi's 8 + the user's 8)."""
    return int(lm.n_q) // 2


def check_config(lm: Any, config: ScoringConfig) -> None:
    """``ValueError`` if ``lm`` cannot score audio as ``config`` asks."""
    size = stream_size(lm)
    if max(config.codebooks) >= size:
        raise ValueError(
            f"codebooks: expected indices in 0..{size - 1} (a stream of this model has {size} "
            f"codebooks), got {config.codebooks}"
        )
    if config.stream == "user" and int(lm.dep_q) < 2 * size:
        raise ValueError(
            f"stream: 'user' needs a model whose depformer also predicts the user stream "
            f"(dep_q = {2 * size}); this one has dep_q = {lm.dep_q} and predicts only Moshi's "
            "stream, so user-stream audio has no likelihood: use stream 'moshi'"
        )


# -- encoding ---------------------------------------------------------------------------------
@torch.no_grad()
def encode_files(
    mimi: Any,
    paths: Iterable[str | Path],
    num_codebooks: int,
    cache: CodeCache | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> CodeCache:
    """Mimi codes ``[num_codebooks, T]`` of each file not yet in ``cache`` (added to it and
    returned). T = ceil(samples / 1920) at 24 kHz; files of similar size are encoded together
    (right zero padding; Mimi is causal, so the codes equal a one-file encode). Missing,
    unreadable or shorter-than-one-frame files get a reason string instead."""
    cache = {} if cache is None else cache
    todo = sorted({str(p) for p in paths} - cache.keys(), key=_file_size)
    rate, frame = int(mimi.sample_rate), int(mimi.frame_size)
    device = next(mimi.parameters()).device
    bar = _progress(len(todo), "encode", progress)
    for start in range(0, len(todo), max(1, batch_size)):
        chunk = todo[start : start + max(1, batch_size)]
        audio: dict[str, np.ndarray] = {}
        for path in chunk:
            try:
                x = read_wav(path, rate)
            except FileNotFoundError:
                cache[path] = "missing"
                continue
            except Exception as e:  # any decoder failure: count it, never crash
                cache[path] = f"unreadable: {e}"
                continue
            if len(x) < frame:
                ms = 1000 * len(x) / rate
                cache[path] = f"shorter than one frame ({ms:.0f} ms < {1000 * frame / rate:.0f} ms)"
                continue
            audio[path] = x
        if audio:
            frames = {p: -(-len(x) // frame) for p, x in audio.items()}
            batch = torch.zeros(len(audio), 1, max(frames.values()) * frame)
            for i, x in enumerate(audio.values()):
                batch[i, 0, : len(x)] = torch.from_numpy(x)
            codes = mimi.encode(batch.to(device)).cpu()
            if codes.shape[1] < num_codebooks:
                raise ValueError(f"Mimi gives {codes.shape[1]} codebooks, need {num_codebooks}")
            for i, path in enumerate(audio):
                cache[path] = codes[i, :num_codebooks, : frames[path]].to(torch.int16).clone()
        bar.update(len(chunk))
    bar.close()
    return cache


class _Silence:
    """Mimi codes of digital silence, ``[S, T]`` for any T (prefixes of one encode: causal)."""

    def __init__(self, mimi: Any, num_codebooks: int) -> None:
        self.mimi, self.k, self.codes = mimi, num_codebooks, torch.zeros(num_codebooks, 0)

    @torch.no_grad()
    def __call__(self, frames: int) -> torch.Tensor:
        if self.codes.shape[-1] < frames:
            n = max(frames, 2 * self.codes.shape[-1], 64)
            device = next(self.mimi.parameters()).device
            pcm = torch.zeros(1, 1, n * int(self.mimi.frame_size), device=device)
            self.codes = self.mimi.encode(pcm)[0, : self.k].cpu().long()
        return self.codes[:, :frames]


# -- scoring ----------------------------------------------------------------------------------
def build_codes(
    lm: Any,
    items: Sequence[torch.Tensor],
    config: ScoringConfig,
    silence: Any = None,
    texts: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """``codes [B, 17, T_max]`` (int64, CPU) of items ``[S, T_i]``: the audio on the configured
    stream, the other stream and the text filled per ``config``, -1 after each item's end.
    Text fill ``greedy`` needs ``texts`` (``[T_i]`` per item, from ``greedy_text``)."""
    size, off = stream_size(lm), int(lm.audio_offset)
    audio_row = off + (size if config.stream == "user" else 0)
    other_row = off + (0 if config.stream == "user" else size)
    if config.text == "greedy" and (texts is None or len(texts) != len(items)):
        raise ValueError("text fill 'greedy' needs the greedy text of every item (greedy_text)")
    T = max(x.shape[-1] for x in items)
    codes = torch.full((len(items), int(lm.num_codebooks), T), ZERO_TOKEN)
    for i, x in enumerate(items):
        t = x.shape[-1]
        codes[i, audio_row : audio_row + size, :t] = x.long()
        if config.other_stream == "silence":
            codes[i, other_row : other_row + size, :t] = silence(t)
        if config.text == "pad":
            codes[i, 0, :t] = TEXT_PAD
        elif config.text == "greedy":
            codes[i, 0, :t] = texts[i][:t].long().cpu()
    return codes


@torch.no_grad()
def greedy_text(
    lm: Any, items: Sequence[torch.Tensor], config: ScoringConfig, silence: Any = None
) -> list[torch.Tensor]:
    """Inner Monologue text of each item: ``[T_i]`` int64 on CPU, where frame ``t`` holds the
    argmax of the model's text logits at ``t`` given the audio of frames < t (as placed by
    ``config``) and its own greedy text of frames < t.

    One causal streaming pass (``lm.streaming``, one frame per ``forward_text`` call, TTT
    layers and KV caches fresh for the batch): the text predicted at a frame is fed back as the
    text input of the next, exactly as in generation, where the audio is given here instead of
    sampled. Equals ``t`` teacher-forced forwards over growing prefixes (a test checks it).
    Needs a text delay of 0 (Moshi's)."""
    if int(lm.delays[0]) != 0:
        raise ValueError(f"text fill 'greedy' needs a text delay of 0, got {lm.delays[0]}")
    base = ScoringConfig(config.stream, config.other_stream, "zero", config.codebooks)
    codes = build_codes(lm, items, base, silence).to(lm.device)
    B, _, T = codes.shape
    inputs, _ = delayed_inputs(lm, codes)
    text = torch.full((B, T), ZERO_TOKEN, dtype=torch.long, device=lm.device)
    with lm.streaming(B):
        for s in range(T):
            column = inputs[:, :, s : s + 1].clone()
            if s > 0:  # the text input of frame s is the text of frame s - 1 (delay 0)
                column[:, 0, 0] = text[:, s - 1]
            _, text_logits = lm.forward_text(column)
            text[:, s] = text_logits[:, 0, -1].float().argmax(-1)
    return [text[i, : x.shape[-1]].cpu() for i, x in enumerate(items)]


@torch.no_grad()
def loglik_batch(
    lm: Any, items: Sequence[torch.Tensor], config: ScoringConfig, silence: Any = None
) -> dict[str, Any]:
    """Per item of the batch, in one ``lm.forward`` (after ``greedy_text`` for that fill):
    ``ll [B, S]`` / ``n [B, S]``: per codebook of the audio stream the sum of log p (nats,
    float64) and the count of the scored tokens; ``text_ll [B]`` / ``text_n [B]``: the same for
    the text tokens that fill the text stream (0 with fill ``zero``); ``texts``: those tokens
    (``[T_i]`` each, empty with ``zero``)."""
    size, off = stream_size(lm), int(lm.audio_offset)
    first = size if config.stream == "user" else 0
    texts = greedy_text(lm, items, config, silence) if config.text == "greedy" else None
    codes = build_codes(lm, items, config, silence, texts)
    out = lm(codes.to(lm.device))
    B, T = codes.shape[0], codes.shape[-1]
    lengths = torch.tensor([x.shape[-1] for x in items], device=lm.device)
    delays = torch.tensor(lm.delays[off + first : off + first + size], device=lm.device)
    # the last `delay` frames of each item are lost to the delay, as in a one-item forward
    last = (lengths[:, None] - delays[None])[..., None]  # [B, S, 1]
    keep = torch.arange(T, device=lm.device)[None, None] < last
    mask = out.mask[:, first : first + size].bool() & keep  # [B, S, T]
    target = codes[:, off + first : off + first + size].to(lm.device)
    logits = torch.where(mask[..., None], out.logits[:, first : first + size].float(), 0.0)
    nll = F.cross_entropy(
        logits.flatten(0, 2), torch.where(mask, target, 0).flatten(), reduction="none"
    ).view(B, size, T)
    ll = -(nll * mask).double().sum(-1)
    text_ll, text_n = np.zeros(B), np.zeros(B, dtype=np.int64)
    if config.text != "zero":
        tkeep = torch.arange(T, device=lm.device)[None] < (lengths - int(lm.delays[0]))[:, None]
        tmask = out.text_mask[:, 0].bool() & tkeep  # [B, T]
        ttarget = codes[:, 0].to(lm.device)
        tlogits = torch.where(tmask[..., None], out.text_logits[:, 0].float(), 0.0)
        tnll = F.cross_entropy(
            tlogits.flatten(0, 1), torch.where(tmask, ttarget, 0).flatten(), reduction="none"
        ).view(B, T)
        text_ll = -(tnll * tmask).double().sum(-1).cpu().numpy()
        text_n = tmask.sum(-1).cpu().numpy()
    return {
        "ll": ll.cpu().numpy(),
        "n": mask.sum(-1).cpu().numpy(),
        "text_ll": text_ll,
        "text_n": text_n,
        "texts": [codes[i, 0, : x.shape[-1]].clone() for i, x in enumerate(items)]
        if config.text != "zero"
        else [torch.zeros(0, dtype=torch.long)] * B,
    }


def score_audio(
    lm: Any,
    mimi: Any,
    paths: Iterable[str | Path],
    config: ScoringConfig | None = None,
    batch_size: int = 16,
    progress: bool = True,
    cache: CodeCache | None = None,
) -> tuple[dict[str, Score], dict[str, str]]:
    """Score audio files with ``lm`` (eval mode; TTT layers start fresh for every file).

    Returns ``(scores, bad)``: ``Score`` per usable path (keys ``str(path)``, input order)
    and, for the others, why (missing, unreadable, shorter than one frame). ``cache``
    (path -> codes) is filled and reused, so an audio is encoded once across calls. Items are
    sorted by length and run ``batch_size`` at a time.
    """
    from moshi.utils.compile import no_compile

    config = config or ScoringConfig()
    check_config(lm, config)
    if lm.training:
        raise ValueError("score_audio needs the model in eval mode (lm.eval())")
    size = stream_size(lm)
    keys = list(dict.fromkeys(str(p) for p in paths))
    eager = no_compile() if lm.device.type == "cpu" else contextlib.nullcontext()
    with eager:  # moshi's lazy torch.compile costs minutes on CPU
        cache = encode_files(mimi, keys, size, cache, batch_size, progress)
        bad = {p: cache[p] for p in keys if isinstance(cache[p], str)}
        good = sorted((p for p in keys if p not in bad), key=lambda p: -cache[p].shape[-1])
        silence = _Silence(mimi, size) if config.other_stream == "silence" else None
        scores: dict[str, Score] = {}
        bar = _progress(len(good), "score", progress)
        for start in range(0, len(good), max(1, batch_size)):
            chunk = good[start : start + max(1, batch_size)]
            r = loglik_batch(lm, [cache[p] for p in chunk], config, silence)
            for i, path in enumerate(chunk):
                scores[path] = Score(
                    int(cache[path].shape[-1]),
                    r["ll"][i],
                    r["n"][i].astype(np.int64),
                    float(r["text_ll"][i]),
                    int(r["text_n"][i]),
                    r["texts"][i].numpy().astype(np.int64),
                )
            bar.update(len(chunk))
        bar.close()
    return {p: scores[p] for p in keys if p in scores}, bad


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="file", disable=not enabled, leave=False)
