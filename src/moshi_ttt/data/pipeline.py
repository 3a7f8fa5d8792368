"""The moshi-finetune dataset format -> codes ``[17, T]`` per file -> windows -> batches, and
pre-tokenized shards; reading one file (index, audio, alignments, Mimi, bad files) is
``data.files``.

Format: a JSONL index of ``{"path", "duration"}`` (audio paths relative to the index's
directory), stereo audio (left = Moshi, right = the user; resampled to 24 kHz) and, beside each
file, a same-stem ``.json`` of word alignments ``{"alignments": [[word, [start_s, end_s],
speaker], ...]}``. Codes (12.5 Hz frames): row 0 text, rows 1-8 Moshi (left) codebooks 0-7,
rows 9-16 user (right) codebooks 0-7; -1 (moshi's zero token: no embedding, no loss) pads.

Differences from moshi-finetune, on purpose: the text stream and Mimi codes are computed over
the whole file and then cut into windows (moshi-finetune redoes both per window), so a word or a
Mimi context crossing a window boundary is not cut and the windows of a file are one continuous
stream (needed to carry TTT state across them); the padded tail of the last window is -1 in every
row, text included (moshi-finetune leaves PAD text there, scored with weight 0.5).

Bad files (missing, unreadable, empty, too short, wrong channel count, bad alignments) are
skipped, counted by reason and listed with the reason (``BadFileCounter``); after every skip
``BadFileCounter.check`` raises ``DataError`` as soon as more than ``max_bad_fraction`` of the
dataset's files are known to be bad (bad files / files in the dataset: exact, whatever the
order in which the files are read).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..format import (
    FRAME_RATE,
    FRAME_SIZE,
    NUM_STREAMS,
    ZERO_TOKEN,
    frames_for_duration,
)
from .files import (
    BAD_FILES,
    MAIN_SPEAKER,
    AudioEncoder,
    BadFile,
    BadFileCounter,
    DataError,
    IndexEntry,
    Tokenizer,
    alignments_path,
    build_text_stream,
    encode_stereo,
    load_stereo,
    read_alignments,
    read_index,
)

SHARDS_INDEX = "shards.json"


# -- sources: file id -> codes [17, T] ------------------------------------------------------
@dataclass
class RawFile:
    wav: np.ndarray  # [2, S] float32, 24 kHz
    text: list[int] | None  # one token per frame, None = no transcript (text row -1)


class AudioSource:
    """Files of JSONL indexes, read (``read``: CPU, thread-safe) then encoded (``encode``)."""

    def __init__(
        self,
        entries: Sequence[IndexEntry],
        encoder: AudioEncoder,
        tokenizer: Tokenizer,
        *,
        min_duration_sec: float = 0.0,
        require_alignments: bool = True,
        main_speaker: str = MAIN_SPEAKER,
        encode_chunk_sec: float = 0.0,
        device: torch.device | str | None = None,
    ) -> None:
        self.entries = list(entries)
        self.encoder, self.tokenizer, self.device = encoder, tokenizer, device
        self.min_duration_sec, self.require_alignments = min_duration_sec, require_alignments
        self.main_speaker = main_speaker
        self.chunk_frames = frames_for_duration(encode_chunk_sec) if encode_chunk_sec > 0 else 0

    def __len__(self) -> int:
        return len(self.entries)

    def name(self, i: int) -> str:
        return str(self.entries[i].path)

    def read(self, i: int) -> RawFile:
        path = self.entries[i].path
        wav = load_stereo(path, self.min_duration_sec)
        num_frames = math.ceil(wav.shape[1] / FRAME_SIZE)
        align = alignments_path(path)
        if not align.exists() and not self.require_alignments:
            return RawFile(wav, None)
        words = read_alignments(align)
        text = build_text_stream(words, num_frames, self.tokenizer, main_speaker=self.main_speaker)
        return RawFile(wav, text)

    def encode(self, raw: RawFile) -> torch.Tensor:
        audio = encode_stereo(
            self.encoder, raw.wav, chunk_frames=self.chunk_frames, device=self.device
        )
        if raw.text is None:
            text = torch.full((1, audio.shape[1]), ZERO_TOKEN, dtype=torch.long)
        else:
            text = torch.tensor(raw.text, dtype=torch.long)[None]
        return torch.cat([text, audio], dim=0)

    def codes(self, i: int) -> torch.Tensor:
        """Codes ``[17, T]`` of file ``i``; raises ``BadFile``."""
        return self.encode(self.read(i))


class ShardSource:
    """Files tokenized by ``tokenize_index``: a directory with ``shards.json``."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        self.root = path.parent if path.name == SHARDS_INDEX else path
        index = self.root / SHARDS_INDEX
        if not index.is_file():
            raise FileNotFoundError(
                f"shards index {str(index)!r} not found (run moshi-ttt tokenize)"
            )
        try:
            self.files = json.loads(index.read_text())["files"]
            self.frames = [int(f["frames"]) for f in self.files]
            self.shards = [str(f["shard"]) for f in self.files]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{index}: malformed shards index ({e!r})") from None

    def __len__(self) -> int:
        return len(self.files)

    def name(self, i: int) -> str:
        return str(self.root / self.shards[i])

    def read(self, i: int) -> torch.Tensor:
        path = self.root / self.shards[i]
        if path.suffix != ".safetensors":  # never opened: only safetensors are ever read
            raise BadFile("unreadable", f"{path.name}: not a .safetensors shard")
        if not path.is_file():
            raise BadFile("missing", "no such shard")
        try:
            codes = load_file(str(path))["codes"]
        except Exception as e:
            raise BadFile("unreadable", repr(e)) from None
        if tuple(codes.shape) != (NUM_STREAMS, self.frames[i]):
            raise BadFile(
                "unreadable", f"codes {tuple(codes.shape)}, expected (17, {self.frames[i]})"
            )
        return codes.long()

    def encode(self, raw: torch.Tensor) -> torch.Tensor:
        return raw

    def codes(self, i: int) -> torch.Tensor:
        return self.read(i)


class ConcatSource:
    """Several sources as one (file ids run through them in order)."""

    def __init__(self, sources: Sequence[AudioSource | ShardSource]) -> None:
        self.sources = list(sources)
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources]).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    def _locate(self, i: int) -> tuple[AudioSource | ShardSource, int]:
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.sources[k], i - self.offsets[k]

    def name(self, i: int) -> str:
        source, j = self._locate(i)
        return source.name(j)

    def read(self, i: int) -> Any:
        source, j = self._locate(i)
        return source, source.read(j)

    def encode(self, raw: Any) -> torch.Tensor:
        source, inner = raw
        return source.encode(inner)

    def codes(self, i: int) -> torch.Tensor:
        return self.encode(self.read(i))


Source = AudioSource | ShardSource | ConcatSource


def open_source(
    paths: str | Path | Sequence[str | Path],
    encoder: AudioEncoder | None = None,
    tokenizer: Tokenizer | None = None,
    **audio_kwargs: Any,
) -> Source:
    """A source over JSONL indexes and/or shards directories (``data.train`` / ``data.eval``).

    ``encoder`` and ``tokenizer`` are needed for JSONL indexes only; ``audio_kwargs`` go to
    ``AudioSource`` (min_duration_sec, require_alignments, main_speaker, encode_chunk_sec, device).
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    sources: list[AudioSource | ShardSource] = []
    for p in map(Path, paths):
        if p.is_dir() or p.name == SHARDS_INDEX:
            sources.append(ShardSource(p))
        else:
            if encoder is None or tokenizer is None:
                raise ValueError(f"{p}: a JSONL index needs an audio encoder and a text tokenizer")
            sources.append(AudioSource(read_index(p), encoder, tokenizer, **audio_kwargs))
    return sources[0] if len(sources) == 1 else ConcatSource(sources)


# -- windows and batches --------------------------------------------------------------------
@dataclass
class Window:
    codes: torch.Tensor  # [17, F] int64, -1 past the end of the file
    file_id: int
    index: int  # 0 = first window of the file (a fresh TTT state)
    num_windows: int
    num_frames: int  # real frames (F on all but the last window)


def cut_windows(codes: torch.Tensor, frames: int, file_id: int = 0) -> list[Window]:
    """Consecutive windows of ``frames`` frames covering ``codes [17, T]`` in order."""
    total = codes.shape[-1]
    n = max(1, math.ceil(total / frames))
    out = []
    for k in range(n):
        part = codes[:, k * frames : (k + 1) * frames]
        real = part.shape[-1]
        if real < frames:
            part = torch.nn.functional.pad(part, (0, frames - real), value=ZERO_TOKEN)
        out.append(Window(part.contiguous(), file_id, k, n, real))
    return out


@dataclass
class Batch:
    codes: torch.Tensor  # [B, 17, F] int64
    reset: torch.Tensor  # [B] bool: the row starts a file -> start from a fresh TTT state
    lanes: list[int]  # batch slot of each row (a lane walks through its files in order)
    file_ids: list[int]
    window_indices: list[int]

    @staticmethod
    def collate(windows: Sequence[Window], lanes: Sequence[int] | None = None) -> Batch:
        return Batch(
            codes=torch.stack([w.codes for w in windows]),
            reset=torch.tensor([w.index == 0 for w in windows]),
            lanes=list(range(len(windows))) if lanes is None else list(lanes),
            file_ids=[w.file_id for w in windows],
            window_indices=[w.index for w in windows],
        )


class WindowLoader:
    """Batches of windows: row ``b`` (lane ``b``) walks through its files window by window.

    File order per epoch: a permutation seeded by ``(seed, epoch)`` (or the index order), of
    which rank ``r`` takes positions ``r, r + world_size, ...``. ``loop=True`` (training) cycles
    forever; ``loop=False`` (evaluation: build a fresh loader each time) ends after one pass,
    the last batches having fewer rows as lanes run dry. Bad files are skipped, counted in
    ``stats`` once, never retried, and ``stats.check(max_bad_fraction)`` runs after each one.
    ``state_dict()`` / ``load_state_dict()`` give the exact position for resuming.
    ``on_bad(name, reason, detail)`` is called for every newly skipped file.
    """

    def __init__(
        self,
        source: Source,
        *,
        frames: int,
        batch_size: int,
        loop: bool = True,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        max_bad_fraction: float = 1.0,
        stats: BadFileCounter | None = None,
        num_workers: int = 0,
        on_bad: Any = None,
    ) -> None:
        self.source, self.frames, self.batch_size = source, frames, batch_size
        self.loop, self.shuffle, self.seed = loop, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.max_bad_fraction, self.num_workers = max_bad_fraction, num_workers
        self.stats = stats if stats is not None else BadFileCounter()
        self.on_bad = on_bad
        self.epoch, self.cursor = 0, 0
        self.lanes: list[tuple[int, int] | None] = [None] * batch_size  # (file id, next window)
        self._windows: dict[int, list[Window]] = {}  # lane -> windows of its current file
        self._bad: set[int] = set()
        self._good_this_epoch = 0
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[tuple[int, int], Future] = {}
        self._shares: dict[int, list[int]] = {}
        if len(self._share(0)) == 0:
            raise DataError(f"rank {rank} gets no file: {len(source)} files for {world_size} ranks")
        self.total = len(self._share(0))  # this rank's files: the denominator of the bad fraction

    def _share(self, epoch: int) -> list[int]:
        """This rank's file ids for ``epoch``, in reading order."""
        if epoch not in self._shares:
            n = len(self.source)
            order = np.arange(n)
            if self.shuffle:
                order = np.random.default_rng((self.seed, epoch)).permutation(n)
            self._shares = {epoch: order[self.rank :: self.world_size].tolist()}
        return self._shares[epoch]

    def _read(self, epoch: int, pos: int, fid: int) -> Any:
        if self.num_workers <= 0:
            return self.source.read(fid)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="moshi-ttt-data")
        share = self._share(epoch)
        for p in range(pos, min(pos + self.num_workers + 1, len(share))):
            if (epoch, p) not in self._pending and share[p] not in self._bad:
                self._pending[(epoch, p)] = self._pool.submit(self.source.read, share[p])
        future = self._pending.pop((epoch, pos), None)
        return future.result() if future is not None else self.source.read(fid)

    def _load(self, fid: int, epoch: int = -1, pos: int = -1) -> list[Window] | None:
        try:
            raw = self._read(epoch, pos, fid) if pos >= 0 else self.source.read(fid)
            codes = self.source.encode(raw)
        except BadFile as e:
            self._bad.add(fid)
            name = self.source.name(fid)
            new = name not in self.stats._seen
            self.stats.record_bad(name, e.reason, e.detail)
            if new and self.on_bad is not None:
                self.on_bad(name, e.reason, e.detail)
            self.stats.check(self.max_bad_fraction, total=self.total)
            return None
        self.stats.record_ok(self.source.name(fid))
        return cut_windows(codes, self.frames, fid)

    def _next_file(self) -> tuple[int, list[Window]] | None:
        while True:
            share = self._share(self.epoch)
            if self.cursor >= len(share):
                if not self.loop:
                    return None
                if self._good_this_epoch == 0:
                    raise DataError(f"no usable file in a whole epoch: {self.stats.summary()}")
                self.epoch, self.cursor, self._good_this_epoch = self.epoch + 1, 0, 0
                continue
            pos, fid = self.cursor, share[self.cursor]
            self.cursor += 1
            if fid in self._bad:
                continue
            windows = self._load(fid, self.epoch, pos)
            if windows is not None:
                self._good_this_epoch += 1
                return fid, windows

    def _take(self, lane: int) -> Window | None:
        state = self.lanes[lane]
        if state is not None and lane not in self._windows:  # resumed mid-file
            windows = self._load(state[0])
            if windows is None:
                state = None
            else:
                self._windows[lane] = windows
        if state is None or state[1] >= len(self._windows[lane]):
            found = self._next_file()
            if found is None:
                self.lanes[lane] = None
                self._windows.pop(lane, None)
                return None
            state = (found[0], 0)
            self._windows[lane] = found[1]
        window = self._windows[lane][state[1]]
        self.lanes[lane] = (state[0], state[1] + 1)
        return window

    def __iter__(self) -> Iterator[Batch]:
        while True:
            rows = [(b, w) for b in range(self.batch_size) if (w := self._take(b)) is not None]
            if not rows:
                return
            yield Batch.collate([w for _, w in rows], [b for b, _ in rows])

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "lanes": [list(s) if s is not None else None for s in self.lanes],
            "bad": sorted(self._bad),
            "good_this_epoch": self._good_this_epoch,
            "stats": self.stats.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict`` position. One saved with another ``batch_size`` or dataset
        (an inexact resume) is adapted: lanes added (empty) or dropped, unknown files ignored."""
        n = len(self.source)
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        lanes = [tuple(s) if s is not None and s[0] < n else None for s in state["lanes"]]
        self.lanes = (lanes + [None] * self.batch_size)[: self.batch_size]  # type: ignore[assignment]
        self._bad = {int(i) for i in state["bad"] if int(i) < n}
        self._good_this_epoch = int(state["good_this_epoch"])
        self.stats.load_state_dict(state["stats"])
        self._windows.clear()
        self._pending.clear()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


# -- pre-tokenized shards -------------------------------------------------------------------
def tokenize_index(
    index: str | Path,
    out_dir: str | Path,
    encoder: AudioEncoder,
    tokenizer: Tokenizer,
    *,
    max_bad_fraction: float | None = None,
    progress: bool = True,
    **audio_kwargs: Any,
) -> BadFileCounter:
    """Encode every file of a JSONL index once: ``out_dir/NNNNNN.safetensors`` (``codes``
    ``[17, T]`` int32) and ``out_dir/shards.json`` (files, frames, skipped files and why).

    Bad files are skipped, counted and listed in ``out_dir/bad_files.json``. With
    ``max_bad_fraction`` the fraction (bad files / files in the index) is checked after every
    skip: a ``DataError`` stops as soon as it is exceeded, and ``shards.json`` (which marks a
    usable shards directory) is then not written; so is an index with no usable file.
    ``audio_kwargs`` go to ``AudioSource`` (min_duration_sec, require_alignments,
    main_speaker, encode_chunk_sec, device).
    """
    out = Path(out_dir)
    source = AudioSource(read_index(index), encoder, tokenizer, **audio_kwargs)
    out.mkdir(parents=True, exist_ok=True)
    (out / SHARDS_INDEX).unlink(missing_ok=True)  # written last, when complete
    stats = BadFileCounter()
    files = []
    bar = tqdm(range(len(source)), desc="tokenize", unit="file", disable=not progress)
    try:
        for i in bar:
            entry = source.entries[i]
            try:
                codes = source.codes(i)
            except BadFile as e:
                stats.record_bad(source.name(i), e.reason, e.detail)
                bar.set_postfix(bad=stats.num_bad)
                if max_bad_fraction is not None:
                    stats.check(max_bad_fraction, total=len(source))
                continue
            stats.record_ok(source.name(i))
            shard = f"{i:06d}.safetensors"
            tmp = out / f".{shard}.tmp"
            meta = {"path": str(entry.path), "frames": str(codes.shape[1])}
            save_file({"codes": codes.to(torch.int32).contiguous()}, str(tmp), metadata=meta)
            os.replace(tmp, out / shard)
            files.append({"shard": shard, "path": str(entry.path), "frames": int(codes.shape[1])})
    except DataError as e:
        stats.write(out / BAD_FILES, len(source))
        raise DataError(f"{index}: {e}; no {SHARDS_INDEX} written (list: {out / BAD_FILES})") from e
    finally:
        bar.close()
    stats.write(out / BAD_FILES, len(source))
    if not files:
        raise DataError(f"{index}: no usable file ({stats.summary()}); list: {out / BAD_FILES}")
    skipped = [{"path": f["name"], "reason": f["reason"], "detail": f["detail"]}
               for f in stats.files]  # fmt: skip
    summary = {
        "format": "moshi-ttt shards",
        "version": 1,
        "index": str(index),
        "frame_rate": FRAME_RATE,
        "rows": "text, Moshi (left) codebooks 0-7, user (right) codebooks 0-7",
        "files": files,
        "skipped": skipped,
        "stats": stats.to_dict(),
    }
    tmp = out / f".{SHARDS_INDEX}.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, out / SHARDS_INDEX)
    return stats
