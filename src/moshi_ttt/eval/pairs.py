"""Pairwise likelihood benchmarks: read the public layouts, pair by id, compute accuracies.

Layouts, as distributed:

- sWUGGY, ZeroSpeech 2021 ``lexical/{dev,test}/``: ``gold.csv`` (``filename, word, phones,
  length, frequency, voice, id, correct``) and one ``<filename>.wav`` per row. A pair is the word
  (``correct`` 1) and the non-word (0) with the same **(voice, id)**.
- sBLIMP, ZeroSpeech 2021 ``syntactic/{dev,test}/``: ``gold.csv`` (``filename, type, subtype,
  transcription, voice, id, correct``); a pair is joined on **(voice, type, subtype, id)**.
- sStoryCloze / tStoryCloze: ``<n>_<uuid>_correct.wav`` and ``<n>_<uuid>_incorrect.wav``
  (any depth; each sub-directory, e.g. ``sSC/`` and ``tSC/``, is a subset).

Rows are joined on their ids, never by CSV row order (the official loader pairs by position).

Accuracy (``pair_accuracy``): a pair scores 1 if the positive item is more likely, 0.5 on a
tie, 0 otherwise. As in the official ZeroSpeech scorer, the pairs of one *group* (the same
item in several voices: sWUGGY ``id``, sBLIMP ``(type, subtype, id)``) are averaged first, and a
subset's accuracy is the mean over its groups. sWUGGY "in-vocab" is the official count-weighted
mean over the frequency bands without "oov", i.e. the mean over the groups whose word occurs in
LibriSpeech (``frequency`` >= 1).
"""

from __future__ import annotations

import csv
import math
import random
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .likelihood import Score
from .stats import mean_interval

AUDIO_EXTENSIONS = (".wav", ".flac")
FREQUENCY_BANDS = (
    (0, 1, "oov"),
    (1, 5, "1-5"),
    (5, 20, "6-20"),
    (20, 100, "21-100"),
    (100, math.inf, ">100"),
)
LEXICAL_COLUMNS = ("filename", "voice", "id", "correct")
SYNTACTIC_COLUMNS = ("filename", "type", "subtype", "voice", "id", "correct")
_STORY = re.compile(r"^(?P<key>.+)_(?P<label>correct|incorrect)$")


@dataclass(frozen=True)
class Pair:
    """One comparison: ``positive`` should be more likely than ``negative``.

    ``key`` is unique in its set (e.g. ``"voice/id"``); pairs with the same ``group`` are
    averaged before the accuracy; ``subsets`` are the subsets it counts in ("all" first);
    ``tags`` the cells of the finer breakdown tables (``"subtype agreement/a1"``, ...).
    """

    key: str
    positive: Path
    negative: Path
    group: str
    subsets: tuple[str, ...] = ("all",)
    tags: tuple[str, ...] = ()  # breakdown cells (sBLIMP subtype, sWUGGY length, ...)


@dataclass
class PairSet:
    """The pairs of one benchmark, read from ``source``; ``problems`` lists the entries that
    could not be paired (one side only, duplicates), never fatal."""

    name: str
    source: Path
    pairs: list[Pair]
    problems: list[str] = field(default_factory=list)
    subsets: list[str] = field(default_factory=list)  # report order, "all" first
    split: str = ""  # ZeroSpeech split ("dev", "test"); "" where the benchmark has none

    def paths(self) -> list[Path]:
        """Every audio file of the pairs, once, in pair order."""
        return list(dict.fromkeys(p for pair in self.pairs for p in (pair.positive, pair.negative)))

    def sample(self, max_pairs: int | None, seed: int = 0) -> PairSet:
        """Whole groups drawn at random (``seed``) until ``max_pairs`` pairs are reached."""
        if max_pairs is None or max_pairs >= len(self.pairs):
            return self
        if max_pairs < 1:
            raise ValueError(f"max_pairs must be positive, got {max_pairs}")
        groups: dict[str, list[Pair]] = defaultdict(list)
        for pair in self.pairs:
            groups[pair.group].append(pair)
        order = sorted(groups)
        random.Random(seed).shuffle(order)
        chosen: list[Pair] = []
        for g in order:
            if len(chosen) >= max_pairs:
                break
            chosen.extend(groups[g])
        return PairSet(self.name, self.source, chosen, self.problems, self.subsets, self.split)


# -- ZeroSpeech 2021 --------------------------------------------------------------------------
def find_gold(data: str | Path, part: str, split: str = "dev") -> Path:
    """The ``gold.csv`` of a ZeroSpeech 2021 ``part`` ("lexical" or "syntactic"): ``data`` may be
    the split directory, ``<part>/`` or the dataset root."""
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory not found: {root}")
    candidates = [root / "gold.csv", root / split / "gold.csv", root / part / split / "gold.csv"]
    for gold in candidates:
        if gold.is_file():
            return gold
    hint = " (the test gold is not distributed with the audio)" if split == "test" else ""
    raise FileNotFoundError(
        f"no gold.csv under {root}: expected one of {', '.join(map(str, candidates))} "
        f"(ZeroSpeech 2021 layout {part}/{split}/gold.csv + one wav per row){hint}"
    )


def read_gold(gold: Path, columns: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a gold.csv as dicts; ``ValueError`` naming the file if it is empty, lacks one of
    ``columns``, or has a ``correct`` other than 0/1."""
    with open(gold, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in columns if c not in header]
        if not header:
            raise ValueError(f"{gold}: empty file; expected a CSV header with {', '.join(columns)}")
        if missing:
            raise ValueError(
                f"{gold}: missing column(s) {', '.join(missing)}; expected {', '.join(columns)} "
                f"(found {', '.join(header)})"
            )
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    if not rows:
        raise ValueError(f"{gold}: no rows after the header; expected one row per audio file")
    for line, row in enumerate(rows, start=2):
        if row["correct"] not in ("0", "1", "0.0", "1.0", "True", "False"):
            raise ValueError(f"{gold}:{line}: correct must be 0 or 1, got {row['correct']!r}")
        row["correct"] = "1" if row["correct"] in ("1", "1.0", "True") else "0"
    return rows


def audio_path(directory: Path, filename: str) -> Path:
    """``directory/filename`` with the first existing audio extension (``.wav`` if none)."""
    base = directory / filename
    if base.suffix.lower() in AUDIO_EXTENSIONS:
        return base
    for ext in AUDIO_EXTENSIONS:
        if base.with_name(base.name + ext).is_file():
            return base.with_name(base.name + ext)
    return base.with_name(base.name + ".wav")


def _join(
    rows: list[dict[str, str]], key_columns: Sequence[str], gold: Path
) -> tuple[dict[tuple[str, ...], tuple[dict, dict]], list[str]]:
    """Rows joined on ``key_columns``: key -> (correct row, incorrect row), plus problems."""
    sides: dict[tuple[str, ...], dict[str, list[dict]]] = defaultdict(lambda: {"1": [], "0": []})
    for row in rows:
        sides[tuple(row[c] for c in key_columns)][row["correct"]].append(row)
    joined, problems = {}, []
    for key, by in sides.items():
        name = "/".join(key)
        if len(by["1"]) == 1 and len(by["0"]) == 1:
            joined[key] = (by["1"][0], by["0"][0])
        else:
            files = ", ".join(r["filename"] for r in by["1"] + by["0"])
            problems.append(
                f"{gold.name} {'/'.join(key_columns)}={name}: {len(by['1'])} correct and "
                f"{len(by['0'])} incorrect rows ({files}); expected one of each"
            )
    return joined, problems


def frequency_band(frequency: str) -> str | None:
    """The official sWUGGY frequency band of a LibriSpeech count (None if not a number)."""
    try:
        f = float(frequency)
    except ValueError:
        return None
    return next((name for lo, hi, name in FREQUENCY_BANDS if lo <= f < hi), None)


def read_zerospeech_lexical(data: str | Path, split: str = "dev") -> PairSet:
    """sWUGGY pairs (word, non-word) joined on (voice, id); group = id; subsets: all,
    in-vocab (word frequency >= 1) and the frequency bands."""
    gold = find_gold(data, "lexical", split)
    rows = read_gold(gold, LEXICAL_COLUMNS)
    joined, problems = _join(rows, ("voice", "id"), gold)
    pairs = []
    for (voice, id_), (word, nonword) in sorted(joined.items()):
        band = frequency_band(word.get("frequency", ""))
        extra = () if band is None else ((band,) if band == "oov" else ("in-vocab", band))
        length = word.get("length", "").strip()
        tags = (f"length {int(float(length))} phones",) if _is_number(length) else ()
        pairs.append(
            Pair(
                f"{voice}/{id_}",
                audio_path(gold.parent, word["filename"]),
                audio_path(gold.parent, nonword["filename"]),
                id_,
                ("all", *extra),
                tags,
            )
        )
    subsets = ["all", "in-vocab", *(name for _, _, name in FREQUENCY_BANDS)]
    return PairSet("swuggy", gold, pairs, problems, _present(subsets, pairs), split)


def read_zerospeech_syntactic(data: str | Path, split: str = "dev") -> PairSet:
    """sBLIMP pairs joined on (voice, type, subtype, id); group = (type, subtype, id);
    subsets: all and each ``type``."""
    gold = find_gold(data, "syntactic", split)
    rows = read_gold(gold, SYNTACTIC_COLUMNS)
    joined, problems = _join(rows, ("voice", "type", "subtype", "id"), gold)
    pairs = [
        Pair(
            f"{voice}/{type_}/{sub}/{id_}",
            audio_path(gold.parent, good["filename"]),
            audio_path(gold.parent, bad["filename"]),
            f"{type_}/{sub}/{id_}",
            ("all", type_),
            (f"subtype {type_}/{sub}",),
        )
        for (voice, type_, sub, id_), (good, bad) in sorted(joined.items())
    ]
    types = sorted({p.subsets[1] for p in pairs})
    return PairSet("sblimp", gold, pairs, problems, ["all", *types], split)


# -- Spoken StoryCloze --------------------------------------------------------------------------
def read_storycloze(data: str | Path) -> PairSet:
    """s/tStoryCloze pairs ``<n>_<uuid>_correct`` / ``_incorrect`` (wav or flac), joined on the
    ``<n>_<uuid>`` stem within a directory; each sub-directory holding pairs is a subset."""
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory not found: {root}")
    sides: dict[tuple[str, str], dict[str, Path]] = defaultdict(dict)
    for path in sorted(root.rglob("*")):
        m = _STORY.match(path.stem)
        if m and path.suffix.lower() in AUDIO_EXTENSIONS:
            folder = path.parent.relative_to(root).as_posix()
            sides[(folder, m["key"])][m["label"]] = path
    if not sides:
        raise FileNotFoundError(
            f"no StoryCloze audio under {root}: expected <n>_<uuid>_correct.wav and "
            "<n>_<uuid>_incorrect.wav files (sStoryCloze / tStoryCloze layout)"
        )
    pairs, problems = [], []
    folders = sorted({folder for folder, _ in sides})
    for (folder, key), by in sorted(sides.items()):
        name = f"{folder}/{key}" if folder != "." else key
        if "correct" in by and "incorrect" in by:
            subsets = ("all",) if len(folders) == 1 else ("all", folder)
            pairs.append(Pair(name, by["correct"], by["incorrect"], name, subsets))
        else:
            missing = "incorrect" if "correct" in by else "correct"
            problems.append(f"{name}: no _{missing} file beside {next(iter(by.values())).name}")
    subsets = ["all"] if len(folders) == 1 else ["all", *folders]
    return PairSet("storycloze", root, pairs, problems, subsets)


# -- accuracy ---------------------------------------------------------------------------------
def pair_outcome(positive: float, negative: float) -> float:
    """1 if ``positive > negative``, 0.5 on a tie, 0 otherwise."""
    return 1.0 if positive > negative else 0.5 if positive == negative else 0.0


def pair_accuracy(
    pairs: Sequence[Pair],
    scores: dict[str, Score],
    reduction: str = "mean",
    codebooks: Sequence[int] = (0,),
    subsets: Sequence[str] | None = None,
    tags: dict[str, tuple[str, ...]] | None = None,
    text: bool = False,
) -> dict[str, Any]:
    """Accuracy per subset from per-file ``scores`` (``str(path) -> Score``) of ``codebooks``
    (plus the text tokens where ``text``: score ``text+audio``), reduced by ``reduction``.

    A pair whose file has no score (bad file) or a non-finite value (no scored token) is
    dropped and counted. Returns ``{"subsets": {name: {"accuracy", "n_pairs", "n_groups"}},
    "intervals": {name: mean_interval of its group means (bootstrap over groups)},
    "breakdown": {tag: {"accuracy", "n_pairs", "n_groups", "lo", "hi", "n"}} (``Pair.tags``,
    or ``tags[pair key]`` where given; a "note" under 5 groups), "dropped_pairs": int,
    "outcomes": {pair key: 0 | 0.5 | 1}, "margins": {pair key: positive - negative},
    "group_means": {group: mean outcome}}``;
    an empty subset has accuracy NaN.
    """
    group_scores: dict[str, list[float]] = defaultdict(list)
    group_subsets: dict[str, tuple[str, ...]] = {}
    group_tags: dict[str, set[str]] = defaultdict(set)
    outcomes, margins, dropped = {}, {}, 0
    for pair in pairs:
        sp, sn = scores.get(str(pair.positive)), scores.get(str(pair.negative))
        if sp is None or sn is None:
            dropped += 1
            continue
        vp, vn = sp.value(reduction, codebooks, text), sn.value(reduction, codebooks, text)
        if not (math.isfinite(vp) and math.isfinite(vn)):
            dropped += 1
            continue
        outcomes[pair.key] = pair_outcome(vp, vn)
        margins[pair.key] = vp - vn
        group_scores[pair.group].append(outcomes[pair.key])
        group_subsets[pair.group] = pair.subsets
        group_tags[pair.group].update(pair.tags if tags is None else tags.get(pair.key, ()))
    means = {g: sum(v) / len(v) for g, v in group_scores.items()}
    names = list(subsets) if subsets is not None else ["all"]
    for subs in group_subsets.values():
        names.extend(s for s in subs if s not in names)

    def cell(groups: list[str]) -> dict[str, Any]:
        vals = [means[g] for g in groups]
        return {
            "accuracy": sum(vals) / len(vals) if vals else float("nan"),
            "n_pairs": sum(len(group_scores[g]) for g in groups),
            "n_groups": len(groups),
        }

    table, intervals = {}, {}
    for name in names:
        groups = [g for g, subs in group_subsets.items() if name in subs]
        table[name] = cell(groups)
        intervals[name] = mean_interval([means[g] for g in groups], unit="groups")
    breakdown = {}
    for tag in sorted({t for ts in group_tags.values() for t in ts}, key=_natural):
        groups = [g for g, ts in group_tags.items() if tag in ts]
        ci = mean_interval([means[g] for g in groups], unit="groups")
        breakdown[tag] = cell(groups) | {k: ci[k] for k in ("lo", "hi", "n", "note") if k in ci}
    return {
        "subsets": table,
        "intervals": intervals,
        "breakdown": breakdown,
        "dropped_pairs": dropped,
        "outcomes": outcomes,
        "margins": margins,
        "group_means": means,
    }


def _natural(text: str) -> list[Any]:
    """Sort key with numbers compared as numbers (``length 10`` after ``length 9``)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _present(names: list[str], pairs: list[Pair]) -> list[str]:
    used = {s for p in pairs for s in p.subsets}
    return [n for n in names if n == "all" or n in used]
