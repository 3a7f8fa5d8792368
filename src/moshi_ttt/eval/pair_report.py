"""sBLIMP / sWUGGY / StoryCloze: score the files of a ``PairSet``, write the report.

``evaluate_pairs`` (the library entry point of ``moshi-ttt eval sblimp | swuggy | storycloze``,
whose shell is ``cli/eval_pairs.py``) writes ``OUT/report.md``, ``OUT/report.json``
(``accuracy``: the headline), per-file ``OUT/scores.csv`` and the plots.

``protocol_sweep`` (``--protocol-sweep``) scores the same pairs under every valid protocol of
``protocol_grid`` (text fill x codebook set x reduction x scored streams): one forward pass per
text fill, the rest read out of its per-file, per-codebook scores.
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Any

from .likelihood import (
    REDUCTIONS,
    SCORED,
    TEXT_FILLS,
    TEXT_PAD,
    CodeCache,
    Score,
    ScoringConfig,
    codebooks_label,
    score_audio,
    stream_size,
)
from .pairs import Pair, PairSet, pair_accuracy
from .report import Report
from .stats import fmt_interval, no_interval

TITLES = {
    "swuggy": "sWUGGY (ZeroSpeech 2021 lexical)",
    "sblimp": "sBLIMP (ZeroSpeech 2021 syntactic)",
    "storycloze": "Spoken StoryCloze (sSC / tSC)",
}
# Published accuracies (%) from ../shared/reference/evaluation.md; protocols differ (see there).
# One Moshi variant per table: the text+audio *pretrained* model of Table 7 (the row usually
# cited), never the released moshiko/moshika weights, which went through further stages.
THIRD_PARTY = "Moshi stream, -1 elsewhere, ×100-weighted mean"
MOSHI_T7 = "Moshi text+audio pretrained (2410.00037 T7; not the released weights)"
MOSHI_LATE = "Moshi after multi-stream / synthetic-voice stages (T7, unverified)"
MOSHI_PUBLIC = "public moshiko weights, 3rd-party run"
PUBLISHED: dict[str, list[tuple[str, str, str]]] = {
    "swuggy": [
        (MOSHI_T7, "72.6 (unverified)", "protocol not public; 'all'"),
        (MOSHI_LATE, "≈63.0 / ≈60.9", "protocol not public"),
        (f"{MOSHI_PUBLIC} (n = 2000)", "63.35", THIRD_PARTY),
        ("TWIST-13B", "74.5 (in-vocab 84.1)", "all vs in-vocab"),
        ("SpiritLM base 7B", "69.0 / 71.4", "mean / sum"),
        ("GSLM", "64.8", "mean"),
    ],
    "sblimp": [
        (MOSHI_T7, "58.8", "protocol not public"),
        (MOSHI_LATE, "≈55.2 / ≈54.6", "protocol not public"),
        (f"{MOSHI_PUBLIC} (n = 1000)", "54.5", THIRD_PARTY),
        ("TWIST-7B / 13B", "59.0 / 59.2", ""),
        ("SpiritLM base 7B", "58.3 / 63.2", "mean / sum"),
        ("GSLM", "54.2", "mean"),
    ],
    "storycloze": [
        (MOSHI_T7, "sSC 60.8, tSC 83.0", "protocol not public"),
        (MOSHI_LATE, "sSC ≈62.7 / ≈60.9, tSC ≈83.6 / ≈82.5", "protocol not public"),
        (f"{MOSHI_PUBLIC} (n = 1871)", "sSC 60.93, tSC 80.06", THIRD_PARTY),
        ("TWIST-7B", "sSC 55.3, tSC 74.1", ""),
        ("SpiritLM base 7B", "sSC 61.0 / 56.2, tSC 82.9 / 69.2", "mean / sum"),
        ("GSLM", "sSC 53.3, tSC 66.6", "mean"),
    ],
}
GROUPING = {
    "swuggy": "word / non-word pairs joined on (voice, id); the voices of an id are averaged, "
    "then the ids (official `by_pair`); in-vocab = ids whose word has LibriSpeech frequency "
    ">= 1 (the official count-weighted mean over bands without oov)",
    "sblimp": "pairs joined on (voice, type, subtype, id); the voices are averaged per "
    "(type, subtype, id), then those (official `by_pair`); per type the same over its groups",
    "storycloze": "one pair per story (`<n>_<uuid>_correct` vs `_incorrect`, whole story: "
    "prompt + ending); each sub-directory (e.g. sSC, tSC) is a subset",
}


def evaluate_pairs(
    pairs: PairSet,
    lm: Any,
    mimi: Any,
    out_dir: str | Path,
    config: ScoringConfig | None = None,
    reduction: str = "mean",
    batch_size: int = 16,
    progress: bool = True,
    model: str = "",
    setup: dict[str, Any] | None = None,
    sweep: bool = False,
) -> dict[str, Any]:
    """Score every file of ``pairs``, write the report to ``out_dir``, return its JSON data:
    ``accuracy`` (subset "all", ``reduction``), ``subsets`` (per subset: accuracy_mean,
    accuracy_sum, n_pairs, n_groups), ``alternatives`` (other codebook choices), bad files;
    ``setup`` (e.g. the command that made it) is recorded as it is, but for its
    ``provenance`` (``models.provenance.provenance``), which becomes report.json's
    ``provenance``. ``sweep``: also
    ``protocol_sweep`` (report.json ``sweep``, a "Protocol sweep" section)."""
    config = config or ScoringConfig()
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    start = time.perf_counter()
    cache: CodeCache = {}
    scores, bad = score_audio(lm, mimi, pairs.paths(), config, batch_size, progress, cache)
    wall = time.perf_counter() - start
    text = config.score == "text+audio"
    tags = story_length_tags(pairs.pairs, scores) if pairs.name == "storycloze" else None
    acc = {
        r: pair_accuracy(pairs.pairs, scores, r, config.codebooks, pairs.subsets, tags, text)
        for r in REDUCTIONS
    }
    subsets = {
        name: {
            "accuracy": acc[reduction]["subsets"][name]["accuracy"],
            "accuracy_mean": row["accuracy"],
            "accuracy_sum": acc["sum"]["subsets"][name]["accuracy"],
            "n_pairs": row["n_pairs"],
            "n_groups": row["n_groups"],
            "interval": acc[reduction]["intervals"][name],
            "interval_mean": acc["mean"]["intervals"][name],
            "interval_sum": acc["sum"]["intervals"][name],
        }
        for name, row in acc["mean"]["subsets"].items()
    }
    alternatives = {}
    size = stream_size(lm)
    for cbs in ((0,), tuple(range(size))):
        label = f"codebooks {codebooks_label(cbs)}"
        alternatives[label] = {
            r: pair_accuracy(pairs.pairs, scores, r, cbs, text=text)["subsets"]["all"]["accuracy"]
            for r in REDUCTIONS
        }
    swept = None
    if sweep:
        swept = protocol_sweep(
            pairs, lm, mimi, config, reduction, batch_size, progress, {config.text: scores}, cache
        )
    report = Report(TITLES[pairs.name], out_dir)
    head = subsets["all"]
    report.data.update(
        benchmark=pairs.name,
        split=pairs.split,
        accuracy=head["accuracy"],
        accuracy_interval=head["interval"],
        reduction=reduction,
        n_pairs=head["n_pairs"],
        n_groups=head["n_groups"],
        n_ties={r: sum(v == 0.5 for v in acc[r]["outcomes"].values()) for r in REDUCTIONS},
        accuracy_by_reduction={r: head[f"accuracy_{r}"] for r in REDUCTIONS},
        subsets=subsets,
        breakdown=acc[reduction]["breakdown"],
        alternatives=alternatives,
        protocol={
            **config.to_dict(),
            "reduction": reduction,
            "ties": 0.5,
            "sample_rate": int(mimi.sample_rate),
            "grouping": GROUPING[pairs.name],
        },
        data=str(pairs.source),
        model=model,
        n_files=len(pairs.paths()),
        n_bad_files=len(bad),
        bad_files=bad,
        dropped_pairs=acc["mean"]["dropped_pairs"],
        unpaired=pairs.problems,
        wall_s=wall,
        setup={k: v for k, v in (setup or {}).items() if k != "provenance"},
        items=_items(pairs.pairs, acc),
    )
    if (setup or {}).get("provenance") is not None:
        report.data["provenance"] = setup["provenance"]  # type: ignore[index]
    if config.text == "greedy":
        report.data["greedy_text"] = greedy_text_stats(scores)
    if swept is not None:
        report.data["sweep"] = swept
    _write_text(report, pairs, config, reduction, subsets, alternatives, bad, model)
    if swept is not None:
        _write_sweep(report, swept, pairs.subsets)
    _plots(report, subsets, acc[reduction]["margins"], reduction)
    _write_scores(Path(out_dir) / "scores.csv", scores, config)
    report.write()
    return report.data


def protocol_grid(
    config: ScoringConfig, reduction: str, num_codebooks: int
) -> list[dict[str, Any]]:
    """The protocols of ``--protocol-sweep``: text fill (zero, pad, greedy) x codebook set
    (0, all, and ``config.codebooks``) x reduction (mean, sum) x scored streams (audio,
    text+audio), without text+audio under fill zero (no text token to score). The stream and
    the other-stream fill are ``config``'s. ``reference`` marks the run's own protocol."""
    sets = list(dict.fromkeys([(0,), tuple(range(num_codebooks)), tuple(config.codebooks)]))
    own = (config.text, tuple(config.codebooks), reduction, config.score)
    rows = []
    for fill in TEXT_FILLS:
        for scored in SCORED:
            if scored == "text+audio" and fill == "zero":
                continue
            for cbs in sets:
                for r in REDUCTIONS:
                    rows.append(
                        {
                            "label": protocol_label(fill, cbs, r, scored),
                            "text": fill,
                            "codebooks": list(cbs),
                            "reduction": r,
                            "score": scored,
                            "reference": (fill, cbs, r, scored) == own,
                        }
                    )
    return rows


def protocol_label(text: str, codebooks: Any, reduction: str, score: str) -> str:
    """``"text zero, cb 0, mean, audio"``."""
    return f"text {text}, cb {codebooks_label(codebooks)}, {reduction}, {score}"


def protocol_sweep(
    pairs: PairSet,
    lm: Any,
    mimi: Any,
    config: ScoringConfig,
    reduction: str = "mean",
    batch_size: int = 16,
    progress: bool = True,
    scores_by_fill: dict[str, dict[str, Score]] | None = None,
    cache: CodeCache | None = None,
) -> dict[str, Any]:
    """Accuracy of ``pairs`` under every protocol of ``protocol_grid``: one ``score_audio``
    per text fill (those in ``scores_by_fill`` are reused; Mimi codes are shared through
    ``cache``), every other choice read out of its scores.

    Returns ``{"reference": label of the run's protocol, "stream", "other_stream", "rows":
    [{label, text, codebooks, reduction, score, reference, accuracy, interval, delta (accuracy
    - the reference's, fraction), subsets {name: accuracy}, n_pairs, dropped_pairs}], "spread"
    (max - min accuracy of subset all over the rows), "spread_by_subset", "max", "min"
    (labels), "wall_s" {fill: seconds}, "greedy_text" (``greedy_text_stats``)}``."""
    scores_by_fill = dict(scores_by_fill or {})
    cache = {} if cache is None else cache
    wall: dict[str, float] = {}
    for fill in TEXT_FILLS:
        if fill not in scores_by_fill:
            start = time.perf_counter()
            fill_config = ScoringConfig(config.stream, config.other_stream, fill, config.codebooks)
            scores_by_fill[fill], _ = score_audio(
                lm, mimi, pairs.paths(), fill_config, batch_size, progress, cache
            )
            wall[fill] = time.perf_counter() - start
    rows = protocol_grid(config, reduction, stream_size(lm))
    for row in rows:
        a = pair_accuracy(
            pairs.pairs,
            scores_by_fill[row["text"]],
            row["reduction"],
            row["codebooks"],
            pairs.subsets,
            text=row["score"] == "text+audio",
        )
        row.update(
            accuracy=a["subsets"]["all"]["accuracy"],
            interval=a["intervals"]["all"],
            subsets={k: v["accuracy"] for k, v in a["subsets"].items()},
            n_pairs=a["subsets"]["all"]["n_pairs"],
            dropped_pairs=a["dropped_pairs"],
        )
    ref = next(r for r in rows if r["reference"])
    for row in rows:
        row["delta"] = row["accuracy"] - ref["accuracy"]
    finite = [r for r in rows if math.isfinite(r["accuracy"])]
    spread_by_subset = {}
    for name in ref["subsets"]:
        vals = [r["subsets"].get(name, math.nan) for r in rows]
        vals = [v for v in vals if math.isfinite(v)]
        spread_by_subset[name] = max(vals) - min(vals) if vals else math.nan
    return {
        "reference": ref["label"],
        "stream": config.stream,
        "other_stream": config.other_stream,
        "rows": rows,
        "spread": spread_by_subset.get("all", math.nan),
        "spread_by_subset": spread_by_subset,
        "max": max(finite, key=lambda r: r["accuracy"])["label"] if finite else None,
        "min": min(finite, key=lambda r: r["accuracy"])["label"] if finite else None,
        "wall_s": wall,
        "greedy_text": greedy_text_stats(scores_by_fill["greedy"]),
    }


def greedy_text_stats(scores: dict[str, Score]) -> dict[str, Any]:
    """What the greedy (Inner Monologue) text looks like: token count, share of PAD (3), the
    number of distinct tokens."""
    tokens = [t for s in scores.values() for t in s.text.tolist()]
    return {
        "tokens": len(tokens),
        "pad_fraction": sum(t == TEXT_PAD for t in tokens) / len(tokens) if tokens else math.nan,
        "distinct": len(set(tokens)),
    }


def story_length_tags(pairs: list[Pair], scores: dict[str, Score]) -> dict[str, tuple[str, ...]]:
    """StoryCloze breakdown: each pair tagged with the length quartile of its true story
    (frames of the positive file, in seconds at 12.5 Hz), e.g. ``"length Q1 (8.0-14.2 s)"``."""
    frames = {p.key: scores[str(p.positive)].frames for p in pairs if str(p.positive) in scores}
    if not frames:
        return {}
    import numpy as np

    values = np.array(list(frames.values()), dtype=float)
    edges = np.quantile(values, [0, 0.25, 0.5, 0.75, 1.0])
    out = {}
    for key, f in frames.items():
        q = min(3, int(np.searchsorted(edges[1:-1], f, side="right")))
        out[key] = (f"length Q{q + 1} ({edges[q] / 12.5:.1f}-{edges[q + 1] / 12.5:.1f} s)",)
    return out


def _items(pairs: list[Pair], acc: dict[str, dict[str, Any]]) -> dict[str, list[Any]]:
    """Per-pair data as columns (for ``eval compare`` and re-analysis): ``key``, ``group``,
    ``subsets`` (joined by ``|``), and per reduction ``outcome_<r>`` (1, 0.5, 0) and
    ``margin_<r>`` (log-likelihood of positive - negative, nats); scored pairs only."""
    scored = [p for p in pairs if p.key in acc["mean"]["outcomes"]]
    out: dict[str, list[Any]] = {
        "key": [p.key for p in scored],
        "group": [p.group for p in scored],
        "subsets": ["|".join(p.subsets) for p in scored],
    }
    for r, a in acc.items():
        out[f"outcome_{r}"] = [a["outcomes"].get(p.key) for p in scored]
        out[f"margin_{r}"] = [a["margins"].get(p.key) for p in scored]
    return out


def _pct(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{100 * x:.2f}"


def _write_text(
    report: Report,
    pairs: PairSet,
    config: ScoringConfig,
    reduction: str,
    subsets: dict[str, dict[str, Any]],
    alternatives: dict[str, dict[str, float]],
    bad: dict[str, str],
    model: str,
) -> None:
    d = report.data
    ci = d["accuracy_interval"]
    few = no_interval(ci)
    interval = few or f"95 % CI {_pct(ci['lo'])}, {_pct(ci['hi'])}; bootstrap over groups"
    report.add_text(
        f"**Accuracy: {_pct(d['accuracy'])} %** [{interval}] (token {reduction}, codebooks "
        f"{codebooks_label(config.codebooks)}, text fill {config.text}, scored {config.score}; "
        f"chance 50 %, split {d['split'] or '-'}) over "
        f"{d['n_pairs']} pairs in {d['n_groups']} groups; tied pairs (count 0.5): "
        f"{d['n_ties'][reduction]}.\n\n"
        f"- data: `{pairs.source}`\n- {model or 'model: ?'}\n{_provenance_line(d)}"
        f"- files: {d['n_files']} ({len(bad)} bad); pairs dropped for a bad file: "
        f"{d['dropped_pairs']}; unpaired entries: {len(pairs.problems)}; "
        f"scoring took {d['wall_s']:.1f} s"
    )
    report.add_text("## Accuracy (%)")
    rows = [
        [
            name,
            fmt_interval(s["interval_mean"], 100),
            fmt_interval(s["interval_sum"], 100),
            s["n_pairs"],
            s["n_groups"],
        ]
        for name, s in subsets.items()
    ]
    report.add_table(["subset", "mean [95 % CI]", "sum [95 % CI]", "n pairs", "n groups"], rows)
    if d.get("breakdown"):
        report.add_text(f"## Breakdown (%, token {reduction})")
        report.add_table(
            ["cell", "accuracy [95 % CI]", "n pairs", "n groups"],
            [
                [k, fmt_interval({"mean": v["accuracy"], **v}, 100), v["n_pairs"], v["n_groups"]]
                for k, v in d["breakdown"].items()
            ],
        )
    report.add_text(
        "Other codebook choices, same forward pass (subset all, %): "
        + "; ".join(
            f"{k}: mean {_pct(v['mean'])}, sum {_pct(v['sum'])}" for k, v in alternatives.items()
        )
    )
    report.add_text(_protocol_text(pairs, config, reduction))
    report.add_text(
        "## Published numbers (%)\n\nComparable only under the same protocol: "
        "published Moshi numbers range from 45 to 83 with the protocol "
        "(`../shared/reference/evaluation.md`). The Moshi rows are one model variant, the "
        "text+audio pretrained model of Table 7, not the released moshiko/moshika weights."
    )
    report.add_table(["model", "accuracy", "protocol"], [list(r) for r in PUBLISHED[pairs.name]])
    if bad or pairs.problems:
        lines = [f"- `{p}`: {why}" for p, why in list(bad.items())[:100]]
        more = f"\n- ... {len(bad) - 100} more in report.json" if len(bad) > 100 else ""
        report.add_text(f"## Bad files ({len(bad)})\n\n" + "\n".join(lines) + more)
        if pairs.problems:
            shown = "\n".join(f"- {p}" for p in pairs.problems[:100])
            report.add_text(f"## Unpaired entries ({len(pairs.problems)})\n\n{shown}")


def _write_sweep(report: Report, sweep: dict[str, Any], subsets: list[str]) -> None:
    extra = [s for s in subsets if s != "all"] if len(subsets) <= 4 else []
    report.add_text(
        "## Protocol sweep (%)\n\n"
        f"The same pairs under every protocol (stream {sweep['stream']}, other stream "
        f"{sweep['other_stream']}): one forward pass per text fill. Δ = accuracy minus this "
        f"run's protocol (**{sweep['reference']}**), in points (> 0: higher accuracy; docs/"
        'evaluation.md, "Sign convention"). Spread (max - min, subset all): '
        f"**{_pct(sweep['spread'])} points** (max: {sweep['max']}; min: {sweep['min']})."
        + "".join(
            f" Spread {name}: {_pct(sweep['spread_by_subset'].get(name, math.nan))} points."
            for name in extra
        )
    )
    rows = [
        [
            r["text"] + (" (this run)" if r["reference"] else ""),
            codebooks_label(r["codebooks"]),
            r["reduction"],
            r["score"],
            fmt_interval(r["interval"], 100),
            "-" if not math.isfinite(r["delta"]) else f"{100 * r['delta']:+.2f}",
            *(_pct(r["subsets"].get(name, math.nan)) for name in extra),
            r["n_pairs"],
        ]
        for r in sweep["rows"]
    ]
    report.add_table(
        ["text fill", "codebooks", "reduction", "scored", "accuracy [95 % CI]", "Δ", *extra]
        + ["n pairs"],
        rows,
    )
    g = sweep["greedy_text"]
    report.add_text(
        f"Greedy text (Inner Monologue): {g['tokens']} tokens, {_pct(g['pad_fraction'])} % PAD, "
        f"{g['distinct']} distinct."
    )


def _protocol_text(pairs: PairSet, config: ScoringConfig, reduction: str) -> str:
    audio_rows = "9-16 (user)" if config.stream == "user" else "1-8 (Moshi)"
    other = "-1 (zero embedding)" if config.other_stream == "zero" else "Mimi codes of silence"
    text = {
        "zero": "fill zero: -1 (zero embedding)",
        "pad": "fill pad: PAD 3 on every frame",
        "greedy": "fill greedy: the model's own greedy text (Inner Monologue), fed back "
        "frame by frame in a first causal streaming pass",
    }[config.text]
    cbs = codebooks_label(config.codebooks)
    scored = (
        f"the audio tokens of codebook(s) {cbs} (0 = semantic)"
        if config.score == "audio"
        else f"the text tokens that fill the text stream plus the audio tokens of codebook(s) "
        f"{cbs} (score text+audio: log p(audio, text))"
    )
    return f"""## Protocol

- Audio: mono, resampled to 24 kHz (ZeroSpeech is 16 kHz), Mimi-encoded (12.5 Hz, 8 codebooks
  per stream); a file shorter than one 80 ms frame, missing or unreadable is dropped with its
  pairs and listed below.
- Input codes `[B, 17, T]`: audio on rows {audio_rows}; other stream: {other}; text: {text}.
  One teacher-forced `LMModel.forward` per batch (right-padded with -1; scores do not depend on
  the batch); TTT layers start from their initial state for every file.
- Score: log-likelihood (nats) of {scored}
  where `LMOutput.mask` scores them (acoustic codebooks lose their last frame to
  the 1-frame delay). **mean** = per scored token (headline: {reduction}), **sum** = total.
  Not the training loss (no ×100 codebook-0 weight).
- Accuracy: positive more likely = 1, tie = 0.5, else 0; {GROUPING[pairs.name]}."""


def _plots(
    report: Report, subsets: dict[str, dict[str, Any]], margins: dict[str, float], reduction: str
) -> None:
    names = list(subsets)
    fig, ax = report.figure(width=max(5.0, 0.6 * len(names) + 2))
    xs = range(len(names))
    for shift, r in ((-0.2, "mean"), (0.2, "sum")):
        vals = [100 * subsets[n][f"accuracy_{r}"] for n in names]
        cis = [subsets[n][f"interval_{r}"] for n in names]
        err = [
            [
                max(0.0, v - 100 * c["lo"]) if math.isfinite(c["lo"]) else 0
                for v, c in zip(vals, cis)
            ],
            [
                max(0.0, 100 * c["hi"] - v) if math.isfinite(c["hi"]) else 0
                for v, c in zip(vals, cis)
            ],
        ]
        heights = [v if math.isfinite(v) else 0 for v in vals]
        ax.bar([x + shift for x in xs], heights, 0.4, yerr=err, capsize=2, label=r)
    ax.axhline(50, color="k", lw=0.8, ls="--", label="chance")
    ax.set_xticks(
        list(xs),
        [f"{n}\n(n={subsets[n]['n_pairs']})" for n in names],
        rotation=30,
        ha="right",
        fontsize=7,
    )
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    report.add_figure(
        fig, "accuracy.png", "Pairwise accuracy per subset (token mean and sum; 95 % bootstrap CI)"
    )
    if margins:
        fig, ax = report.figure()
        ax.hist(list(margins.values()), bins=min(50, max(5, len(margins) // 5)))
        ax.axvline(0, color="k", lw=0.8)
        ax.set_xlabel(f"log-likelihood ({reduction}) of positive - negative (nats)")
        ax.set_ylabel("pairs")
        report.add_figure(fig, "margins.png", "Likelihood margin per pair (> 0: correct)")


def _write_scores(path: Path, scores: dict[str, Score], config: ScoringConfig) -> None:
    """One row per scored file: the protocol's sum / count / mean (text tokens included under
    score text+audio), then per codebook, then the text tokens' log p and count."""
    k = len(next(iter(scores.values())).ll) if scores else 0
    text = config.score == "text+audio"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "path",
                "frames",
                "ll_sum",
                "n_tokens",
                "ll_mean",
                *(f"ll_cb{i}" for i in range(k)),
                *(f"n_cb{i}" for i in range(k)),
                "ll_text",
                "n_text",
            ]
        )
        for p, s in scores.items():
            total, n = s.total(config.codebooks, text)
            w.writerow(
                [
                    p,
                    s.frames,
                    f"{total:.6f}",
                    n,
                    f"{s.value('mean', config.codebooks, text):.6f}",
                    *(f"{v:.6f}" for v in s.ll),
                    *(int(v) for v in s.n),
                    f"{s.text_ll:.6f}",
                    s.text_n,
                ]
            )


def _provenance_line(d: dict[str, Any]) -> str:
    """``- provenance: LABEL`` and a newline, or nothing for a report without one."""
    p = d.get("provenance")
    return f"- provenance: {p['label']}\n" if isinstance(p, dict) and "label" in p else ""
