"""Paired comparison of two reports, and one results page over many.

``compare_reports(a, b)`` (``moshi-ttt eval compare A B``): both reports score the same items,
so the comparison is paired.

- Pairwise benchmarks (sBLIMP, sWUGGY, StoryCloze): the per-pair outcomes kept in
  ``report.json`` (``items``) are joined on the pair key; the accuracy difference A - B
  (> 0: A better) is a mean over groups (the voices of an id averaged first, as the accuracy
  is) with a paired bootstrap interval and p-value over groups, per subset, plus McNemar's exact
  test on the pairs where both outcomes are 0 or 1.
- Long-context reports: the per-file CE sums (``result.per_file``) are joined on the file
  name; the CE difference A - B (nats per token; negative: A better) of the headline metric beyond
  the attention context, within it and overall, with a paired bootstrap over files.

``summarize(paths)`` (``moshi-ttt eval summary``): every ``report.json`` under ``paths`` in one
table with intervals, the protocol of each line, the published rows, and side-by-side plots.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from .long_context.statistics import METRIC_LABELS
from .pair_report import PUBLISHED, TITLES
from .report import Report, legend_outside, row_line_style, row_styles
from .stats import (
    flip_interval,
    fmt_interval,
    format_p,
    mcnemar_exact,
    no_interval,
    paired_difference,
    ratio_difference,
    ratio_sum,
)


def load_report(path: str | Path) -> dict[str, Any]:
    """The JSON of a report: ``path`` is a ``report.json`` or a directory holding one."""
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    if not p.is_file():
        raise FileNotFoundError(
            f"no report at {path}: expected report.json or a directory with one"
        )
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None
    data["_path"] = str(p)
    return data


def report_kind(data: dict[str, Any]) -> str:
    """``"pairs"``, ``"long_context"``, ``"compare"``, ``"summary"`` or ``"other"``."""
    if "benchmark" in data and "subsets" in data:
        return "pairs"
    if "result" in data and "long_context" in data:
        return "long_context"
    return str(data.get("kind", "other"))


def compare_reports(
    a: dict[str, Any],
    b: dict[str, Any],
    *,
    reduction: str | None = None,
    variant_a: str | None = None,
    variant_b: str | None = None,
    metric: str | None = None,
) -> dict[str, Any]:
    """The paired comparison of two loaded reports (module docstring); ``ValueError`` naming
    the reports if they are not of one kind or lack the per-item / per-file data."""
    ka, kb = report_kind(a), report_kind(b)
    if ka != kb or ka not in ("pairs", "long_context"):
        raise ValueError(
            f"cannot compare {a.get('_path')} ({ka}) with {b.get('_path')} ({kb}): expected two "
            "reports of one benchmark or two long-context reports"
        )
    if ka == "pairs":
        return _compare_pairs(a, b, reduction)
    return _compare_long_context(a, b, variant_a, variant_b, metric)


def _items(data: dict[str, Any], reduction: str) -> dict[str, tuple[str, float, list[str]]]:
    items = data.get("items")
    if not items or f"outcome_{reduction}" not in items:
        raise ValueError(
            f"{data.get('_path')}: no per-pair data (items.outcome_{reduction}); rerun the "
            "benchmark with this version to keep it"
        )
    return {
        k: (g, o, s.split("|"))
        for k, g, o, s in zip(
            items["key"], items["group"], items[f"outcome_{reduction}"], items["subsets"]
        )
        if o is not None
    }


def _compare_pairs(a: dict[str, Any], b: dict[str, Any], reduction: str | None) -> dict[str, Any]:
    if a["benchmark"] != b["benchmark"]:
        raise ValueError(
            f"{a['_path']} is {a['benchmark']} but {b['_path']} is {b['benchmark']}: "
            "compare reports of one benchmark"
        )
    r = reduction or a.get("reduction", "mean")
    ia, ib = _items(a, r), _items(b, r)
    common = [k for k in ia if k in ib]
    if not common:
        raise ValueError(f"{a['_path']} and {b['_path']} share no pair key: not the same items")
    subsets: list[str] = []
    for k in common:
        subsets.extend(s for s in ia[k][2] if s not in subsets)
    table = {}
    for name in subsets:
        groups: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for k in common:
            if name in ia[k][2]:
                groups[ia[k][0]].append((ia[k][1], ib[k][1]))
        ga = [float(np.mean([x for x, _ in v])) for v in groups.values()]
        gb = [float(np.mean([y for _, y in v])) for v in groups.values()]
        table[name] = {
            "accuracy_a": float(np.mean(ga)),
            "accuracy_b": float(np.mean(gb)),
            **paired_difference(ga, gb, unit="groups"),
            "n_pairs": sum(len(v) for v in groups.values()),
        }
    only_a = sum(ia[k][1] == 1.0 and ib[k][1] == 0.0 for k in common)
    only_b = sum(ia[k][1] == 0.0 and ib[k][1] == 1.0 for k in common)
    ties = sum(ia[k][1] == 0.5 or ib[k][1] == 0.5 for k in common)
    return {
        "kind": "compare",
        "compared": "pairs",
        "benchmark": a["benchmark"],
        "split": a.get("split", ""),
        "reduction": r,
        "a": a["_path"],
        "b": b["_path"],
        "model_a": a.get("model", ""),
        "model_b": b.get("model", ""),
        "protocol_a": a.get("protocol", {}),
        "protocol_b": b.get("protocol", {}),
        "same_protocol": _protocol_key(a) == _protocol_key(b),
        "n_common_pairs": len(common),
        "n_only_a": len(ia) - len(common),
        "n_only_b": len(ib) - len(common),
        "subsets": table,
        "mcnemar": {
            "a_right_b_wrong": int(only_a),
            "a_wrong_b_right": int(only_b),
            "pairs_with_a_tie": int(ties),
            "p_value": mcnemar_exact(int(only_a), int(only_b)),
        },
        "sign": "accuracy A - B (> 0: A better)",
    }


def _protocol_key(d: dict[str, Any]) -> str:
    p = dict(d.get("protocol", {}))
    p.pop("grouping", None)
    return json.dumps(p, sort_keys=True)


def _compare_long_context(
    a: dict[str, Any],
    b: dict[str, Any],
    variant_a: str | None,
    variant_b: str | None,
    metric: str | None,
) -> dict[str, Any]:
    ra, rb = a["result"], b["result"]
    va, vb = variant_a or ra["primary"], variant_b or rb["primary"]
    m = metric or a.get("metric") or ra["metric"]
    fa, fb = _per_file(a, va), _per_file(b, vb)
    ib = {n: i for i, n in enumerate(fb["names"])}
    common = [n for n in fa["names"] if n in ib]
    if not common:
        raise ValueError(f"{a['_path']} and {b['_path']} share no file name: not the same data")
    ia = {n: i for i, n in enumerate(fa["names"])}
    out: dict[str, Any] = {}
    for path, f in ((a["_path"], fa), (b["_path"], fb)):
        if m not in f["all"]:
            raise ValueError(f"{path}: no per-file {m} (a report of an older moshi-ttt: run "
                             "its eval long-context again, or pick another --metric)")  # fmt: skip
    for part in ("beyond_context", "within_context", "all"):
        xa, xb = fa[part][m], fb[part][m]
        arrays = [  # [files], or [terms, files] for moshi_loss
            np.asarray(x[k], dtype=np.float64)[..., [idx[n] for n in common]]
            for x, idx in ((xa, ia), (xb, ib))
            for k in ("sum", "count")
        ]
        d = ratio_difference(*arrays)
        ca, cb = (ratio_sum(s.sum(-1), c.sum(-1)) for s, c in (arrays[:2], arrays[2:]))
        out[part] = {"ce_a": float(ca), "ce_b": float(cb), **d}
    return {
        "kind": "compare",
        "compared": "long_context",
        "a": a["_path"],
        "b": b["_path"],
        "variant_a": va,
        "variant_b": vb,
        "metric": m,
        "context_frames": ra.get("context_frames"),
        "context_frames_b": rb.get("context_frames"),
        "n_common_files": len(common),
        "n_only_a": len(fa["names"]) - len(common),
        "n_only_b": len(fb["names"]) - len(common),
        "parts": out,
        "sign": "CE A - B, nats per token (negative: A better)",
    }


def _per_file(data: dict[str, Any], variant: str) -> dict[str, Any]:
    per = data["result"].get("per_file") or {}
    if variant not in per:
        have = ", ".join(per) or "none"
        raise ValueError(
            f"{data['_path']}: no per-file data for variant {variant!r} (have: {have}); rerun "
            "the evaluation with this version to keep it"
        )
    return per[variant]


def compare_lines(c: dict[str, Any]) -> list[str]:
    """The printed summary of ``compare_reports``."""
    if c["compared"] == "pairs":
        lines = [
            f"{c['benchmark']} ({c['reduction']}), {c['n_common_pairs']} common pairs; "
            f"accuracy A - B (> 0: A better):"
        ]
        for name, s in c["subsets"].items():
            lines.append(
                f"  {name}: {100 * s['accuracy_a']:.2f} - {100 * s['accuracy_b']:.2f} = "
                f"{_difference(s, 100, 2, 'points')} ({s['n']} groups)"
            )
        mc = c["mcnemar"]
        lines.append(
            f"  McNemar (exact): A right / B wrong {mc['a_right_b_wrong']}, A wrong / B right "
            f"{mc['a_wrong_b_right']}, p = {format_p(mc['p_value'], bootstrap=False)}"
        )
        if not c["same_protocol"]:
            lines.append("  WARNING: the two reports use different protocols")
        return lines
    lines = [
        f"long context, {c['metric']}: {c['variant_a']} (A) vs {c['variant_b']} (B), "
        f"{c['n_common_files']} common files; CE A - B (negative: A better):"
    ]
    for part, d in c["parts"].items():
        lines.append(
            f"  {part}: {d['ce_a']:.4f} - {d['ce_b']:.4f} = {_difference(d, 1, 4, 'nats')}"
        )
    return lines


def _difference(d: dict[str, Any], scale: float, digits: int, unit: str) -> str:
    """``"+0.0123 [+0.0050, +0.0200] nats, p = 0.002"``, or ``"+0.0123 nats (n = 3: no
    interval)"`` below the minimum of units."""
    few = no_interval(d)
    if few is not None:
        v = d.get("difference")
        value = "-" if v is None or not math.isfinite(v) else f"{scale * v:+.{digits}f}"
        return f"{value} {unit} ({few})"
    return f"{fmt_interval(d, scale, digits, 'difference')} {unit}, p = {_p(d['p_value'])}"


def _p(p: Any) -> str:
    return format_p(p)


def write_compare_report(c: dict[str, Any], out_dir: str | Path) -> Report:
    """``out_dir/report.md`` + ``report.json`` of a comparison."""
    report = Report("Paired comparison", out_dir)
    report.data.update(c)
    report.add_text(f"- A: `{c['a']}`\n- B: `{c['b']}`\n- sign: {c['sign']}")
    if c["compared"] == "pairs":
        report.add_table(
            ["subset", "A (%)", "B (%)", "A - B [95 % CI] (points)", "p (bootstrap)", "groups"],
            [
                [
                    name,
                    f"{100 * s['accuracy_a']:.2f}",
                    f"{100 * s['accuracy_b']:.2f}",
                    fmt_interval(s, 100, 2, "difference"),
                    _p(s["p_value"]),
                    s["n"],
                ]
                for name, s in c["subsets"].items()
            ],
        )
    else:
        report.add_table(
            ["positions", "A (nats)", "B (nats)", "A - B [95 % CI]", "p (bootstrap)", "files"],
            [
                [
                    part,
                    f"{d['ce_a']:.4f}",
                    f"{d['ce_b']:.4f}",
                    fmt_interval(d, 1, 4, "difference"),
                    _p(d["p_value"]),
                    d["n"],
                ]
                for part, d in c["parts"].items()
            ],
        )
    report.add_text("\n".join(compare_lines(c)).join(["```\n", "\n```"]))
    report.write()
    return report


# -- the results page ---------------------------------------------------------------------------
def find_reports(paths: list[str | Path]) -> list[dict[str, Any]]:
    """Every evaluation ``report.json`` in ``paths`` (files, or directories searched
    recursively), sorted by path; summaries and comparisons are left out."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files.extend(sorted(p.rglob("report.json")))
        else:
            raise FileNotFoundError(f"not found: {p} (expected a run, report directory or file)")
    out = []
    for f in dict.fromkeys(files):
        data = load_report(f)
        if report_kind(data) in ("pairs", "long_context"):
            out.append(data)
    if not out:
        raise ValueError(f"no evaluation report.json under {', '.join(map(str, paths))}")
    return out


def _label(data: dict[str, Any]) -> str:
    """A report's model: its provenance label (``models.provenance``) where it records one,
    else the model line of older reports, else its directory's name."""
    p = data.get("provenance")
    if isinstance(p, dict) and p.get("label"):
        return str(p["label"])
    model = data.get("model") or data.get("setup", {}).get("model", "")
    return (
        str(model).removeprefix("model: ").split(";")[0].strip() or Path(data["_path"]).parent.name
    )


def _labels(reports: list[dict[str, Any]]) -> dict[str, str]:
    """``report path -> label``, distinct: reports whose labels coincide (the same model
    measured twice, or older reports without provenance) get their directory name added
    (its path relative to their common parent when the names coincide too)."""
    labels = {d["_path"]: _label(d) for d in reports}
    groups: dict[str, list[str]] = defaultdict(list)
    for path, label in labels.items():
        groups[label].append(path)
    for label, paths in groups.items():
        if len(paths) < 2:
            continue
        dirs = [Path(p).parent for p in paths]
        names = [d.name for d in dirs]
        if len(set(names)) < len(names):
            common = Path(*_common_parts([d.parts for d in dirs]))
            names = [str(d.relative_to(common)) if d != common else d.name for d in dirs]
        for path, name in zip(paths, names, strict=True):
            labels[path] = f"{label} [{name}]"
    return labels


def _common_parts(parts: list[tuple[str, ...]]) -> tuple[str, ...]:
    common: list[str] = []
    for items in zip(*parts, strict=False):
        if len(set(items)) != 1:
            break
        common.append(items[0])
    return tuple(common)


def _short(label: str, n: int) -> str:
    """``label`` in at most ``n`` characters, its middle elided (the end names the weights)."""
    if len(label) <= n:
        return label
    head = (n - 1) // 2
    return label[:head] + "…" + label[len(label) - (n - 1 - head) :]


def _protocol_line(d: dict[str, Any]) -> str:
    p = d.get("protocol", {})
    cbs = p.get("codebooks", [])
    cb = f"{cbs[0]}-{cbs[-1]}" if len(cbs) > 1 else ",".join(map(str, cbs))
    return (
        f"{p.get('stream', '?')} stream, other {p.get('other_stream', '?')}, text "
        f"{p.get('text', '?')}, codebooks {cb}, {p.get('reduction', '?')}"
    )


def summarize(paths: list[str | Path], out_dir: str | Path) -> Report:
    """One results page (``out_dir/report.md`` + ``report.json``, ``accuracy.png``,
    ``long_context.png``) over the reports found in ``paths``."""
    reports = find_reports(paths)
    report = Report("Results", out_dir)
    pairs = [d for d in reports if report_kind(d) == "pairs"]
    longs = [d for d in reports if report_kind(d) == "long_context"]
    labels = _labels(reports)
    rows, data_rows = [], []
    for d in pairs:
        for name, s in d["subsets"].items():
            if name != "all" and d["benchmark"] != "storycloze":
                continue
            ci = s.get("interval", {})
            row = {
                "report": d["_path"],
                "model": labels[d["_path"]],
                "provenance": d.get("provenance"),
                "benchmark": d["benchmark"],
                "split": d.get("split", ""),
                "subset": name,
                "accuracy": s["accuracy"],
                "lo": ci.get("lo"),
                "hi": ci.get("hi"),
                "n_pairs": s["n_pairs"],
                "protocol": _protocol_line(d),
            }
            data_rows.append(row)
            rows.append(
                [
                    row["model"],
                    d["benchmark"] + (f" {name}" if name != "all" else ""),
                    row["split"] or "-",
                    fmt_interval({"mean": s["accuracy"], **ci}, 100),
                    s["n_pairs"],
                    row["protocol"],
                ]
            )
    if rows:
        report.add_text("## Pairwise benchmarks (accuracy %, 95 % bootstrap CI over groups)")
        report.add_table(["model", "benchmark", "split", "accuracy", "pairs", "protocol"], rows)
        report.add_text(
            "Published (one Moshi variant: the text+audio pretrained model of 2410.00037 "
            "Table 7, not the released weights; protocols differ):"
        )
        pub = []
        for bench in dict.fromkeys(d["benchmark"] for d in pairs):
            pub.extend([TITLES[bench].split(" ")[0], *r] for r in PUBLISHED[bench])
        report.add_table(["benchmark", "model", "accuracy", "protocol"], pub)
        _plot_accuracy(report, data_rows)
    lc_rows, lc_data = [], []
    for d in longs:
        res = d["result"]
        m = res["metric"]
        iv = res.get("summary", {}).get("intervals", {})
        for v, t in res["summary"]["beyond_context"].items():
            ci = iv.get("totals", {}).get(v, {}).get("beyond_context", {})
            diff = iv.get("difference", {}).get(v, {}).get("beyond_context", {})
            entry = {
                "report": d["_path"],
                "model": labels[d["_path"]],
                "provenance": d.get("provenance"),
                "variant": v,
                "metric": m,
                "ce_beyond": t[m],
                "ce_interval": ci,
                "ppl_beyond": math.exp(t[m]) if t[m] is not None else None,
                "difference": diff,
            }
            lc_data.append(entry)
            lc_rows.append(
                [
                    entry["model"],
                    v,
                    m,
                    fmt_interval({"mean": t[m], **ci}, 1, 4) if t[m] is not None else "-",
                    f"{entry['ppl_beyond']:.3g}" if entry["ppl_beyond"] else "-",
                    fmt_interval(flip_interval(diff), 1, 4, "difference") if diff else "-",
                    _p(diff.get("p_value")) if diff else "-",
                ]
            )
    if lc_rows:
        report.add_text(
            "## Long context (beyond the attention context; 95 % bootstrap CI over files; "
            "difference = the report's primary - variant, negative: the primary better; "
            'docs/evaluation.md, "Sign convention")'
        )
        report.add_table(
            ["model", "variant", "metric", "CE (nats)", "ppl", "primary -", "p"], lc_rows
        )
        _plot_long_context(report, longs, labels)
    report.data.update(kind="summary", pairs=data_rows, long_context=lc_data,
                       reports=[d["_path"] for d in reports])  # fmt: skip
    report.write()
    return report


def _finite(x: Any) -> bool:
    return x is not None and math.isfinite(x)


def _plot_accuracy(report: Report, rows: list[dict[str, Any]]) -> None:
    cells = list(dict.fromkeys(f"{r['benchmark']} {r['subset']}" for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, ax = report.figure(width=max(5.0, 1.2 * len(cells) + 2))
    w = 0.8 / max(1, len(models))
    for i, model in enumerate(models):
        xs, ys, err = [], [], [[], []]
        for j, cell in enumerate(cells):
            r = next(
                (
                    r
                    for r in rows
                    if r["model"] == model and f"{r['benchmark']} {r['subset']}" == cell
                ),
                None,
            )
            if r is None or r["accuracy"] is None:
                continue
            xs.append(j + (i - (len(models) - 1) / 2) * w)
            ys.append(100 * r["accuracy"])
            err[0].append(100 * (r["accuracy"] - r["lo"]) if _finite(r["lo"]) else 0)
            err[1].append(100 * (r["hi"] - r["accuracy"]) if _finite(r["hi"]) else 0)
        ax.bar(xs, ys, w, yerr=err, capsize=2, label=_short(model, 60))
    ax.axhline(50, color="k", lw=0.8, ls="--")
    ax.set_xticks(range(len(cells)), cells, rotation=20, ha="right", fontsize=7)
    ax.set(ylabel="accuracy (%)", ylim=(0, 100))
    ax.legend(fontsize=6)
    report.add_figure(fig, "accuracy.png", "Accuracy per benchmark and model (95 % CI)")


def _plot_long_context(
    report: Report, longs: list[dict[str, Any]], labels: dict[str, str] | None = None
) -> None:
    """``long_context.png``: every report's curves, one panel per scored metric (audio CE and
    text CE never share an axis); the band of each report's headline metric."""
    labels = labels or _labels(longs)

    def values(seq: list[Any]) -> np.ndarray:
        return np.asarray([np.nan if u is None else u for u in seq], dtype=float)

    metrics = [
        m
        for m in ("audio_ce", "text_ce")
        if any(
            np.isfinite(values(c.get(m, []))).any()
            for d in longs
            for c in d["result"]["curves"].values()
        )  # fmt: skip
    ] or [longs[0]["result"]["metric"]]
    names = [f"{_short(labels[d['_path']], 50)}: {v}" for d in longs for v in d["result"]["curves"]]
    styles = row_styles(names)
    fig, axes = report.figure(max(10.0, 5.5 * len(metrics)), 5.0, ncols=len(metrics))
    axes = np.atleast_1d(axes)
    for ax, m in zip(axes, metrics):
        i = 0
        for d in longs:
            res = d["result"]
            for v, c in res["curves"].items():
                name = f"{_short(labels[d['_path']], 50)}: {v}"
                x = (np.asarray(c["start"]) + np.asarray(c["end"]) - 1) / 2
                y = values(c.get(m, []))
                if not np.isfinite(y).any():
                    continue
                style = row_line_style(styles[name], i, len(y))
                ax.plot(x, y, label=name, **style)
                i += 1
                band = res.get("curve_intervals", {}).get(v, {})
                if m == res["metric"] and len(band.get("lo", [])) == len(y):
                    lo, hi = values(band["lo"]), values(band["hi"])
                    ax.fill_between(x, lo, hi, color=style["color"], alpha=0.15, lw=0)
            if res.get("context_frames"):
                ax.axvline(res["context_frames"], color="k", ls="--", lw=0.8)
        label = METRIC_LABELS.get(m, m)
        ax.set(title=label, xlabel="position (frames, 80 ms)", ylabel=f"{label} (nats)")
    legend_outside(axes[-1], fontsize=6, axes=axes)
    report.add_figure(
        fig, "long_context.png",
        "Loss against position, every report, one panel per metric (shaded: 95 % CI of each "
        "report's headline metric)",
    )  # fmt: skip
