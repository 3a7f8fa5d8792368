"""Reading one file of the moshi-finetune format: the JSONL index, stereo audio, word
alignments -> the text stream, Mimi encoding (and tiny stand-ins for tests), and bad files
(skipped, counted by reason, ``DataError`` past ``max_bad_fraction``). ``data.pipeline`` builds
sources, windows, batches and shards on top of it."""

from __future__ import annotations

import json
import math
import os
import zlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import sphn
import torch

from ..format import (
    FRAME_RATE,
    FRAME_SIZE,
    NUM_CODEBOOKS,
    SAMPLE_RATE,
    TEXT_EPAD,
    TEXT_PAD,
)

MAIN_SPEAKER = "SPEAKER_MAIN"

BAD_REASONS = ("missing", "unreadable", "empty", "too_short", "channels", "alignments")

BAD_FILES = "bad_files.json"  # the full list of skipped files, beside a run or shards

Alignment = tuple[str, tuple[float, float], str]


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


class AudioEncoder(Protocol):
    """Mimi-like: ``encode(wav [B, 1, S] float, 24 kHz) -> codes [B, 8, ceil(S / 1920)]``."""

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...


class DataError(ValueError):
    """The dataset cannot be used (too many bad files, nothing usable, malformed index)."""


class BadFile(Exception):
    """One unusable file; ``reason`` is one of ``BAD_REASONS``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# -- index ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class IndexEntry:
    path: Path  # audio file, resolved against the index's directory
    duration: float  # seconds, as written in the index
    where: str  # "index.jsonl:LINE", for messages


def read_index(index: str | Path) -> list[IndexEntry]:
    """Entries of a JSONL index; a malformed line is a ``DataError`` naming file and line."""
    index = Path(index)
    if not index.is_file():
        raise FileNotFoundError(f"dataset index {str(index)!r} not found")
    entries = []
    for lineno, line in enumerate(index.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{index}:{lineno}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg}): {line[:80]!r}") from None
        if not isinstance(item, dict) or not isinstance(item.get("path"), str) or not item["path"]:
            raise DataError(
                f'{where}: expected {{"path": str, "duration": seconds}}, got {line[:80]!r}'
            )
        duration = item.get("duration")
        if (
            isinstance(duration, bool)
            or not isinstance(duration, (int, float))
            or not (math.isfinite(duration) and duration >= 0)
        ):
            raise DataError(
                f'{where}: "duration" must be a number of seconds >= 0, got {duration!r}'
            )
        entries.append(IndexEntry(index.parent / item["path"], float(duration), where))
    return entries


# -- bad files ------------------------------------------------------------------------------
@dataclass
class BadFileCounter:
    """Distinct files read fine / skipped, by reason (a file is counted once however often
    seen); ``files`` lists every skipped file with its reason and detail."""

    ok: int = 0
    bad: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BAD_REASONS, 0))
    examples: dict[str, list[str]] = field(default_factory=dict)  # up to 3 per reason
    files: list[dict[str, str]] = field(default_factory=list)  # {"name", "reason", "detail"}
    _seen: set[str] = field(default_factory=set, repr=False)

    def record_ok(self, name: str) -> None:
        if name not in self._seen:
            self._seen.add(name)
            self.ok += 1

    def record_bad(self, name: str, reason: str, detail: str = "") -> None:
        if name in self._seen:
            return
        self._seen.add(name)
        self.bad[reason] = self.bad.get(reason, 0) + 1
        self.files.append({"name": name, "reason": reason, "detail": detail})
        shown = self.examples.setdefault(reason, [])
        if len(shown) < 3:
            shown.append(f"{name}: {detail}" if detail else name)

    @property
    def num_bad(self) -> int:
        return sum(self.bad.values())

    @property
    def num_seen(self) -> int:
        return self.ok + self.num_bad

    @property
    def bad_fraction(self) -> float:
        return self.num_bad / self.num_seen if self.num_seen else 0.0

    def check(self, max_bad_fraction: float, total: int | None = None) -> None:
        """``DataError`` if more than ``max_bad_fraction`` of ``total`` files (the dataset's
        size; default: the files seen) are known to be bad. With ``total``, calling it after
        every skip stops a run as soon as the final fraction is sure to be too high."""
        total = max(total or 0, self.num_seen)
        if total and self.num_bad / total > max_bad_fraction:
            raise DataError(
                f"{self.num_bad} of {total} files are unusable ({self.num_bad / total:.0%} > "
                f"max_bad_fraction {max_bad_fraction:.0%}): {self.summary()}"
            )

    def summary(self) -> str:
        parts = [f"{r} {n} (e.g. {self.examples[r][0]})" for r, n in self.bad.items() if n]
        return "; ".join(parts) if parts else "no bad file"

    def write(self, path: str | Path, total: int | None = None) -> Path:
        """Write the counts and the full list of skipped files to ``path`` (JSON, atomic)."""
        path = Path(path)
        data = {**self.to_dict(), "files_total": total, "bad_files": self.files}
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)
        return path

    def to_dict(self) -> dict[str, Any]:
        """For logging and checkpoints: ``{"files_ok", "files_bad", "bad_<reason>"...}``."""
        out: dict[str, Any] = {"files_ok": self.ok, "files_bad": self.num_bad}
        out.update({f"bad_{r}": n for r, n in self.bad.items()})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "bad": dict(self.bad),
            "examples": self.examples,
            "files": self.files,
            "seen": sorted(self._seen),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ok, self.bad = state["ok"], dict(state["bad"])
        self.examples, self._seen = dict(state["examples"]), set(state["seen"])
        self.files = [dict(f) for f in state.get("files", [])]


# -- audio and alignments -------------------------------------------------------------------
def load_stereo(path: str | Path, min_duration_sec: float = 0.0) -> np.ndarray:
    """Audio ``[2, S]`` float32 at 24 kHz (row 0 = left = Moshi); raises ``BadFile``."""
    path = Path(path)
    if not path.is_file():
        raise BadFile("missing", "no such file")
    if path.stat().st_size == 0:
        raise BadFile("empty", "0 bytes")
    try:
        data, sr = sphn.read(str(path))
    except Exception as e:  # sphn raises ValueError/OSError with the decoder's message
        why = str(e).replace(f'"{path}": ', "")
        raise BadFile(
            "unreadable", "not an audio file we can read (WAV, FLAC, OGG, MP3 ...): " + why
        ) from None
    data = np.asarray(data, dtype=np.float32)
    if data.ndim != 2 or data.shape[-1] == 0:
        raise BadFile("empty", "no samples")
    if data.shape[0] != 2:
        raise BadFile(
            "channels", f"{data.shape[0]} channel(s), expected 2 (left Moshi, right user)"
        )
    if sr != SAMPLE_RATE:
        n = round(data.shape[1] * SAMPLE_RATE / sr)
        data = np.asarray(sphn.resample(data, sr, SAMPLE_RATE), dtype=np.float32)[:, :n]
        data = np.pad(data, ((0, 0), (0, n - data.shape[1])))
    if not np.isfinite(data).all():
        raise BadFile("unreadable", "non-finite samples")
    seconds = data.shape[1] / SAMPLE_RATE
    if data.shape[1] < FRAME_SIZE or seconds < min_duration_sec:
        raise BadFile("too_short", f"{seconds:.3f} s < {max(min_duration_sec, 0.08):g} s")
    return data


def alignments_path(audio: str | Path) -> Path:
    return Path(os.path.splitext(str(audio))[0] + ".json")


def read_alignments(path: str | Path) -> list[Alignment]:
    """``[(word, (start_s, end_s), speaker), ...]`` from an alignments file; raises ``BadFile``."""
    path = Path(path)
    if not path.is_file():
        raise BadFile("alignments", f"no alignments file {path.name}")
    try:
        items = json.loads(path.read_text())["alignments"]
        out = []
        for word, (start, end), speaker in items:
            if not isinstance(word, str) or not isinstance(speaker, str):
                raise TypeError("word and speaker must be strings")
            start, end = float(start), float(end)
            if not (math.isfinite(start) and math.isfinite(end) and start >= 0 and end >= 0):
                raise ValueError(f"word {word!r}: times must be finite seconds >= 0")
            out.append((word, (start, end), speaker))
    except Exception as e:
        detail = (
            f"{path.name}: expected {{'alignments': [[word, [start, end], speaker], ...]}} ({e!r})"
        )
        raise BadFile("alignments", detail) from None
    return out


def build_text_stream(
    alignments: Sequence[Alignment],
    num_frames: int,
    tokenizer: Tokenizer,
    *,
    main_speaker: str = MAIN_SPEAKER,
    frame_rate: float = FRAME_RATE,
    pad: int = TEXT_PAD,
    epad: int = TEXT_EPAD,
) -> list[int]:
    """One text token per frame, exactly as moshi-finetune's ``Interleaver`` (keep_main_only).

    Words of ``main_speaker`` with start < end, sorted by start; PAD everywhere; a word's tokens
    start at frame ``floor(frame_rate * start)``, one per frame; a new word drops the unfinished
    tokens of the previous one; the frame before a token becomes EPAD if it held PAD.
    """
    words = [
        (tokenizer.encode(w.strip()), ts)
        for w, ts, spk in sorted(alignments, key=lambda a: a[1][0])
        if spk == main_speaker and ts[0] < ts[1]
    ]
    stream = [pad] * num_frames
    queue: deque[int] = deque()
    i = 0
    for t in range(num_frames):
        while i < len(words) and words[i][1][0] * frame_rate < t + 1:
            queue = deque(words[i][0])
            i += 1
        if queue:
            if t > 0 and stream[t - 1] == pad:
                stream[t - 1] = epad
            stream[t] = queue.popleft()
    return stream


def encode_stereo(
    encoder: AudioEncoder,
    wav: np.ndarray | torch.Tensor,
    *,
    chunk_frames: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Codes ``[16, T]`` int64 on CPU (rows 0-7 left channel, 8-15 right), ``T = ceil(S / 1920)``.

    ``chunk_frames > 0`` with a streaming encoder (Mimi): encode in streaming chunks of that many
    frames (same codes as one call for Mimi, bounded memory on long files).
    """
    x = torch.as_tensor(wav, dtype=torch.float32)[:, None, :]  # [2, 1, S]
    num_frames = math.ceil(x.shape[-1] / FRAME_SIZE)
    codes = encode_chunked(encoder, x, chunk_frames, device)
    if tuple(codes.shape) != (2, NUM_CODEBOOKS, num_frames):
        raise ValueError(
            f"encoder returned codes of shape {tuple(codes.shape)}, expected (2, 8, {num_frames})"
        )
    return codes.reshape(2 * NUM_CODEBOOKS, num_frames).long().cpu()


def encode_chunked(
    encoder: AudioEncoder,
    x: torch.Tensor,
    chunk_frames: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Codes ``[B, 8, ceil(S / 1920)]`` on CPU of ``x [B, 1, S]`` (24 kHz), without gradients.

    ``chunk_frames > 0`` with a streaming encoder (Mimi) and a longer input: encode in
    streaming pieces of that many frames (the same codes as one call, bounded memory).
    ``device``: where to encode (default: the encoder's parameters' device).
    """
    num_frames = math.ceil(x.shape[-1] / FRAME_SIZE)
    param = next(iter(getattr(encoder, "parameters", lambda: iter(()))()), None)
    if device is None and param is not None:
        device = param.device
    with torch.no_grad():
        if chunk_frames > 0 and num_frames > chunk_frames and hasattr(encoder, "streaming"):
            x = torch.nn.functional.pad(x, (0, num_frames * FRAME_SIZE - x.shape[-1]))
            step = chunk_frames * FRAME_SIZE
            with encoder.streaming(x.shape[0]):  # type: ignore[attr-defined]
                parts = [
                    encoder.encode(x[..., a : a + step].to(device))
                    for a in range(0, x.shape[-1], step)
                ]
            codes = torch.cat(parts, dim=-1)
        else:
            codes = encoder.encode(x.to(device))
    return codes[..., :num_frames].cpu()


# -- stand-ins for the tiny model (tests, CPU runs) -----------------------------------------
class ToyTokenizer:
    """Deterministic word pieces: 3-character chunks hashed into ``[4, vocab_size)``."""

    def __init__(self, vocab_size: int = 64) -> None:
        if vocab_size <= 4:
            raise ValueError(f"ToyTokenizer: vocab_size must be > 4, got {vocab_size}")
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        chunks = [text[i : i + 3] for i in range(0, len(text), 3)]
        return [4 + zlib.crc32(c.encode()) % (self.vocab_size - 4) for c in chunks]


class ToyEncoder:
    """Mimi-shaped deterministic codes: codebook k of a frame quantises the RMS of the k-th
    eighth of its 1920 samples into ``card`` bins. ``encode([B, 1, S]) -> [B, 8, ceil(S/1920)]``."""

    def __init__(self, card: int = 32, scale: float = 4.0) -> None:
        self.card, self.scale = card, scale

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        B, _, S = x.shape
        T = math.ceil(S / FRAME_SIZE)
        x = torch.nn.functional.pad(x.float(), (0, T * FRAME_SIZE - S))
        seg = x.reshape(B, T, NUM_CODEBOOKS, FRAME_SIZE // NUM_CODEBOOKS)
        rms = seg.pow(2).mean(-1).sqrt()  # [B, T, 8]
        codes = (rms * self.scale * self.card).long().clamp_(0, self.card - 1)
        return codes.transpose(1, 2).contiguous()
