"""The real-data benchmark's verdict (the issues' targets, per row) and report
(``OUT/report.md`` with its table and plots); ``realdata`` computes what they show."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..eval.long_context import write_long_context_section
from ..eval.report import Report
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
    "retrofit": "**retrofit**: frozen base + TTT, shipped defaults",
    "retrofit_reset": "retrofit, TTT state reset every C frames (control)",
    "retrofit_gate0": "retrofit, gate forced to 0 (control)",
    "retrofit_forced": "frozen base + TTT, the mechanism recipe (layer 0, quarter window)",
    "lora_long": "frozen base + LoRA trained at the file's window (retrofit budget)",
    "full_attention": "base trained with attention over the whole file (same budget)",
    "full_attention_4x": "base trained with attention over the whole file (4x budget)",
    "scratch": "TTT + base trained together from scratch (attention window C)",
}


def verdict(table: dict[str, Any]) -> dict[str, Any]:
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
        lines.append(f"dyneval vs base beyond the window: {d['difference']:+.4f} nats "
                     f"[{d['lo']:+.4f}, {d['hi']:+.4f}]")  # fmt: skip
    for name in ("retrofit", "e2e", "e2e_meta"):
        r = table.get(name)
        if r is None:
            continue
        within, beyond = r["vs_base_within"]["difference"], r["vs_base_beyond"]
        harm = "no harm" if within <= HARM_TOLERANCE else "HARM"
        lines.append(f"{name} vs base: inside the window {within:+.4f} nats ({harm}, tolerance "
                     f"{HARM_TOLERANCE}); beyond {beyond['difference']:+.4f} "
                     f"[{beyond['lo']:+.4f}, {beyond['hi']:+.4f}]")  # fmt: skip
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
                             f"{own['beyond']:+.4f} nats; the static control alone vs base: "
                             f"{static['vs_base_within']['difference']:+.4f} / "
                             f"{static['vs_base_beyond']['difference']:+.4f}")  # fmt: skip
    out["lines"] = lines or ["no memory row"]
    return out


def _fmt(ci: dict | None, key: str = "mean") -> str:
    if not ci or not math.isfinite(ci.get(key, math.nan)):
        return "-"
    return f"{ci[key]:.4f} [{ci['lo']:.4f}, {ci['hi']:.4f}]"


def write_report(out: Path, s: Any, results: dict, curves: dict,
                  runs: dict) -> Path:  # fmt: skip
    C = s.context
    report = Report("moshi-ttt demo: does a memory help on real data?", out)
    c = results["corpus"]
    report.add_text(
        "## The data\n\n"
        f"`{c['root']}` ({c['kind']}): {c['sequences']['train']} training, "
        f"{c['sequences']['val']} validation and {c['sequences']['test']} held-out sequences of "
        f"{s.frames} frames (bytes as text tokens); files split by a hash of their path. "
        f"Skipped: {c['skipped'] or 'none'}" + (f"; {c['capped']}" if c["capped"] else "") + ". "
        f"Scored: {results['held_out_sequences']} sequences of {results['held_out_files']} "
        "held-out files (round robin over the files; intervals resample files).\n\n"
        f"The base is a tiny Moshi ({s.model.get('num_layers', 4)} layers) with an attention "
        f"window of C = {C} frames, trained {s.base_steps} steps, then frozen."
    )
    rows = []
    for name, r in results["rows"].items():
        rows.append([ROW_TEXT.get(name, name), _fmt(r["ce_within"]), _fmt(r["ce_beyond"]),
                     _fmt(r["vs_base_within"], "difference"),
                     _fmt(r["vs_base_beyond"], "difference"),
                     "-" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}",
                     "-" if r["ms_per_frame"] is None else f"{r['ms_per_frame']:.2f}",
                     f"{r['state_bytes_moshi7b']['45000'] / 2**30:.2f}"])  # fmt: skip
    report.add_text(
        "## Result\n\nText CE (nats per byte) inside (frames < C) and beyond the window, 95 % "
        "bootstrap intervals over files; differences are paired over files (< 0: better than "
        "the base). State: GiB per conversation for Moshi 7B at 45,000 frames (1 hour)."
    )
    report.add_table(["model", f"CE < {C}", f"CE >= {C}", "vs base < C", "vs base >= C",
                      "train s", "ms/frame here", "GiB @ 1 h (7B)"], rows)  # fmt: skip
    report.add_text("\n".join(f"- {line}" for line in results["verdict"]["lines"]))
    if "dyneval" in results["rows"]:
        d = results["rows"]["dyneval"]["details"]
        report.add_text(
            f"Dynamic evaluation setting chosen on {d['validation_files']} validation files: "
            f"{d['label']} (validation CE beyond the window: "
            + ", ".join(f"{v['label']}: {v['text_ce']:.4f}" for v in d["validation"])
            + ")."
        )
    if "e2e" in results["rows"] or "e2e_meta" in results["rows"]:
        d = results["rows"].get("e2e", {}).get("details") or {}
        m = results["rows"].get("e2e_meta", {}).get("details") or {}
        text = "End-to-end memory: "
        if d:
            text += (f"setting chosen on {d['validation_files']} validation files: {d['label']} "
                     "(validation CE beyond the window: "
                     + ", ".join(f"width {v['hidden']} lr {v['lr']:g} K {v['chunk']}: "
                                 f"{v['text_ce']:.4f}" for v in d["validation"])
                     + f"); {d['ms_per_update']:.1f} ms per update here, "
                     f"{d['rollbacks']} rollbacks. ")  # fmt: skip
        if m:
            lrs = ", ".join(f"{x:.3g}" for x in m["inner_lr_learned"])
            text += f"Meta-trained inner lr: {lrs}; {m['rollbacks']} rollbacks."
        report.add_text(text)
    write_long_context_section(report, curves, context=C, bin_frames=s.bin_frames,
                               reference="base", metric="text_ce",
                               title="Loss against position (held-out files)")  # fmt: skip
    report.data.update(results=results, runs={k: str(v) for k, v in runs.items()})
    return report.write()
