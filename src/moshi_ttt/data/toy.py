"""A toy dataset in the moshi-finetune format, for trying the pipeline without real data.

``write_toy_dataset(root, durations)`` writes stereo 24 kHz wavs (left, "Moshi": a sine whose
loudness changes; right, "the user": noise), a word-alignment ``.json`` beside each, and
``root/index.jsonl``. ``bad`` adds broken files of a given kind (to see them skipped and
counted): ``corrupt``, ``empty``, ``mono``, ``short``, ``bad_json``, ``no_json``, ``missing``.
Used by ``configs/tiny.yaml`` (``moshi-ttt toy-data``) and by the tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import sphn

from ..format import SAMPLE_RATE
from .files import MAIN_SPEAKER

OTHER_SPEAKER = "SPEAKER_OTHER"
WORDS = [
    ["hello", [0.1, 0.4], MAIN_SPEAKER],
    ["there", [0.3, 0.6], OTHER_SPEAKER],
    ["general", [0.7, 1.2], MAIN_SPEAKER],
    ["kenobi", [1.5, 2.0], MAIN_SPEAKER],
]
BAD_KINDS = ("corrupt", "empty", "mono", "short", "bad_json", "no_json", "missing")


def write_stereo(path: str | Path, seconds: float, seed: int, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Write a 16-bit stereo wav of ``seconds``; returns the samples ``[2, S]`` float32."""
    n = int(round(seconds * sr))
    rng = np.random.default_rng(seed)
    t = np.arange(n) / sr
    left = 0.4 * np.sin(2 * np.pi * (110 + 40 * seed) * t) * (0.5 + 0.5 * np.sin(2 * np.pi * t))
    right = 0.2 * rng.standard_normal(n)
    data = np.stack([left, right]).astype(np.float32)
    sphn.write_wav(str(path), data, sr)
    return data


def write_alignments(path: str | Path, words: list) -> None:
    """The ``.json`` word alignments beside audio file ``path``."""
    Path(path).with_suffix(".json").write_text(json.dumps({"alignments": words}))


def _words_for(seconds: float) -> list:
    """``WORDS`` repeated every 2 s over ``seconds``."""
    out = []
    for k in range(max(1, int(seconds // 2))):
        out += [[w, [a + 2 * k, b + 2 * k], s] for w, (a, b), s in WORDS]
    return out


def write_toy_dataset(
    root: str | Path,
    durations: list[float],
    bad: dict[str, str] | None = None,
    index_name: str = "index.jsonl",
    seed: int = 0,
) -> Path:
    """``root/index_name`` listing good files of the given durations (s) and the ``bad`` ones
    (name -> kind, one of ``BAD_KINDS``). Returns the index path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, d in enumerate(durations):
        wav = root / (f"good_{i}.wav" if seed == 0 else f"good_{seed}_{i}.wav")
        write_stereo(wav, d, seed=seed + i)
        write_alignments(wav, _words_for(d))
        lines.append({"path": wav.name, "duration": d})
    for name, kind in (bad or {}).items():
        if kind not in BAD_KINDS:
            raise ValueError(f"bad file kind {kind!r}: expected one of {BAD_KINDS}")
        wav = root / f"{name}.wav"
        if kind == "corrupt":
            wav.write_bytes(b"RIFF\x00\x01garbage" * 50)
        elif kind == "empty":
            wav.write_bytes(b"")
        elif kind == "mono":
            sphn.write_wav(str(wav), np.zeros((1, SAMPLE_RATE * 2), np.float32), SAMPLE_RATE)
        elif kind == "short":
            write_stereo(wav, 0.5, seed=9)
        elif kind == "bad_json":
            write_stereo(wav, 2.0, seed=9)
            wav.with_suffix(".json").write_text('{"alignments": [["w", 0.1, "x"]]}')
        elif kind == "no_json":
            write_stereo(wav, 2.0, seed=9)
        if kind not in ("corrupt", "empty", "mono", "missing", "no_json", "bad_json"):
            write_alignments(wav, WORDS)
        lines.append({"path": wav.name, "duration": 2.0})
    index = root / index_name
    index.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return index
