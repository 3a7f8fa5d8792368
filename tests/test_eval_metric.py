"""The headline metric of the long-context and inner-loss reports: audio CE when audio tokens
are scored beyond the attention context, else text CE (text-only shards such as the demo's
Markov task, audio rows -1); the printed summary equals the totals at 4 decimals; no table
column where nothing is scored; the gain and inner-loss plots draw the chosen metric."""

from __future__ import annotations

import json
import re
import shlex

import numpy as np
import pytest
import torch
from moshi.utils.compile import no_compile

from moshi_ttt.cli import build_parser
from moshi_ttt.data.pipeline import ShardSource
from moshi_ttt.demo.markov_task import MarkovTask, write_shards
from moshi_ttt.eval.inner_loss import evaluate_inner_loss, write_inner_loss_section
from moshi_ttt.eval.long_context import (
    FileLosses,
    PositionLosses,
    choose_metric,
    evaluate_long_context,
    summary_lines,
    write_long_context_section,
)
from moshi_ttt.eval.report import Report
from moshi_ttt.integration import TTTConfig, apply_ttt, build_tiny_lm

CONTEXT = 8
TTT = TTTConfig(
    layers="0", kind="linear", mini_batch_size=8, gate_init=1.0, placement="before_attention"
)


@pytest.fixture(autouse=True)
def _eager():
    with no_compile():
        yield


@pytest.fixture
def shards(tmp_path):
    """Two text-only sequences of 24 frames (audio rows -1), 3x the 8-frame context."""
    return write_shards(tmp_path / "shards", MarkovTask(seq_len=24), 2, seed=1)


def tiny_ttt_lm():
    lm = build_tiny_lm(0, context=CONTEXT, num_layers=2)
    torch.manual_seed(0)
    apply_ttt(lm, TTT)
    return lm.eval()


def text_files(shards):
    source = ShardSource(shards)
    return [(source.name(i), source.codes(i)) for i in range(len(source))]


def audio_files(lm, frames: int = 20):
    """Random audio in Moshi's 8 codebooks, text -1 (not scored)."""
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, lm.card, (17, frames), generator=g)
    codes[0] = -1
    return [("audio", codes)]


class RecordingReport(Report):
    """A ``Report`` that keeps the plotted lines of every figure: ``{file: {title: {label:
    y}}}``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lines: dict[str, dict[str, dict[str, np.ndarray]]] = {}

    def add_figure(self, fig, filename, caption):
        self.lines[filename] = {
            ax.get_title(): {ln.get_label(): np.asarray(ln.get_ydata(), float) for ln in ax.lines}
            for ax in fig.axes
        }
        return super().add_figure(fig, filename, caption)


def tables(md: str) -> list[tuple[list[str], list[list[str]]]]:
    """The markdown tables of ``md``: ``(header, rows)``."""
    out, lines = [], md.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            rows = []
            for row in lines[i + 2 :]:
                if not row.startswith("|"):
                    break
                rows.append([c.strip() for c in row.strip("|").split("|")])
            out.append(([c.strip() for c in line.strip("|").split("|")], rows))
    return out


def losses(T: int, text_upto: int, audio_upto: int) -> FileLosses:
    """Unit CE; text scored at positions < text_upto, every codebook at < audio_upto."""
    pos = torch.arange(T)
    text_mask, audio_mask = pos < text_upto, (pos < audio_upto).expand(8, T)
    return FileLosses(text_mask.float(), text_mask, audio_mask.float(), audio_mask)


@pytest.mark.parametrize(
    ("text_upto", "audio_upto", "expect"),
    [
        (20, 0, "text_ce"),  # text only
        (20, 20, "audio_ce"),  # both beyond the context
        (20, 5, "text_ce"),  # audio only inside the context, text beyond it
        (0, 20, "audio_ce"),  # audio only
        (5, 0, "text_ce"),  # nothing beyond the context: what is scored at all
        (5, 5, "audio_ce"),
        (0, 0, "audio_ce"),  # nothing scored
    ],
)
def test_choose_metric(text_upto, audio_upto, expect):
    c = PositionLosses()
    c.add(losses(20, text_upto, audio_upto))
    assert choose_metric({"a": c, "b": PositionLosses()}, context=8) == expect


def test_auto_metric_text_on_text_only_and_audio_on_audio(shards, tmp_path):
    lm = tiny_ttt_lm()
    kw = {"chunk_frames": 8, "reset_every": 8, "bin_frames": 8, "progress": False}
    text = evaluate_long_context(lm, text_files(shards), **kw)
    assert text.context == CONTEXT and text.metric == "auto"
    assert text.chosen_metric() == "text_ce" and text.to_dict()["metric"] == "text_ce"
    audio = evaluate_long_context(lm, audio_files(lm), **kw)
    assert audio.chosen_metric() == "audio_ce"
    # explicit override, kept through the report
    forced = evaluate_long_context(lm, audio_files(lm), metric="cb0", **kw)
    assert forced.chosen_metric() == "cb0" and forced.summary()["metric"] == "cb0"
    assert text.chosen_metric("audio_ce") == "audio_ce"
    with pytest.raises(ValueError, match="metric"):
        evaluate_long_context(lm, audio_files(lm), metric="wer", **kw)
    # the sections resolve "auto" the same way, and keep the demo's explicit call
    for result, expect in ((text, "text_ce"), (audio, "audio_ce")):
        report = Report("t", tmp_path / expect)
        data = write_long_context_section(report, result.variants, context=CONTEXT, bin_frames=8)
        assert data["metric"] == expect
    report = Report("t", tmp_path / "demo")
    data = write_long_context_section(
        report, text.variants, context=CONTEXT, bin_frames=8, metric="text_ce"
    )
    assert data["metric"] == "text_ce"


def test_report_tables_and_plots_text_only(shards, tmp_path):
    lm = tiny_ttt_lm()
    files = text_files(shards)
    res = evaluate_inner_loss(
        lm, files, chunk_frames=8, controls=("reset", "no_ttt"), reset_every=8, progress=False
    )
    report = RecordingReport("t", tmp_path / "text")
    data = write_long_context_section(report, res.variants, context=CONTEXT, bin_frames=8)
    inner = write_inner_loss_section(
        report, res.inner, bin_frames=8, model_curves=res.variants, context=CONTEXT
    )
    assert data["metric"] == inner["metric"] == "text_ce"
    report.write()
    md = (tmp_path / "text" / "report.md").read_text()
    assert "Headline metric: text CE" in md and "**Headline** (text CE beyond" in md
    assert "no file reaches past" not in md
    found = tables(md)
    assert len(found) == 2  # totals, gains
    for header, rows in found:
        assert not any("audio" in h or "cb" in h for h in header), header
        for j, h in enumerate(header[1:], 1):
            if h == "p" and all("no interval" in row[j - 1] for row in rows):
                continue  # fewer than 5 files: no p-value, and the CI column says so
            assert any(row[j] != "-" for row in rows), f"column {h!r} has no value"
    assert found[0][0][-1] == "text tokens" and "text CE >= ctx" in found[0][0]
    # the gain plot: ttt minus each control (negative: the memory helps), finite beyond the context
    gain = report.lines["gain_vs_position.png"]
    (curves,) = gain.values()
    for name in ("reset_every_8", "no_ttt"):
        assert np.isfinite(curves[f"ttt - {name}"]).all()
    # the inner-loss figure: the model panel draws text CE
    panels = report.lines["inner_loss_layer_0.png"]
    model = panels["model: text CE (same run)"]
    assert set(model) >= {"ttt", "no_ttt"} and all(np.isfinite(y).all() for y in model.values())
    comparison = report.lines["inner_vs_model_gain.png"]
    (lines,) = comparison.values()
    assert np.isfinite(lines["model text CE: (ttt - no_ttt) / no_ttt"]).all()


def test_audio_report_drops_the_text_columns(tmp_path):
    lm = tiny_ttt_lm()
    res = evaluate_long_context(
        lm, audio_files(lm), chunk_frames=8, controls=("no_ttt",), progress=False
    )
    report = Report("t", tmp_path)
    write_long_context_section(report, res.variants, context=CONTEXT, bin_frames=8)
    report.write()
    header = tables((tmp_path / "report.md").read_text())[0][0]
    assert header[:4] == ["curve", "audio CE", "cb0", "cb1-7"]
    assert "audio tokens" in header and not any("text" in h for h in header)


def test_cli_prints_the_totals_of_the_chosen_metric(shards, tmp_path, capsys):
    cfg = tmp_path / "ttt.yaml"
    TTT.to_yaml(cfg)
    out = tmp_path / "lc"
    argv = [
        "eval", "long-context", str(shards), "--tiny", "--ttt-config", str(cfg),
        *shlex.split("--device cpu --chunk-frames 8 --bin-frames 8 --reset-every 16"),
        *shlex.split("--speedup-frames 0 --no-progress --out"), str(out),
    ]  # fmt: skip
    args = build_parser().parse_args(argv)
    result = args.func(args)
    printed = capsys.readouterr().out
    ctx, metric = result.context, result.chosen_metric()
    assert metric == "text_ce" and list(result.variants) == ["ttt", "reset_every_16", "no_ttt"]
    beyond = re.search(rf"text CE beyond the context \(>= {ctx} frames\): (.*)", printed)
    inside = re.search(rf"text CE inside the context \(< {ctx} frames\): (.*)", printed)
    assert beyond and inside, printed
    for match, (a, b) in ((beyond, (ctx, None)), (inside, (0, ctx))):
        expect = ", ".join(f"{k} {v.totals(a, b)[metric]:.4f}" for k, v in result.variants.items())
        assert match.group(1) == expect
    for name in ("reset_every_16", "no_ttt"):
        d = result.variants["ttt"].totals(ctx)[metric] - result.variants[name].totals(ctx)[metric]
        assert f"text CE beyond the context: ttt - {name} = {d:+.4f} nats" in printed
    assert "audio CE" not in printed
    data = json.loads((out / "report.json").read_text())
    assert data["metric"] == data["result"]["metric"] == "text_ce"
    summary = data["result"]["summary"]
    for name, v in result.variants.items():
        assert summary["beyond_context"][name]["text_ce"] == v.totals(ctx)["text_ce"]
    assert summary["lines"] == summary_lines(result.summary())
    assert [ln for ln in printed.splitlines() if ln in summary["lines"]] == summary["lines"]


def test_every_metric_is_offered_by_the_commands_that_take_one():
    """``--metric`` of ``eval long-context`` and ``eval compare`` lists exactly ``METRICS``
    (moshi's loss included)."""
    from moshi_ttt.eval.long_context import METRICS

    parser = build_parser()
    for command, extra in ((("eval", "long-context"), {"auto"}), (("eval", "compare"), set())):
        sub = parser
        for word in command:
            sub = next(a for a in sub._actions if a.dest and a.choices and word in a.choices)
            sub = sub.choices[word]
        (metric,) = [a for a in sub._actions if a.dest == "metric"]
        assert set(metric.choices) == set(METRICS) | extra, metric.choices
