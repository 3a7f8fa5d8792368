"""Needles in real text: a phrase ``" key=value;"`` (random lowercase key, random hex value)
planted in held-out files and asked again windows later (``eval.recall.needle_shares``), and the
same phrases planted in the base's training files, stated and repeated *inside* the window, so
the frozen base learns to copy a value it can see (without that there is no ceiling to measure
against).

Planting overwrites bytes (a sequence keeps its length); every case is drawn from the seed and
the file's name, so the same files give the same needles in every row.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..data.files import DataError
from ..data.pipeline import SHARDS_INDEX, ShardSource
from .corpus import bytes_to_codes

KEY_ALPHABET = b"abcdefghijklmnopqrstuvwxyz"
VALUE_ALPHABET = b"0123456789abcdef"


@dataclass(frozen=True)
class NeedleSpec:
    """``distances``: the query's distance from the first phrase, in windows C; ``lead``:
    frames of text before the first phrase; ``files``: held-out files used (at most);
    ``inside``: the ceiling's distance, frames (0: a quarter window, at least the phrase)."""

    distances: tuple[int, ...] = (2, 4, 8)
    key_len: int = 6
    value_len: int = 6
    lead: int = 16
    files: int = 16
    inside: int = 0

    def phrase_len(self) -> int:
        return len(phrase(b"k" * self.key_len, b"v" * self.value_len))

    def inside_distance(self, context: int) -> int:
        d = self.inside or max(self.phrase_len() + 1, context // 4)
        if d + self.phrase_len() > context:
            raise ValueError(
                f"needle: the phrase ({self.phrase_len()} bytes: key {self.key_len}, value "
                f"{self.value_len}) repeated {d} frames later does not fit the window of "
                f"{context} frames; use a shorter key/value or a longer window"
            )
        return d

    def frames(self, m: int, context: int) -> int:
        """Frames of the case at distance ``m`` windows (ends with the query phrase)."""
        return self.lead + m * context + self.phrase_len()


def phrase(key: bytes, value: bytes) -> bytes:
    return b" " + key + b"=" + value + b";"


def value_offset(key_len: int) -> int:
    """Offset of the value's first byte in ``phrase``."""
    return 1 + key_len + 1


def _draw(rng: random.Random, alphabet: bytes, n: int) -> bytes:
    return bytes(rng.choice(alphabet) for _ in range(n))


def _rng(seed: int, name: str) -> random.Random:
    digest = hashlib.sha256(f"needle:{seed}:{name}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _plant(codes: torch.Tensor, pos: int, text: bytes) -> None:
    codes[0, pos : pos + len(text)] = bytes_to_codes(text)[0].to(codes)


def file_texts(split_dir: Path, frames: int) -> list[tuple[str, torch.Tensor]]:
    """Each file of a split with its sequences put back together in order (they are
    consecutive pieces of the file), when it has at least ``frames`` frames."""
    src = ShardSource(split_dir)
    by_file: dict[str, list[tuple[int, int]]] = {}
    for i, f in enumerate(src.files):
        path, k = str(f["path"]).rsplit("#", 1)
        by_file.setdefault(path, []).append((int(k), i))
    out = []
    for path, parts in sorted(by_file.items()):
        parts.sort()
        if [k for k, _ in parts] != list(range(len(parts))):
            continue  # a gap: not contiguous
        total = sum(src.frames[i] for _, i in parts)
        if total >= frames:
            out.append((path, torch.cat([src.codes(i) for _, i in parts], dim=1)[:, :frames]))
    return out


Files = list[tuple[str, torch.Tensor]]


def needle_cases(split_dir: Path, context: int, spec: NeedleSpec,
                 seed: int) -> tuple[dict[str, Files], dict[str, dict]]:  # fmt: skip
    """``(cases, masks)``: per variant (``true_{m}x``, ``floor_{m}x`` per distance m,
    ``inside``) the files ``[(name, codes)]`` and per file the scored positions (the query's
    value bytes). ``DataError`` (naming the split and what is needed) when fewer than 5 files
    are long enough for the largest distance."""
    longest = max(spec.frames(m, context) for m in spec.distances)
    d_in = spec.inside_distance(context)
    files = file_texts(split_dir, longest)[: spec.files]
    if len(files) < 5:
        raise DataError(
            f"{split_dir}: {len(files)} held-out file(s) of at least {longest} bytes; the needle "
            f"at {max(spec.distances)} windows needs 5 or more (lower the largest needle "
            f"distance, or use a corpus with longer files)"
        )
    cases: dict[str, list] = {}
    masks: dict[str, dict] = {}
    off = value_offset(spec.key_len)
    for name, codes in files:
        rng = _rng(seed, name)
        key, value = (
            _draw(rng, KEY_ALPHABET, spec.key_len),
            _draw(rng, VALUE_ALPHABET, spec.value_len),
        )
        key2 = key
        while key2 == key:
            key2 = _draw(rng, KEY_ALPHABET, spec.key_len)
        value2 = _draw(rng, VALUE_ALPHABET, spec.value_len)
        needle, other = phrase(key, value), phrase(key2, value2)
        p0 = spec.lead
        plans = {"inside": (p0 + d_in, needle)}
        for m in spec.distances:
            plans[f"true_{m}x"] = (p0 + m * context, needle)
            plans[f"floor_{m}x"] = (p0 + m * context, other)
        for variant, (q, early) in plans.items():
            c = codes[:, : q + len(needle)].clone()
            _plant(c, p0, early)
            _plant(c, q, needle)
            mask = torch.zeros(c.shape[-1], dtype=torch.bool)
            mask[q + off : q + off + spec.value_len] = True
            cases.setdefault(variant, []).append((name, c))
            masks.setdefault(variant, {})[name] = mask.numpy()
    return cases, masks


def plant_training_phrases(train_dir: Path, context: int, spec: NeedleSpec, fraction: float,
                           seed: int, per_sequence: int = 4) -> int:  # fmt: skip
    """Plant ``per_sequence`` phrases, each with its repeat at most a window later (both inside
    it), in ``fraction`` of the training sequences of ``train_dir`` (in place; each pair in its
    own segment of the sequence); returns how many sequences were changed. The shards index
    records it (``"needles"``)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"train_needles must be a fraction in [0, 1], got {fraction}")
    src = ShardSource(train_dir)
    n_phrase = spec.phrase_len()
    changed = 0
    for i, f in enumerate(src.files):
        rng = _rng(seed, "train:" + str(f["path"]))
        T = src.frames[i]
        seg = T // max(1, per_sequence)
        if rng.random() >= fraction or context < 2 * n_phrase + 1 or seg < 2 * n_phrase + 1:
            continue
        path = src.root / src.shards[i]
        codes = load_file(str(path))["codes"]
        for k in range(per_sequence):
            d = rng.randint(n_phrase + 1, min(context, seg) - n_phrase)
            p = k * seg + rng.randint(0, seg - d - n_phrase)
            text = phrase(_draw(rng, KEY_ALPHABET, spec.key_len),
                          _draw(rng, VALUE_ALPHABET, spec.value_len))  # fmt: skip
            _plant(codes, p, text)
            _plant(codes, p + d, text)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({"codes": codes.contiguous()}, str(tmp), metadata={"path": str(f["path"])})
        os.replace(tmp, path)
        changed += 1
    index = src.root / SHARDS_INDEX
    data = json.loads(index.read_text())
    data["needles"] = {"fraction": fraction, "per_sequence": per_sequence, "seed": seed,
                       "changed": changed, "key_len": spec.key_len,
                       "value_len": spec.value_len}  # fmt: skip
    index.write_text(json.dumps(data, indent=1))
    return changed
