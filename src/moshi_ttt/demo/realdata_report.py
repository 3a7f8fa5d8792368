"""The real-data benchmark's verdict (the issues' targets, per row) and report
(``OUT/report.md`` with its table and plots); ``realdata`` computes what they show."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..eval.long_context import COLUMN_LABELS, MOSHI_LOSS, write_long_context_section
from ..eval.report import Report, legend_outside, row_styles
from ..recipes import HARM_TOLERANCE

ROW_TEXT = {
    "base": "frozen base, attention window C",
    "window_plain": "frozen base, window extended to the file at inference",
    "window_ntk": "frozen base, window extended, NTK-aware RoPE",
    "window_yarn": "frozen base, window extended, YaRN RoPE",
    "dyneval": "frozen base + dynamic evaluation (no training; lr, layers, K from validation)",
    "e2e": "**e2e**: frozen base + end-to-end memory, no training (width, lr, K from validation)",
    "e2e_meta": "**e2e_meta**: frozen base + end-to-end memory, meta-trained",
    "e2e_meta_static": "e2e_meta with its updates off (control: its trained weights alone)",
    "cache": "frozen base + continuous cache over its past hidden states (growing state)",
    "retrieval": "frozen base, top layer also attends to its top-k evicted keys (growing)",
    "assoc": "**assoc**: frozen base + associative memory (delta rule, fixed state)",
    "e2e_assoc": "**e2e_assoc**: e2e + the associative memory (adapts and recalls)",
    "e2e_meta_assoc": "**e2e_meta_assoc**: e2e_meta + the associative memory",
    "retrofit": "**retrofit**: frozen base + TTT, shipped defaults",
    "retrofit_reset": "retrofit, TTT state reset every C frames (control)",
    "retrofit_gate0": "retrofit, gate forced to 0 (control)",
    "retrofit_forced": "frozen base + TTT, the mechanism recipe (layer 0, quarter window)",
    "lora_long": "frozen base + LoRA trained at the file's window (retrofit budget)",
    "full_attention": "base trained with attention over the whole file (same budget)",
    "full_attention_4x": "base trained with attention over the whole file (4x budget)",
    "scratch": "TTT + base trained together from scratch (attention window C)",
}


# recall targets (the recall issue): the needle at 4 windows, repeated bytes against the best
# growing-state row, the fixed state against the window's KV cache, the cost against the base
NEEDLE_TARGET, REPEAT_TARGET, COST_TARGET = 0.8, 0.5, 2.0
FIXED_MEMORIES = ("assoc", "e2e_assoc", "e2e_meta_assoc")
GROWING = ("cache", "retrieval")


def recall_verdict(table: dict[str, Any], recall: dict[str, Any] | None) -> dict[str, Any]:
    """Each recall target, per fixed-state memory row present: ``{row: {target: bool}}`` and
    the lines saying each met / not met with its number."""
    out: dict[str, Any] = {"lines": []}
    if not recall:
        return out
    rep, shares = recall.get("repeat", {}), recall.get("needle_shares", {})
    base = rep.get("base", {}).get("recallable", {}).get("mean", math.nan)
    growing = [r for r in GROWING if r in rep]
    best = min(growing, key=lambda r: rep[r]["recallable"]["mean"], default=None)
    best_gain = base - rep[best]["recallable"]["mean"] if best else math.nan
    kv = table.get("base", {}).get("state_bytes_moshi7b", {}).get("45000", math.nan)
    ms_base = table.get("base", {}).get("ms_per_frame")
    for row in FIXED_MEMORIES:
        if row not in table:
            continue
        r, checks, words, notes = table[row], {}, [], []
        four = shares.get(row, {}).get("4x", {}).get("share", math.nan)
        eight = shares.get(row, {}).get("8x", {}).get("share", math.nan)
        if "needle_shares" in recall:
            checks["needle_4x"] = bool(four >= NEEDLE_TARGET)
            words.append(
                f"needle at 4 windows {100 * four:.0f} % of perfect recall (target "
                f"{100 * NEEDLE_TARGET:.0f} %; 8 windows: {100 * eight:.0f} %)"
            )
        else:  # not measured is not a failure: say why
            notes.append(recall.get("needle_error", "needles not computed"))
        if best is None or row not in rep:  # nothing to compare with is not a failure
            notes.append("repeated bytes not compared: no growing-state row (" + ", ".join(GROWING)
                         + ") in --rows")  # fmt: skip
        else:
            gain = base - rep[row]["recallable"]["mean"]
            ratio = gain / best_gain if best_gain > 0 else math.nan
            checks["repeat_bytes"] = bool(ratio >= REPEAT_TARGET)
            words.append(f"repeated bytes {100 * ratio:.0f} % of {best}'s gain "
                         f"(target {100 * REPEAT_TARGET:.0f} %)")  # fmt: skip
        beyond = r["ce_beyond"]["mean"]
        rivals = {k: table[k]["ce_beyond"]["mean"] for k in ("e2e", "dyneval") if k in table}
        if row == "e2e_meta_assoc" and "e2e_meta" in table:
            rivals["e2e_meta"] = table["e2e_meta"]["ce_beyond"]["mean"]
        checks["real_text"] = all(beyond <= v for v in rivals.values())
        words.append("real text beyond the window at least " + (", ".join(rivals) or "-"))
        harm = r["vs_base_within"]["difference"]
        checks["no_harm"] = bool(harm <= HARM_TOLERANCE)
        words.append(f"inside the window, {row} - base {harm:+.4f} (at most +{HARM_TOLERANCE})")
        state = r["state_bytes_moshi7b"]["45000"] - kv
        checks["state"] = bool(state <= kv)
        words.append(f"7B state {state / 2**30:.2f} GiB (fixed; at most the window's KV "
                     f"{kv / 2**30:.2f} GiB)")  # fmt: skip
        ms = r.get("ms_per_frame")
        if ms is not None and ms_base:
            checks["cost"] = bool(ms <= COST_TARGET * ms_base)
            words.append(f"{ms / ms_base:.1f}x the base's ms per frame (at most {COST_TARGET:g}x)")
        out[row] = checks
        out["lines"].append(
            f"{row}: "
            + "; ".join(
                notes
                + [f"{w} {'MET' if ok else 'NOT MET'}" for w, ok in zip(words, checks.values())]
            )
        )
    return out


# data with audio, per row, beside the headline: metric -> the suffix of its key
# ``vs_base_beyond_<suffix>`` (``<metric>_beyond``: its value)
SECONDARY_METRICS = {"text_ce": "text", "audio_ce": "audio", "cb0": "cb0", MOSHI_LOSS: "moshi"}
QUICK_MARK = "[--quick: a smoke test of the pipeline, not a measurement] "
SIGN = "row - base, negative: the row helps"  # docs/evaluation.md, "Sign convention"


def verdict(table: dict[str, Any], recall: dict[str, Any] | None = None,
            quick: bool = False) -> dict[str, Any]:  # fmt: skip
    """The targets, for the rows present.

    ``retrofit`` (the real-data issue): inside the window at most ``HARM_TOLERANCE`` worse than
    the base; beyond it better than the base (interval excluding 0) and at least as good as
    ``dyneval``. ``e2e`` (the end-to-end issue): beyond the window at least as good as
    ``dyneval``; ``e2e_meta``: at least 1.5x the gain of ``e2e`` beyond the window; both at most
    ``HARM_TOLERANCE`` worse than the base inside it."""
    lines: list[str] = []
    out: dict[str, Any] = {"no_harm": None, "helps": None}
    dyn = table.get("dyneval")
    if dyn is not None:
        d = dyn["vs_base_beyond"]
        lines.append(f"dyneval - base beyond the window: {d['difference']:+.4f} nats "
                     f"[{d['lo']:+.4f}, {d['hi']:+.4f}] ({SIGN})")  # fmt: skip
    for name in ("retrofit", "e2e", "e2e_meta"):
        r = table.get(name)
        if r is None:
            continue
        within, beyond = r["vs_base_within"]["difference"], r["vs_base_beyond"]
        harm = "no harm" if within <= HARM_TOLERANCE else "HARM"
        lines.append(f"{name} - base: inside the window {within:+.4f} nats ({harm}, tolerance "
                     f"{HARM_TOLERANCE}); beyond {beyond['difference']:+.4f} "
                     f"[{beyond['lo']:+.4f}, {beyond['hi']:+.4f}] ({SIGN})")  # fmt: skip
        no_harm = bool(within <= HARM_TOLERANCE and beyond["difference"] <= 0)
        beats_dyn = dyn is None or r["ce_beyond"]["mean"] <= dyn["ce_beyond"]["mean"]
        if name == "retrofit":
            out["no_harm"] = no_harm
            out["helps"] = bool(beyond["hi"] < 0) and beats_dyn
            helps = "MET" if out["helps"] else "NOT MET"
            lines.append(f"retrofit: do no harm {'MET' if no_harm else 'NOT MET'}; help (beats "
                         f"the base and dyneval) {helps}")  # fmt: skip
        elif name == "e2e":
            out["e2e_no_harm"] = no_harm
            out["e2e_at_least_dyneval"] = bool(beats_dyn)
            lines.append(f"e2e (no training): at least dyneval beyond the window "
                         f"{'MET' if beats_dyn else 'NOT MET'}; no harm "
                         f"{'MET' if no_harm else 'NOT MET'}")  # fmt: skip
        else:
            zero = table.get("e2e")
            gain = zero["vs_base_beyond"]["difference"] if zero else math.nan
            ratio = beyond["difference"] / gain if gain < 0 else math.nan
            out["e2e_meta_no_harm"] = no_harm
            out["e2e_meta_gain_ratio"] = ratio
            ok = bool(math.isfinite(ratio) and ratio >= 1.5)
            lines.append(f"e2e_meta: {ratio:.2f}x the zero-training gain beyond the window "
                         f"(target 1.5x: {'MET' if ok else 'NOT MET'}); no harm "
                         f"{'MET' if no_harm else 'NOT MET'}")  # fmt: skip
            static = table.get("e2e_meta_static")
            if static is not None:  # what the updates add to the trained weights alone
                own = {p: r[f"ce_{p}"]["mean"] - static[f"ce_{p}"]["mean"]
                       for p in ("within", "beyond")}  # fmt: skip
                out["e2e_meta_updates_gain"] = own
                lines.append(f"e2e_meta minus its static control (the test-time updates' own "
                             f"part): inside the window {own['within']:+.4f}, beyond "
                             f"{own['beyond']:+.4f} nats (negative: the updates help); the "
                             "static control alone - base (inside / beyond): "
                             f"{static['vs_base_within']['difference']:+.4f} / "
                             f"{static['vs_base_beyond']['difference']:+.4f}")  # fmt: skip
    rv = recall_verdict(table, recall)
    out["recall"] = {k: v for k, v in rv.items() if k != "lines"}
    lines += rv["lines"]
    out["lines"] = [QUICK_MARK + x if quick else x for x in (lines or ["no memory row"])]
    return out


def _fmt(ci: dict | None, key: str = "mean") -> str:
    if not ci or not math.isfinite(ci.get(key, math.nan)):
        return "-"
    return f"{ci[key]:.4f} [{ci['lo']:.4f}, {ci['hi']:.4f}]"


def write_report(out: Path, s: Any, results: dict, curves: dict,
                  runs: dict) -> Path:  # fmt: skip
    C = s.context
    study = results.get("study")  # moshi-ttt study: a base and data the user gave
    title = ("moshi-ttt study: does a memory help this model on this data?" if study
             else "moshi-ttt demo: does a memory help on real data?")  # fmt: skip
    report = Report(title, out)
    if results.get("quick"):
        report.add_text(
            f"**{QUICK_MARK.strip()}**: `--quick` trains for a few steps on a few "
            "files; its numbers and verdicts only show that every step runs."
        )
    c = results["corpus"]
    text_as = (study or {}).get("text_as_label", "bytes as text tokens")
    split = ("train, validation and held-out folders as given" if study and study["split"] != "hash"
             else "files split by a hash of their path")  # fmt: skip
    if study:
        base = (f"The base is `{study['base']}` ({study['layers']} layers, width "
                f"{study['width']}) with an attention window of C = {C} frames, frozen (not "
                "trained here).")  # fmt: skip
    else:
        base = (f"The base is a tiny Moshi ({s.model.get('num_layers', 4)} layers) with an "
                f"attention window of C = {C} frames, trained {s.base_steps} steps, then "
                "frozen.")  # fmt: skip
    report.add_text(
        "## The data\n\n"
        f"`{c['root']}` ({c['kind']}): {c['sequences']['train']} training, "
        f"{c['sequences']['val']} validation and {c['sequences']['test']} held-out sequences of "
        f"{s.frames} frames ({text_as}); {split}. "
        f"Skipped: {c['skipped'] or 'none'}" + (f"; {c['capped']}" if c["capped"] else "") + ". "
        f"Scored: {results['held_out_sequences']} sequences of {results['held_out_files']} "
        "held-out files (round robin over the files; intervals resample files).\n\n" + base
    )
    rows = []
    for name, r in results["rows"].items():
        rows.append([ROW_TEXT.get(name, name), _fmt(r["ce_within"]), _fmt(r["ce_beyond"]),
                     _fmt(r["vs_base_within"], "difference"),
                     _fmt(r["vs_base_beyond"], "difference"),
                     "-" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}",
                     "-" if r["ms_per_frame"] is None else f"{r['ms_per_frame']:.2f}",
                     f"{r['state_bytes_moshi7b']['45000'] / 2**30:.2f}"])  # fmt: skip
    metric = results.get("metric", "text_ce")
    report.add_text(
        f"## Result\n\n{metric_label(results)[0]} inside (frames < C) and beyond the window, "
        "95 % bootstrap intervals over files; differences are row - base, paired over files "
        "(negative: better than the base, the memory helps). Every setting of a memory was "
        f"chosen on validation by this measure. State: GiB per conversation for Moshi 7B at "
        "45,000 frames (1 hour)."
    )
    short = COLUMN_LABELS.get(metric, metric)
    report.add_table(["model", f"{short} < {C}", f"{short} >= {C}", "row - base < C",
                      "row - base >= C", "train s", "ms/frame here", "GiB @ 1 h (7B)"],
                     rows)  # fmt: skip
    secondary = [(m, k) for m, k in SECONDARY_METRICS.items()
                 if any(f"{m}_beyond" in r for r in results["rows"].values())]  # fmt: skip
    if secondary:  # data with audio
        report.add_text(
            "The other measures beyond the window (nats per token), the same files and "
            "intervals: text CE; audio CE, the 8 codebooks' mean; codebook 0 (semantic), which "
            "moshi's training loss weighs 100x the others. The recall memories mix into the "
            "text stream only, so their audio CE is their base's."
        )
        head = ["model"] + [x for m, _ in secondary
                            for x in (f"{COLUMN_LABELS[m]} >= {C}", "row - base")]  # fmt: skip
        report.add_table(head, [[ROW_TEXT.get(n, n)] + [
            x for m, k in secondary
            for x in (_fmt(r.get(f"{m}_beyond")), _fmt(r.get(f"vs_base_beyond_{k}"),
                                                        "difference"))]
            for n, r in results["rows"].items()])  # fmt: skip
    report.add_text("\n".join(f"- {line}" for line in results["verdict"]["lines"]))
    if "dyneval" in results["rows"]:
        d = results["rows"]["dyneval"]["details"]
        report.add_text(
            f"Dynamic evaluation setting chosen on {counted(d, 'validation')}: "
            f"{d['label']} (validation {COLUMN_LABELS[metric]} beyond the window: "
            + ", ".join(f"{v['label']}: {v[metric]:.4f}" for v in d["validation"])
            + ")."
        )
    if "e2e" in results["rows"] or "e2e_meta" in results["rows"]:
        d = results["rows"].get("e2e", {}).get("details") or {}
        m = results["rows"].get("e2e_meta", {}).get("details") or {}
        text = "End-to-end memory: "
        if d:
            text += (f"setting chosen on {counted(d, 'validation')}: {d['label']} "
                     f"(validation {COLUMN_LABELS[metric]} beyond the window: "
                     + ", ".join(f"width {v['hidden']} lr {v['lr']:g} K {v['chunk']}: "
                                 f"{v[metric]:.4f}" for v in d["validation"])
                     + f"); {d['ms_per_update']:.1f} ms per update here, "
                     f"{d['rollbacks']} rollbacks. ")  # fmt: skip
        if m:
            lrs = ", ".join(f"{x:.3g}" for x in m["inner_lr_learned"])
            text += f"Meta-trained inner lr: {lrs}; {m['rollbacks']} rollbacks."
        report.add_text(text)
    recall = results.get("recall")
    if recall:
        _recall_section(report, results, recall, C)
    styles = row_styles([*results["rows"], *curves])  # one colour and marker per row
    write_long_context_section(report, curves, context=C, bin_frames=s.bin_frames,
                               reference="base", metric=metric, gain_plot=False,
                               styles=styles,
                               title="Loss against position (held-out files)")  # fmt: skip
    plot_vs_base(report, results["rows"], C, styles, metric_label(results)[1])
    report.data.update(results=results, runs={k: str(v) for k, v in runs.items()})
    return report.write()


def counted(details: dict, split: str) -> str:
    """What a choice was made on: ``"12 sequences from 3 files"`` when ``details`` has both
    ``{split}_sequences`` and ``{split}_files`` (files = distinct source files), else (older
    results.json, whose ``{split}_files`` counted sequences) ``"12 {split} sequences"``."""
    seqs, files = details.get(f"{split}_sequences"), details.get(f"{split}_files")
    if seqs is not None and files is not None:
        return f"{seqs} {split} sequences from {files} files"
    n = seqs if seqs is not None else files
    return f"{n} {split} sequences" if n is not None else f"the {split} sequences"


def metric_label(results: dict[str, Any]) -> tuple[str, str]:
    """The headline measure of ``results.json`` in words: ``(sentence start, axis label)``:
    text CE per byte (the demo, bytes as text) or per token, or moshi's loss."""
    if results.get("metric") == MOSHI_LOSS:
        return ("moshi-finetune's loss (nats: text CE with PAD/EPAD weighed 0.5 plus audio CE "
                "with codebook 0 weighed 100, the sum of two token-weighted means)",
                "moshi loss (nats)")  # fmt: skip
    unit = "byte" if (results.get("study") or {}).get("text_as", "bytes") == "bytes" else "token"
    return f"Text CE (nats per {unit})", f"text CE (nats per {unit})"


def plot_vs_base(report: Report, rows: dict[str, Any], C: int,
                 styles: dict[str, dict[str, str]] | None = None,
                 measure: str = "text CE (nats per byte)") -> None:  # fmt: skip
    """``vs_base.png``: each row minus the base, inside and beyond the window, with its 95 %
    interval over files (``vs_base_within`` / ``vs_base_beyond``: ``difference``, ``lo``,
    ``hi``); the base is the reference (0), not a row of the plot."""
    names = [n for n, r in rows.items() if n != "base" and r.get("vs_base_beyond")]
    if not names:
        return
    styles = styles or row_styles(rows)
    parts = (("vs_base_within", f"inside the window (frames < {C})"),
             ("vs_base_beyond", f"beyond the window (frames >= {C})"))  # fmt: skip
    fig, axes = report.figure(10.0, max(3.0, 0.45 * len(names) + 1.5), ncols=2, sharey=True)
    ys = list(range(len(names)))[::-1]  # the first row at the top
    for ax, (key, where) in zip(axes, parts):
        for y, name in zip(ys, names):
            ci = rows[name].get(key) or {}
            d = ci.get("difference", math.nan)
            lo, hi = ci.get("lo", math.nan), ci.get("hi", math.nan)
            has = lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi)
            err = [[d - lo], [hi - d]] if has else None
            ax.errorbar([d], [y], xerr=err, fmt=styles[name]["marker"], ms=7, capsize=4,
                        color=styles[name]["color"], label=name)  # fmt: skip
        ax.axvline(0, color="k", lw=0.8)
        ax.set(title=where, xlabel=f"row - base, {measure}")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(ys, names)
    fig.suptitle("Row - base (negative: the row helps), 95 % interval over files")
    legend_outside(axes[-1])
    report.add_figure(
        fig, "vs_base.png",
        "Each row minus the base, inside and beyond the window (negative: the row helps; "
        "bars: 95 % bootstrap interval over files, paired)",
    )  # fmt: skip


def _pct(ci: dict | None) -> str:
    if not ci or not math.isfinite(ci.get("share", math.nan)):
        return "-" if not ci else (ci.get("note") or "-")
    lo, hi = ci.get("lo", math.nan), ci.get("hi", math.nan)
    if not math.isfinite(lo):
        return f"{100 * ci['share']:.0f} %"
    return f"{100 * ci['share']:.0f} % [{100 * lo:.0f}, {100 * hi:.0f}]"


def _recall_section(report: Report, results: dict, recall: dict, C: int) -> None:
    """Recall: repeated bytes and needle shares per row, the memory rows' choices, a plot."""
    n, spec = recall["repeat_n"], recall["needle"]
    rep, shares = recall.get("repeat", {}), recall.get("needle_shares", {})
    dists = [f"{m}x" for m in spec["distances"]]
    rows = []
    for name in results["rows"]:
        r = rep.get(name, {})
        sh = shares.get(name, {})
        rows.append([name, _fmt(r.get("recallable")),
                     _fmt(r.get("recallable", {}).get("vs_reference"), "difference"),
                     _fmt(r.get("other")), *[_pct(sh.get(d)) for d in dists]])  # fmt: skip
    tokens = rep.get("base", {}).get("recallable", {}).get("tokens", 0)
    other = rep.get("base", {}).get("other", {}).get("tokens", 0)
    needle = (f"{recall.get('needle_files', 0)} held-out files" if "needle_shares" in recall
              else recall.get("needle_error", "not computed"))  # fmt: skip
    report.add_text(
        "## Recall\n\n"
        f"**Repeated bytes**: beyond the window, positions whose {n} preceding bytes occurred "
        f"earlier in the file only with their next byte more than C = {C} frames back "
        f"({tokens:.0f} such bytes; {other:.0f} others). **Needles** ({needle}): the phrase "
        f"` key=value;` (key {spec['key_len']} letters, value {spec['value_len']} hex digits) "
        f"{spec['lead']} frames in, asked again m windows later; the value's bytes at the query "
        "are scored. Share = (the row's CE when another key and value came early, or the base's "
        "there if lower, - its CE when this one did) / the base's CE in the first case (perfect "
        "recall: 0 nats), 95 % "
        "interval over files. Rows not scored on needles: "
        f"{', '.join(recall.get('not_scored', [])) or 'none'}."
        + _window_ceiling(shares.get("base", {}))
    )
    report.add_table(["row", "CE recallable", "row - base", "CE other bytes",
                      *[f"needle {d}" for d in dists]], rows)  # fmt: skip
    memories = [r for r in ("cache", "retrieval", "assoc", "e2e_assoc", "e2e_meta_assoc")
                if r in results["rows"] and "details" in results["rows"][r]]  # fmt: skip
    chosen = [f"`{r}`: {results['rows'][r]['details']['label']} on "
              f"`{results['rows'][r]['details'].get('on', 'base')}`" for r in memories]  # fmt: skip
    if chosen:
        on = counted(results["rows"][memories[0]]["details"], "validation")
        report.add_text(f"Memory settings chosen on {on} (best beyond the window "
                        "among those within the harm tolerance inside it): "
                        + "; ".join(chosen) + ".")  # fmt: skip
    if shares:
        _plot_needles(report, shares, spec["distances"], row_styles([*results["rows"], *shares]))


def _plot_needles(report: Report, shares: dict, distances: list[int],
                  styles: dict[str, dict[str, str]] | None = None) -> None:  # fmt: skip
    fig, ax = report.figure(width=10.0, height=5.0)
    rows = list(shares)
    styles = styles or row_styles(rows)
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        sh = [shares[row].get(f"{m}x", {}) for m in distances]
        y = [100 * x.get("share", math.nan) for x in sh]
        lo = [100 * x.get("lo", math.nan) for x in sh]
        hi = [100 * x.get("hi", math.nan) for x in sh]
        x = [k + (i - (len(rows) - 1) / 2) * width for k in range(len(distances))]
        err = [[max(0.0, a - b) if math.isfinite(b) else 0.0 for a, b in zip(y, lo)],
               [max(0.0, b - a) if math.isfinite(b) else 0.0 for a, b in zip(y, hi)]]  # fmt: skip
        st = styles[row]
        ax.bar(x, y, width=width, yerr=err, capsize=2, color=st["color"], alpha=0.75)
        ax.plot(x, y, ls="none", marker=st["marker"], color=st["color"], mec="k", label=row)
    ax.axhline(100 * NEEDLE_TARGET, color="grey", ls="--", lw=0.8)
    ax.set_xticks(range(len(distances)), [f"{m} windows" for m in distances])
    ax.set(ylabel="share of perfect recall (%)",
           title="Needle recall by distance (95 % intervals; dashed: the target)")  # fmt: skip
    legend_outside(ax)
    report.add_figure(fig, "needle_recall.png", "Needle recall: the share of perfect recall")


def _window_ceiling(base: dict) -> str:
    """Whether the base copies a value it sees: its CE on the value with the phrase inside the
    window against another phrase early (the issue's ceiling, where it exists)."""
    if not base:
        return ""
    any_ = next(iter(base.values()))
    inside, floor = any_["ce_inside"], any_["ce_base_floor"]
    verdict = ("it copies: the window's share is in results.json (`window`)"
               if floor - inside > 0.1 * floor else
               "it does not copy what it sees, so the window gives no ceiling and the share "
               "is taken of perfect recall")  # fmt: skip
    return (
        f" The base on the value with the phrase inside its window: {inside:.3f} nats per "
        f"byte, with another phrase early: {floor:.3f}; {verdict}."
    )
