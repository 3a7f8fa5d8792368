"""Retrofit study: TTT added to a *frozen*, pretrained attention-only model (the demo task).

For each seed: train the attention-only base from scratch (as ``make demo`` does), export it
(``moshi-ttt export``), then fine-tune variants on the frozen base through the real trainer and
evaluate them with ``eval long-context`` (controls: state reset every ``context`` frames, gate 0).
Every result is appended to ``OUT/results.jsonl`` (one line per run; a rerun skips what is
there), so the study can be stopped and resumed.

    python benchmarks/retrofit_study.py --out study_out --variants base_linear0,last_after_ffn \
        --seeds 0,1,2

Rows: beyond-window text CE, share of the available gain (base - model) / (base - oracle),
the controls, the gate trajectory (from ``metrics.jsonl``) and wall times.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from moshi.utils.compile import no_compile

from moshi_ttt.data.pipeline import ShardSource
from moshi_ttt.demo.markov import DemoSettings, train_config
from moshi_ttt.demo.markov_task import MarkovTask, write_shards
from moshi_ttt.eval.long_context import evaluate_long_context
from moshi_ttt.integration.apply import ttt_modules
from moshi_ttt.models.export import export_run
from moshi_ttt.train.checkpoint import load_trained_model
from moshi_ttt.train.config import TrainConfig
from moshi_ttt.train.trainer import train

# name -> (ttt config, top-level overrides). The base is frozen in all of them.
LINEAR0 = {"layers": "0", "placement": "before_attention", "kind": "linear",
           "mini_batch_size": 8, "base_lr": 1.0, "gate_init": 1.0}  # fmt: skip
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "linear0_before": (LINEAR0, {}),
    "linear1_after_ffn": ({**LINEAR0, "layers": "1", "placement": "after_ffn"}, {}),
    "linear1_after_attn": ({**LINEAR0, "layers": "1", "placement": "after_attention"}, {}),
    "linear0_after_ffn": ({**LINEAR0, "placement": "after_ffn"}, {}),
}


def parse_variant(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``base[+key=value...]``: a named variant with TTT (``ttt.k=v``) or top-level overrides."""
    base, *mods = name.split("+")
    ttt, top = dict(VARIANTS[base][0]), dict(VARIANTS[base][1])
    for mod in mods:
        key, _, value = mod.partition("=")
        v: Any = json.loads(value) if value[:1] in "-0123456789[{tf" else value
        if key.startswith("ttt."):
            ttt[key[4:]] = v
        else:
            top[key] = v
    return ttt, top


def set_key(d: dict, dotted: str, value: Any) -> None:
    *path, last = dotted.split(".")
    for p in path:
        d = d.setdefault(p, {})
    d[last] = value


def evaluate(run: Path, files: list, s: DemoSettings) -> dict[str, Any]:
    lm, _ = load_trained_model(run)
    res = evaluate_long_context(lm, files, chunk_frames=s.chunk_frames, reset_every=s.context,
                                controls=("reset", "no_ttt"), bin_frames=s.bin_frames,
                                progress=False)  # fmt: skip
    C = s.context
    m = s.task.metric
    out = {k: {"within": v.totals(0, C)[m], "beyond": v.totals(C)[m]}
           for k, v in res.variants.items()}  # fmt: skip
    gates = [float(m.gate().abs().mean()) for _, m in ttt_modules(lm) if hasattr(m, "gate")]
    out["gate"] = gates[0] if gates else None
    return out


def gate_trajectory(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    traj = []
    for r in rows:
        g = [v for k, v in r.items() if k.startswith("gate")]
        if g and r.get("split", "train") == "train":
            traj.append((r["step"], float(np.mean(g))))
    return traj


GATE_PLOT = (
    "linear0_before",
    "linear0_before+model.train_context=4",
    "linear0_before+model.train_context=4+ttt_lr=0.05",
    "linear0_before+model.train_context=4+ttt.gate_init=0.0",
    "linear0_before+ttt.output_init=zero+ttt_lr=0.1",
    "linear1_after_ffn+ttt.input=embeddings+model.train_context=4",
)


def summarize(out: Path, plots: Path | None, gate_variants: tuple[str, ...] = GATE_PLOT) -> None:
    """Print the markdown table (mean and spread over seeds per variant) and draw the plots."""
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    groups: dict[str, list[dict]] = {}
    for r in recs:
        if r["variant"] != "base":
            groups.setdefault(f"{r['variant']} ({r['steps']} steps)", []).append(r)
    bases = [r for r in recs if r["variant"] == "base"]
    base_text = ", ".join(f"seed {b['seed']} {b['beyond']:.3f}" for b in bases)
    oracle_text = ", ".join(f"{b['oracle_beyond']:.3f}" for b in bases)
    print(f"base beyond: {base_text}; oracle: {oracle_text}")
    print("| variant | seeds | CE beyond | share of gain % (mean ± sd) | reset share % | gate |")
    print("|---|---|---|---|---|---|")
    for name, rs in groups.items():
        sh = np.array([100 * r["share"] for r in rs])
        spread = f" ± {sh.std(ddof=1):.1f}" if len(rs) > 1 else ""
        gates = [r["gate"] for r in rs if r["gate"] is not None]
        seeds = ",".join(str(r["seed"]) for r in rs)
        each = ", ".join(f"{x:.1f}" for x in sh)
        reset = np.mean([100 * r["reset_share"] for r in rs])
        gate = f"{np.mean(gates):.2f}" if gates else "-"
        print(f"| {name} | {seeds} | {np.mean([r['beyond'] for r in rs]):.3f} | "
              f"{sh.mean():.1f}{spread} ({each}) | {reset:.1f} | {gate} |")  # fmt: skip
    if plots is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(groups) + 1.5))
    names = list(groups)
    means = [np.mean([100 * r["share"] for r in groups[n]]) for n in names]
    ax.barh(range(len(names)), means, color=["C2" if m >= 50 else "C7" for m in means])
    for i, n in enumerate(names):
        ax.plot([100 * r["share"] for r in groups[n]], [i] * len(groups[n]), "k.", ms=4)
    ax.axvline(50, color="C3", ls="--", lw=1, label="target 50 %")
    ax.set_yticks(range(len(names)), [n.replace(" (300 steps)", "") for n in names], fontsize=7)
    ax.set(xlabel="share of the available gain beyond the window (%), frozen base")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(plots / "retrofit_share.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    for n in names:
        for r in groups[n][:1]:
            if r.get("gate_traj") and r["variant"] in gate_variants and r["steps"] == 300:
                st, g = zip(*r["gate_traj"], strict=True)
                ax.plot(st, g, label=n.replace(" (300 steps)", ""), lw=1)
    ax.set(xlabel="optimizer step", ylabel="mean |tanh(alpha)|", title="Gate trajectories (seed 0)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(plots / "retrofit_gates.png", dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="study_out")
    ap.add_argument("--summarize", action="store_true", help="print the table, no training")
    ap.add_argument("--plots", type=Path, help="with --summarize: write the plots here")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument(
        "--stream",
        choices=["text", "audio"],
        default="text",
        help="where the task's symbols live (audio: Moshi's codebook 0)",
    )
    args = ap.parse_args()
    if args.summarize:
        return summarize(Path(args.out), args.plots)
    torch.set_num_threads(1)
    s = DemoSettings(task=MarkovTask(seq_len=256, stream=args.stream))
    out = Path(args.out)
    log = out / "results.jsonl"
    done = {json.loads(x)["key"] for x in log.read_text().splitlines()} if log.exists() else set()
    with no_compile():
        for seed in [int(x) for x in args.seeds.split(",")]:
            data = out / f"data{seed}"
            if not (data / "train" / "shards.json").exists():
                write_shards(data / "train", s.task, s.train_sequences, seed=2 * seed)
                write_shards(data / "eval", s.task, s.eval_sequences, seed=2 * seed + 1)
            src = ShardSource(data / "eval")
            files = [(src.name(i), src.codes(i)) for i in range(len(src))]
            base_run = out / f"seed{seed}" / "base"
            base_dir = out / f"seed{seed}" / "base_export"
            if not (base_dir / "config.json").exists():
                cfg = train_config(s, "base", data / "train", out / f"seed{seed}", seed)
                cfg = TrainConfig.from_dict({**cfg.to_dict(), "run_dir": str(base_run)})
                train(cfg, progress=False, device="cpu")
                export_run(base_run, base_dir)
            if f"{seed}/base" not in done:
                r = evaluate(base_run, files, s)
                oracle = float(np.mean([s.task.oracle_nll(s.task.symbols_of(c))[s.context:]
                                        for _, c in files]))  # fmt: skip
                rec = {"key": f"{seed}/base", "seed": seed, "variant": "base",
                       "beyond": r["no_ttt"]["beyond"], "within": r["no_ttt"]["within"],
                       "oracle_beyond": oracle}  # fmt: skip
                log.open("a").write(json.dumps(rec) + "\n")
                done.add(rec["key"])
            base_rec = [json.loads(x) for x in log.read_text().splitlines()
                        if json.loads(x)["key"] == f"{seed}/base"][0]  # fmt: skip
            for name in args.variants.split(","):
                key = f"{seed}/{name}/{args.steps}"
                if key in done:
                    continue
                ttt, top = parse_variant(name)
                d = train_config(s, "scratch", data / "train", out / f"seed{seed}", seed).to_dict()
                d["run_dir"] = str(out / f"seed{seed}" / f"{name}-{args.steps}")
                d["max_steps"] = args.steps
                d["model"] = {"source": "local", "path": str(base_dir), "dtype": "float32",
                              "gradient_checkpointing": False, "train_base": False}  # fmt: skip
                d["ttt"] = ttt
                for k, v in top.items():
                    set_key(d, k, v)
                cfg = TrainConfig.from_dict(d)
                t0 = time.perf_counter()
                train(cfg, progress=False, device="cpu")
                wall = time.perf_counter() - t0
                r = evaluate(Path(cfg.run_dir), files, s)
                b, o = base_rec["beyond"], base_rec["oracle_beyond"]

                def share(x: float, b: float = b, o: float = o) -> float:
                    return (b - x) / (b - o)

                reset = next(v for k, v in r.items() if k.startswith("reset"))
                rec = {"key": key, "seed": seed, "variant": name, "steps": args.steps,
                       "beyond": r["ttt"]["beyond"], "within": r["ttt"]["within"],
                       "share": share(r["ttt"]["beyond"]), "reset_beyond": reset["beyond"],
                       "reset_share": share(reset["beyond"]), "gate0_beyond": r["no_ttt"]["beyond"],
                       "gate": r["gate"], "gate_traj": gate_trajectory(Path(cfg.run_dir))[::10],
                       "wall_s": wall}  # fmt: skip
                log.open("a").write(json.dumps(rec) + "\n")
                print(f"{key}: beyond {rec['beyond']:.3f} share {100 * rec['share']:.1f}% "
                      f"reset {100 * rec['reset_share']:.1f}% gate {rec['gate']} ({wall:.0f}s)",
                      flush=True)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
