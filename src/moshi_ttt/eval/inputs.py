"""Evaluation inputs -> ``(name, codes [17, T])`` per file, bad files counted and listed.

Sources (``EvalInputs(path, ...)``):

- a directory of audio, e.g. LibriLight's ``<speaker>/<book>/*.flac`` (any depth; ``.flac``,
  ``.wav``, ``.mp3``, ``.ogg``, ``.opus``), or one audio file;
- a JSONL index of ``{"path", "duration"}`` (moshi-finetune's, paths relative to the index);
- a directory of tokenized shards (``shards.json``, from ``moshi-ttt tokenize``): its codes are
  used as they are (the placement options below do not apply).

Audio is read as mono, resampled to 24 kHz and encoded by Mimi over the whole file (in
streaming pieces for long files); of a stereo file one channel is used, ``channel`` (default
right: the user's in moshi-finetune's layout, left = Moshi), or both averaged (``mix``), and
``channels_used`` counts which. The 8 codes go into one stream and the rest is filled as
configured (``StreamPlacement``). Rows of ``codes``: 0 text, 1-8 Moshi, 9-16 user;
-1 is moshi's zero token (no embedding, no loss).

A missing file, an unreadable or empty one, one shorter than a frame (80 ms) is skipped,
counted (``BadFileCounter``) and listed (``EvalInputs.bad_files``), never an exception.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.files import BadFile, BadFileCounter, encode_chunked, read_index
from ..data.pipeline import SHARDS_INDEX, ShardSource
from ..format import FRAME_SIZE, NUM_CODEBOOKS, NUM_STREAMS, SAMPLE_RATE, TEXT_PAD, ZERO_TOKEN
from ..generate import CHANNEL_TEXT, CHANNELS, DEFAULT_CHANNEL, read_audio

AUDIO_EXTENSIONS = (".flac", ".wav", ".mp3", ".ogg", ".opus")
STREAMS = ("moshi", "user")
OTHER_FILLS = ("zero", "silence")
TEXT_FILLS = ("zero", "pad")


@dataclass(frozen=True)
class StreamPlacement:
    """Where the audio goes and what fills the rest.

    - ``audio``: ``"moshi"`` (rows 1-8: scored by the audio loss) or ``"user"`` (rows 9-16:
      input only, never scored);
    - ``other``: the other audio stream, ``"zero"`` (-1) or ``"silence"`` (Mimi codes of
      silence of the same length);
    - ``text``: ``"zero"`` (-1: no text input, no text loss) or ``"pad"`` (PAD 3 every frame).
    """

    audio: str = "moshi"
    other: str = "zero"
    text: str = "zero"

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("audio stream", self.audio, STREAMS),
            ("other stream fill", self.other, OTHER_FILLS),
            ("text fill", self.text, TEXT_FILLS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")

    def to_dict(self) -> dict[str, str]:
        return {"audio": self.audio, "other": self.other, "text": self.text}


@dataclass
class BadFiles:
    """Every skipped file (``files``: name, reason, detail) and the counts (``counter``)."""

    counter: BadFileCounter = field(default_factory=BadFileCounter)
    files: list[dict[str, str]] = field(default_factory=list)

    def ok(self, name: str) -> None:
        self.counter.record_ok(name)

    def bad(self, name: str, reason: str, detail: str = "") -> None:
        if name not in self.counter._seen:
            self.files.append({"name": name, "reason": reason, "detail": detail})
        self.counter.record_bad(name, reason, detail)

    def to_dict(self) -> dict[str, Any]:
        return {**self.counter.to_dict(), "bad_files": list(self.files)}


def encode_mono(
    mimi: Any, wav: np.ndarray, chunk_frames: int = 1500, device: torch.device | str | None = None
) -> torch.Tensor:
    """Mimi codes ``[8, ceil(S / 1920)]`` int64 on CPU of mono 24 kHz samples ``wav [S]``;
    files longer than ``chunk_frames`` frames are encoded in streaming pieces of that many
    frames (same codes, bounded memory)."""
    frames = math.ceil(len(wav) / FRAME_SIZE)
    x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))[None, None]
    codes = encode_chunked(mimi, x, chunk_frames, device)[0]
    if tuple(codes.shape) != (NUM_CODEBOOKS, frames):
        raise ValueError(f"Mimi returned codes {tuple(codes.shape)}, expected (8, {frames})")
    return codes.long().cpu()


class EvalInputs:
    """Iterate ``(name, codes [17, T] int64 CPU)`` over the usable files of ``path``.

    Args:
        path: audio directory or file, JSONL index, or shards directory (module docstring).
        mimi: the codec (``models.load.load_codec``); needed for audio sources.
        placement: stream placement of the audio (``StreamPlacement``).
        max_files: only the first files (sorted by path; index order for JSONL).
        max_frames: cut every file to its first frames (None: whole files).
        encode_chunk_frames: Mimi streaming piece for long files, frames.
        channel: the channel of a stereo file, ``left``, ``right`` (default) or ``mix``.

    ``bad`` (``BadFiles``) lists the skipped files after (or during) iteration;
    ``channels_used`` counts the files read per channel (``mono``, ``left``, ``right``,
    ``mix``).
    """

    def __init__(
        self,
        path: str | Path,
        mimi: Any | None = None,
        placement: StreamPlacement | None = None,
        *,
        max_files: int | None = None,
        max_frames: int | None = None,
        encode_chunk_frames: int = 1500,
        channel: str = DEFAULT_CHANNEL,
    ) -> None:
        if channel not in CHANNELS:
            raise ValueError(f"channel must be one of {', '.join(CHANNELS)}, got {channel!r}")
        self.channel = channel
        self.channels_used: dict[str, int] = {}
        self.path = Path(path)
        self.mimi, self.placement = mimi, placement or StreamPlacement()
        self.max_frames, self.encode_chunk_frames = max_frames, encode_chunk_frames
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        self.bad = BadFiles()
        self.shards: ShardSource | None = None
        self.audio: list[Path] = []
        if not self.path.exists():
            raise FileNotFoundError(f"evaluation data not found: {self.path}")
        if (self.path / SHARDS_INDEX).is_file() or self.path.name == SHARDS_INDEX:
            self.kind = "shards"
            self.shards = ShardSource(self.path)
            count = len(self.shards)
        elif self.path.is_dir():
            self.kind = "audio_dir"
            found = self.path.rglob("*")
            self.audio = sorted(p for p in found if p.suffix.lower() in AUDIO_EXTENSIONS)
            if not self.audio:
                raise ValueError(
                    f"{self.path}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) and no "
                    f"{SHARDS_INDEX}"
                )
            count = len(self.audio)
        elif self.path.suffix.lower() in AUDIO_EXTENSIONS:
            self.kind, self.audio, count = "audio_file", [self.path], 1
        else:
            self.kind = "index"
            self.audio = [e.path for e in read_index(self.path)]
            count = len(self.audio)
        if max_files is not None:
            if max_files < 1:
                raise ValueError(f"max_files must be >= 1, got {max_files}")
            count = min(count, max_files)
            self.audio = self.audio[:count]
        self.count = count
        if self.kind != "shards" and mimi is None:
            raise ValueError(f"{self.path}: audio inputs need a Mimi codec")
        self._silence: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.count

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "files": self.count,
            "placement": self.placement.to_dict() if self.kind != "shards" else "as tokenized",
            "max_frames": self.max_frames,
            "channel": self.channel if self.kind != "shards" else "as tokenized",
        }

    def channel_line(self) -> str | None:
        """``"stereo input: used the right channel (...) of 3 files (--channel right)"``, or
        None when no stereo file was read."""
        stereo = {k: v for k, v in self.channels_used.items() if k != "mono"}
        if not stereo:
            return None
        used = "; ".join(
            f"{CHANNEL_TEXT[k].removeprefix('stereo, ')} of {v} file{'s' * (v != 1)}"
            for k, v in stereo.items()
        )
        return f"stereo input: {used} (--channel {self.channel})"

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for i in range(self.count):
            name = self.shards.name(i) if self.shards is not None else str(self.audio[i])
            try:
                codes = self._shard(i) if self.shards is not None else self._audio(self.audio[i])
            except BadFile as e:
                self.bad.bad(name, e.reason, e.detail)
                continue
            self.bad.ok(name)
            yield name, codes

    def audio_files(self) -> list[Path]:
        """The audio files of the source (empty for shards)."""
        return list(self.audio)

    # -- one file ---------------------------------------------------------------------------
    def _shard(self, i: int) -> torch.Tensor:
        assert self.shards is not None
        codes = self.shards.codes(i)
        if codes.shape[-1] == 0:
            raise BadFile("too_short", "0 frames")
        return codes[:, : self.max_frames] if self.max_frames else codes

    def _audio(self, path: Path) -> torch.Tensor:
        wav, used = load_mono(path, self.channel)
        self.channels_used[used] = self.channels_used.get(used, 0) + 1
        if self.max_frames:
            wav = wav[: self.max_frames * FRAME_SIZE]
        audio = encode_mono(self.mimi, wav, self.encode_chunk_frames)
        return self.place(audio)

    def place(self, audio: torch.Tensor) -> torch.Tensor:
        """Codes ``[17, T]`` with ``audio [8, T]`` placed as configured."""
        T = audio.shape[-1]
        codes = torch.full((NUM_STREAMS, T), ZERO_TOKEN, dtype=torch.long)
        if self.placement.text == "pad":
            codes[0] = TEXT_PAD
        main, other = slice(1, 9), slice(9, 17)
        if self.placement.audio == "user":
            main, other = other, main
        codes[main] = audio
        if self.placement.other == "silence":
            codes[other] = self._silence_codes(T)
        return codes

    def _silence_codes(self, frames: int) -> torch.Tensor:
        """Mimi codes of ``frames`` frames of silence (Mimi is causal: one encoding of the
        longest length serves every shorter file)."""
        if self._silence is None or self._silence.shape[-1] < frames:
            silence = np.zeros(frames * FRAME_SIZE, dtype=np.float32)
            self._silence = encode_mono(self.mimi, silence, self.encode_chunk_frames)
        return self._silence[:, :frames]


def load_mono(path: Path, channel: str = DEFAULT_CHANNEL) -> tuple[np.ndarray, str]:
    """Mono float32 samples at 24 kHz (of a stereo file its ``channel``) and the channel used
    (``read_audio``); raises ``BadFile`` (missing, empty, unreadable, too short: under one
    1920-sample frame)."""
    if not path.is_file():
        raise BadFile("missing", "no such file")
    if path.stat().st_size == 0:
        raise BadFile("empty", "0 bytes")
    try:
        wav, used = read_audio(path, SAMPLE_RATE, channel)
    except FileNotFoundError:
        raise BadFile("missing", "no such file") from None
    except (ValueError, OSError, RuntimeError) as e:
        detail = str(e).replace(f"{path}: ", "").replace(f'"{path}": ', "")
        raise BadFile("empty" if "no audio samples" in detail else "unreadable", detail) from None
    if not np.isfinite(wav).all():
        raise BadFile("unreadable", "non-finite samples")
    if len(wav) < FRAME_SIZE:
        raise BadFile("too_short", f"{len(wav) / SAMPLE_RATE:.3f} s < one 80 ms frame")
    return wav, used
