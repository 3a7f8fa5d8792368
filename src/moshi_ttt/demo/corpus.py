"""A real corpus for the long-context benchmark: a directory of text files, or token shards.

Text files are read recursively as **bytes in Moshi's text stream**: byte ``b`` is text token
``TOKEN_OFFSET + b`` (the offset keeps clear of Moshi's EPAD 0 and PAD 3, which the loss weighs
differently), so ``text_card`` is ``TOKEN_OFFSET + 256``; the 16 audio rows are -1 (no input,
no loss). One frame holds one byte. A file is cut into non-overlapping sequences of ``frames``
bytes (its tail shorter than that is dropped).

Splits are a hash of each file's path relative to the root (``split_of``): a rerun, a larger
cap or another machine with the same tree gives every file the same split, and the held-out
(``test``) files are never used for a choice; ``val`` files are for every choice (learning
rates, steps), ``train`` files for training.

Files that are not text (a NUL byte, or not UTF-8) or cannot be read are skipped and counted
by reason, never decoded with replacement; a file shorter than one sequence is counted as
``too_short``. ``max_files`` / ``max_bytes`` cap what is read (files taken in hash order, so
the capped set is a stable random subset) and the summary says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from ..data.files import DataError
from ..data.pipeline import SHARDS_INDEX, ShardSource
from ..format import FRAME_RATE, NUM_STREAMS, ZERO_TOKEN

TOKEN_OFFSET = 4
TEXT_CARD = TOKEN_OFFSET + 256
SPLITS = ("train", "val", "test")
SKIP_REASONS = ("not_text", "unreadable", "too_short", "not_a_file", "same_as_train")
SKIP_DIRS = {"__pycache__", ".git", ".hg", ".svn", "site-packages", "node_modules", ".venv"}


def stdlib_dir() -> Path:
    """The standard library of the interpreter that runs this (present on every machine)."""
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(rel_path: str, val_fraction: float, test_fraction: float) -> str:
    """``"train"``, ``"val"`` or ``"test"`` for a file, from the sha256 of its relative path
    (POSIX separators): the same path always lands in the same split."""
    h = int.from_bytes(hashlib.sha256(rel_path.encode("utf-8")).digest()[:8], "big") / 2**64
    if h < test_fraction:
        return "test"
    if h < test_fraction + val_fraction:
        return "val"
    return "train"


def _hash_key(rel_path: str) -> bytes:
    return hashlib.sha256(b"order:" + rel_path.encode("utf-8")).digest()


def bytes_to_codes(data: bytes) -> torch.Tensor:
    """Codes ``[17, T]`` int32 of ``T = len(data)`` bytes: row 0 the byte tokens, rows 1-16 -1."""
    out = torch.full((NUM_STREAMS, len(data)), ZERO_TOKEN, dtype=torch.int32)
    if not data:
        return out
    out[0] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int32) + TOKEN_OFFSET
    return out


def codes_to_bytes(codes: torch.Tensor) -> bytes:
    """Inverse of ``bytes_to_codes`` (row 0 of ``[17, T]``, or the row ``[T]``)."""
    row = codes[0] if codes.dim() == 2 else codes
    return bytes((row.long() - TOKEN_OFFSET).clamp(0, 255).tolist())


def source_file(sequence: str) -> str:
    """The file a sequence name ``PATH#k`` comes from: the unit of every interval."""
    return sequence.rsplit("#", 1)[0]


def sequence_counts(sequences: list[tuple[str, torch.Tensor]], split: str) -> dict[str, int]:
    """``{SPLIT_files, SPLIT_sequences}`` of named sequences (``PATH#k``): what a report says
    a choice was made on."""
    files = len({source_file(name) for name, _ in sequences})
    return {f"{split}_files": files, f"{split}_sequences": len(sequences)}


def count_text(sequences: list[tuple[str, torch.Tensor]]) -> str:
    """``"12 sequences from 3 files"``."""
    c = sequence_counts(sequences, "x")
    return f"{c['x_sequences']} sequences from {c['x_files']} files"


def is_text(data: bytes) -> bool:
    """UTF-8 without NUL bytes: what this reader calls a text file."""
    if b"\x00" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@dataclass
class CorpusSummary:
    """What was read: sequences per split, files used, skipped files by reason, caps hit."""

    root: str
    kind: str  # "text" or "shards"
    frames: int
    files: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    sequences: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)
    capped: str | None = None  # why reading stopped early, if it did
    bytes_read: int = 0

    def skip(self, reason: str, rel: str) -> None:
        self.skipped[reason] += 1
        examples = self.skipped_examples.setdefault(reason, [])
        if len(examples) < 5:
            examples.append(rel)

    def text(self) -> str:
        parts = [f"{self.sequences[s]} {s} sequences ({self.files[s]} files)" for s in SPLITS]
        line = f"{self.root}: " + ", ".join(parts) + f" of {self.frames} frames"
        if self.skipped:
            line += "; skipped " + ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items()))
        if self.capped:
            line += f"; {self.capped}"
        return line

    def to_dict(self) -> dict:
        return {"root": self.root, "kind": self.kind, "frames": self.frames,
                "files": self.files, "sequences": self.sequences,
                "skipped": dict(self.skipped), "skipped_examples": self.skipped_examples,
                "capped": self.capped, "bytes_read": self.bytes_read}  # fmt: skip


@dataclass(frozen=True)
class CorpusSpec:
    """How to read a corpus.

    Attributes:
        frames: frames (bytes) per sequence.
        val_fraction / test_fraction: share of *files* in the validation / held-out split.
        max_files: read at most this many files (hash order).
        max_bytes: stop once this many bytes of text have been used.
        max_sequences_per_file: per file and split, at most this many sequences (a few very
            long files must not dominate); held-out files give their first sequences.
    """

    frames: int = 1024
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    max_files: int = 5000
    max_bytes: int = 64 * 2**20
    max_sequences_per_file: int = 8

    def __post_init__(self) -> None:
        if self.frames < 2:
            raise ValueError(f"frames per sequence must be >= 2, got {self.frames}")
        if not (self.val_fraction > 0 and self.test_fraction > 0
                and self.val_fraction + self.test_fraction < 1):  # fmt: skip
            raise ValueError(
                "val_fraction and test_fraction must be > 0 with a sum < 1, got "
                f"{self.val_fraction} and {self.test_fraction}"
            )
        if self.max_files < 1 or self.max_bytes < 1 or self.max_sequences_per_file < 1:
            raise ValueError("max_files, max_bytes and max_sequences_per_file must be >= 1")


def list_text_candidates(root: Path) -> list[str]:
    """Relative POSIX paths of every regular file under ``root`` (hidden and cache folders
    skipped), in hash order."""
    rels = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            rels.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(rels, key=_hash_key)


def read_text_corpus(
    root: str | Path,
    spec: CorpusSpec,
    out_dir: str | Path,
    progress: bool = False,
    split: str | None = None,
    encode: Callable[[bytes], torch.Tensor] = bytes_to_codes,
    option: str = "--data",
) -> CorpusSummary:
    """Read the text files under ``root`` into three shards directories ``out_dir/{train,val,
    test}`` (``moshi_ttt.data.pipeline.ShardSource``), one sequence of ``spec.frames`` frames per
    shard; returns the summary. Raises ``DataError`` (naming ``root`` and what was expected)
    when there is no usable sequence in some split. ``split``: every file goes to that split
    (only it is written); ``encode``: a file's bytes to codes ``[17, T]`` (default: one byte
    per frame; ``tokenizer_codes``: a model's tokenizer); ``option``: what errors name."""
    root = Path(root)
    check_corpus_root(root, option)
    summary = CorpusSummary(root=str(root), kind="text", frames=spec.frames)
    writers = {s: _ShardWriter(Path(out_dir) / s, str(root)) for s in _splits(split)}
    rels = list_text_candidates(root)
    if len(rels) > spec.max_files:
        summary.capped = f"read {spec.max_files} of {len(rels)} files (max_files)"
        rels = rels[: spec.max_files]
    train_content = _train_content(root, rels, spec, split)
    for rel in tqdm(rels, desc="reading corpus", unit="file", disable=not progress):
        path = root / rel
        if not path.is_file():
            summary.skip("not_a_file", rel)
            continue
        try:
            data = path.read_bytes()
        except OSError:
            summary.skip("unreadable", rel)
            continue
        if not is_text(data):
            summary.skip("not_text", rel)
            continue
        to = split or split_of(rel, spec.val_fraction, spec.test_fraction)
        if to != "train" and hashlib.sha256(data).digest() in train_content:
            summary.skip("same_as_train", rel)  # a held-out copy of a training file
            continue
        codes = encode(data)
        n = min(codes.shape[1] // spec.frames, spec.max_sequences_per_file)
        if n == 0:
            summary.skip("too_short", rel)
            continue
        for i in range(n):
            writers[to].add(codes[:, i * spec.frames : (i + 1) * spec.frames], f"{rel}#{i}")
        summary.files[to] += 1
        summary.sequences[to] += n
        summary.bytes_read += n * spec.frames
        if summary.bytes_read >= spec.max_bytes:
            summary.capped = f"stopped at {summary.bytes_read:,} bytes (max_bytes)"
            break
    for w in writers.values():
        w.close(summary.to_dict())
    _check_usable(summary, split, option)
    return summary


def _splits(split: str | None) -> tuple[str, ...]:
    if split is not None and split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {SPLITS}")
    return SPLITS if split is None else (split,)


def tokenizer_codes(tokenizer: Any) -> Callable[[bytes], torch.Tensor]:
    """``encode`` for ``read_text_corpus``: a UTF-8 file through a sentencepiece ``tokenizer``,
    one text token per frame (audio rows -1: no input, no loss)."""

    def encode(data: bytes) -> torch.Tensor:
        ids = tokenizer.encode(data.decode("utf-8"))
        out = torch.full((NUM_STREAMS, len(ids)), ZERO_TOKEN, dtype=torch.int32)
        out[0] = torch.tensor(ids, dtype=torch.int32)
        return out

    return encode


def _train_content(root: Path, rels: list[str], spec: CorpusSpec,
                   split: str | None = None) -> set[bytes]:  # fmt: skip
    """The sha256 of every training file's bytes: a validation or held-out file with the same
    content is dropped (counted as ``same_as_train``), so no held-out score is a memorised
    training file."""
    out: set[bytes] = set()
    if split is not None:  # one split given: no other split to compare with
        return out
    for rel in rels:
        if split_of(rel, spec.val_fraction, spec.test_fraction) != "train":
            continue
        try:
            out.add(hashlib.sha256((root / rel).read_bytes()).digest())
        except OSError:
            continue
    return out


def _codes_digest(codes: torch.Tensor) -> bytes:
    return hashlib.sha256(codes.to(torch.int64).contiguous().numpy().tobytes()).digest()


def read_shards_corpus(
    root: str | Path,
    spec: CorpusSpec,
    out_dir: str | Path,
    progress: bool = False,
    split: str | None = None,
    option: str = "--data",
) -> CorpusSummary:
    """A moshi-ttt shards directory (``moshi-ttt tokenize``) split by the hash of each file's
    recorded path (or all into ``split``), cut into sequences of ``spec.frames`` frames like
    text files."""
    src = ShardSource(root)
    summary = CorpusSummary(root=str(root), kind="shards", frames=spec.frames)
    writers = {s: _ShardWriter(Path(out_dir) / s, str(root)) for s in _splits(split)}
    order = sorted(range(len(src)), key=lambda i: _hash_key(str(src.files[i].get("path", i))))
    if len(order) > spec.max_files:
        summary.capped = f"read {spec.max_files} of {len(order)} files (max_files)"
        order = order[: spec.max_files]
    names = [str(src.files[i].get("path", src.shards[i])) for i in order]
    splits = [split or split_of(rel, spec.val_fraction, spec.test_fraction) for rel in names]
    train_content = set()
    for i, to in zip(order, splits):
        if to == "train" and split is None:
            try:
                train_content.add(_codes_digest(src.read(i)))
            except Exception:  # BadFile: reported below
                continue
    for i, rel, to in tqdm(list(zip(order, names, splits)), desc="reading shards",
                           unit="file", disable=not progress):  # fmt: skip
        try:
            codes = src.read(i)
        except Exception:  # BadFile: missing or unreadable shard
            summary.skip("unreadable", rel)
            continue
        if to != "train" and _codes_digest(codes) in train_content:
            summary.skip("same_as_train", rel)
            continue
        n = min(codes.shape[1] // spec.frames, spec.max_sequences_per_file)
        if n == 0:
            summary.skip("too_short", rel)
            continue
        for k in range(n):
            writers[to].add(codes[:, k * spec.frames : (k + 1) * spec.frames].int(), f"{rel}#{k}")
        summary.files[to] += 1
        summary.sequences[to] += n
        summary.bytes_read += n * spec.frames
    for w in writers.values():
        w.close(summary.to_dict())
    _check_usable(summary, split, option)
    return summary


def check_corpus_root(root: Path, option: str = "--data") -> None:
    """``--data``: an existing directory (of text files, or a shards directory)."""
    if not root.exists():
        raise DataError(
            f"{option} {root}: no such file or directory; expected a directory of text files "
            "(read recursively, bytes as text tokens) or a moshi-ttt shards directory"
        )
    if not root.is_dir():
        raise DataError(
            f"{option} {root}: not a directory; expected a directory of text files (read "
            "recursively) or a moshi-ttt shards directory (with shards.json)"
        )


def read_corpus(
    root: str | Path,
    spec: CorpusSpec,
    out_dir: str | Path,
    progress: bool = False,
    split: str | None = None,
    encode: Callable[[bytes], torch.Tensor] = bytes_to_codes,
    option: str = "--data",
) -> CorpusSummary:
    """``read_shards_corpus`` for a shards directory, ``read_text_corpus`` (with ``encode``)
    for anything else; ``split``: all files into that split. A JSONL index of audio is refused
    with the command that tokenizes it."""
    root = Path(root)
    if root.is_file() and root.suffix == ".jsonl":
        raise DataError(
            f"{option} {root}: a JSONL index of audio must be tokenized first (Mimi + the text "
            f"tokenizer): moshi-ttt tokenize {root} SHARDS_DIR --base MODEL, then --data "
            "SHARDS_DIR"
        )
    if root.is_file() and root.name == SHARDS_INDEX:
        root = root.parent
    check_corpus_root(root, option)
    if (root / SHARDS_INDEX).is_file():
        return read_shards_corpus(root, spec, out_dir, progress, split, option)
    return read_text_corpus(root, spec, out_dir, progress, split, encode, option)


def _check_usable(summary: CorpusSummary, split: str | None = None,
                  option: str = "--data") -> None:  # fmt: skip
    missing = [s for s in _splits(split) if summary.sequences[s] == 0]
    if not missing:
        return
    total = sum(summary.sequences.values())
    skipped = ", ".join(f"{n} {r}" for r, n in sorted(summary.skipped.items())) or "none"
    what = ("text files (UTF-8, no NUL bytes)" if summary.kind == "text"
            else "shards")  # fmt: skip
    where = "split" if split is None else "split (every file of it)"
    raise DataError(
        f"{option} {summary.root}: {total} usable sequences of {summary.frames} frames, none "
        f"in the {'/'.join(missing)} {where}; expected {what} of at least {summary.frames} "
        f"frames each (text: one byte, or one token of the model's tokenizer, per frame), "
        f"enough of them for every split (about 10 files or more; files skipped: {skipped}). "
        f"Point {option} at a larger directory; shorter files are skipped"
    )


class _ShardWriter:
    """Writes one sequence per ``NNNNNN.safetensors`` and ``shards.json`` last (atomic)."""

    def __init__(self, out: Path, index: str) -> None:
        self.out, self.index, self.files = out, index, []
        out.mkdir(parents=True, exist_ok=True)

    def add(self, codes: torch.Tensor, name: str) -> None:
        shard = f"{len(self.files):06d}.safetensors"
        tmp = self.out / f".{shard}.tmp"
        save_file({"codes": codes.contiguous()}, str(tmp), metadata={"path": name})
        os.replace(tmp, self.out / shard)
        self.files.append({"shard": shard, "path": name, "frames": int(codes.shape[1])})

    def close(self, summary: dict) -> None:
        index = {"format": "moshi-ttt shards", "version": 1, "index": self.index,
                 "frame_rate": FRAME_RATE, "corpus_kind": summary["kind"],
                 "corpus": summary, "files": self.files, "skipped": [],
                 "stats": {"files_ok": len(self.files), "files_bad": 0}}  # fmt: skip
        tmp = self.out / f".{SHARDS_INDEX}.tmp"
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, self.out / SHARDS_INDEX)


def default_corpus() -> Path:
    """The embedded default: this interpreter's standard library (``sys.executable``'s)."""
    path = stdlib_dir()
    if not path.is_dir():  # pragma: no cover - every CPython has one
        raise DataError(f"the standard library of {sys.executable} is not at {path}")
    return path
