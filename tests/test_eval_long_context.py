"""Long-context, inner-loss and gating evaluation on the tiny model: chunked == token-by-token
streaming == LMModel.forward, the controls, inputs in every layout with bad-file accounting,
and the CLI reports (synthetic sine/noise audio written here, wav and flac)."""

from __future__ import annotations

import json
import math
import re
import shlex
import struct

import matplotlib.pyplot as plt
import numpy as np
import pytest
import sphn
import torch
from moshi.utils.compile import no_compile
from safetensors.torch import save_file

from moshi_ttt.cli import main
from moshi_ttt.eval.gating import parse_gates
from moshi_ttt.eval.inner_loss import evaluate_inner_loss, verdict
from moshi_ttt.eval.inputs import EvalInputs, StreamPlacement
from moshi_ttt.eval.long_context import (
    Variant,
    evaluate_long_context,
    evaluate_variants,
    segments,
    stream_losses,
)
from moshi_ttt.eval.report import Report
from moshi_ttt.integration import TTTConfig, apply_ttt, build_tiny_lm, ttt_modules
from moshi_ttt.models.codec import build_tiny_mimi
from moshi_ttt.train.loss import _masked_ce

TOL = {"rtol": 1e-4, "atol": 1e-4}


@pytest.fixture(autouse=True)
def _eager():
    with no_compile():
        yield


def ttt_lm(kind: str = "mlp", gate: float = 0.5, seed: int = 0):
    """The tiny model (context 12 frames) with TTT in layers 1 and 3 that matter (gate 0.5)."""
    lm = build_tiny_lm(seed)
    torch.manual_seed(seed)
    apply_ttt(
        lm, TTTConfig(layers="1,3", kind=kind, mini_batch_size=4, chunk_size=6, gate_init=gate)
    )
    if kind == "inplace":  # a non-zero conv, else In-Place TTT is the base model
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for _, m in ttt_modules(lm):
                m.conv_weight.copy_(0.3 * torch.randn(m.conv_weight.shape, generator=g))
    return lm


def random_codes(lm, T: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, lm.card, (17, T), generator=g)
    codes[0] = torch.randint(0, lm.text_card, (T,), generator=g)
    codes[0, 3] = codes[2, 7] = codes[5, 0] = -1  # no-loss tokens
    return codes


# -- the loss definition ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "inplace"])
def test_chunked_equals_token_streaming_and_forward(kind):
    lm = ttt_lm(kind)
    T = 31  # > context 12; not a multiple of the chunks, the TTT mini-batch or In-Place chunk
    codes = random_codes(lm, T)
    with torch.no_grad():
        out = lm(codes[None])
    ref_text = _masked_ce(out.text_logits, codes[None, :1], out.text_mask)[0, 0]
    ref_audio = _masked_ce(out.logits, codes[None, 1:9], out.mask)[0]
    token = stream_losses(lm, codes, chunk_frames=1)
    assert torch.equal(token.text_mask, out.text_mask[0, 0])
    assert torch.equal(token.audio_mask, out.mask[0])
    assert token.audio_mask[1:, -1].sum() == 0 and token.audio_mask[0, -1]  # the delays
    torch.testing.assert_close(token.text, ref_text, **TOL)
    torch.testing.assert_close(token.audio, ref_audio, **TOL)
    for chunk in (5, 12):
        chunked = stream_losses(lm, codes, chunk_frames=chunk)
        torch.testing.assert_close(chunked.text, token.text, **TOL)
        torch.testing.assert_close(chunked.audio, token.audio, **TOL)
        assert torch.equal(chunked.audio_mask, token.audio_mask)


def test_segments_cut_at_chunks_and_resets():
    assert segments(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert segments(10, 4, reset_every=3) == [(0, 3), (3, 4), (4, 6), (6, 8), (8, 9), (9, 10)]
    assert segments(1, 250) == [(0, 1)]


# -- controls ---------------------------------------------------------------------------------
def test_controls_reset_and_no_ttt():
    lm = ttt_lm()
    files = [("a", random_codes(lm, 30, seed=1)), ("b", random_codes(lm, 22, seed=2))]
    res = evaluate_long_context(
        lm, files, chunk_frames=4, reset_every=8, speedup_frames=10, progress=False
    )
    assert list(res.variants) == ["ttt", "reset_every_8", "no_ttt"]
    full, reset, none = (res.variants[k] for k in res.variants)
    assert full.length == 30 and full.files[:22].tolist() == [2] * 22 and full.files[-1] == 1
    # Before the first reset (input steps < 8: frames < 8, acoustic codebooks lag one frame)
    # the reset control is the full model; after it, it is not.
    np.testing.assert_allclose(reset.text_sum[:8], full.text_sum[:8], rtol=1e-6)
    np.testing.assert_allclose(reset.audio_sum[0, :8], full.audio_sum[0, :8], rtol=1e-6)
    np.testing.assert_allclose(reset.audio_sum[1:, :7], full.audio_sum[1:, :7], rtol=1e-6)
    assert not np.allclose(reset.audio_sum[:, 8:], full.audio_sum[:, 8:], rtol=1e-4)
    # no_ttt (gates forced to 0) is the base model; the full model differs from it
    base = evaluate_long_context(build_tiny_lm(0), files, chunk_frames=4, progress=False)
    assert list(base.variants) == ["no_ttt"]
    np.testing.assert_allclose(none.audio_sum, base.variants["no_ttt"].audio_sum, rtol=1e-5)
    np.testing.assert_allclose(none.text_sum, base.variants["no_ttt"].text_sum, rtol=1e-5)
    assert not np.allclose(full.audio_sum, none.audio_sum, rtol=1e-3)
    assert all(m.gate_override is None for _, m in ttt_modules(lm))  # gates restored
    # headline: control minus full memory, beyond the 12-frame context
    gains = res.gains()
    assert set(gains) == {"reset_every_8", "no_ttt"}
    beyond = gains["no_ttt"]["beyond_context"]
    expect = none.totals(12)["audio_ce"] - full.totals(12)["audio_ce"]
    assert beyond["audio_ce"] == pytest.approx(expect) and beyond["audio_tokens"] > 0
    s = res.speedup
    assert s["frames"] == 10 and s["speedup"] > 0 and s["max_abs_diff"] < 1e-4
    curves = full.binned(10)
    assert curves["start"] == [0, 10, 20] and curves["end"] == [10, 20, 30]
    assert len(curves["codebooks"]) == 8 and all(map(math.isfinite, curves["audio_ce"]))


def test_inner_loss_recorded_per_layer_and_chunk_independent():
    lm = ttt_lm()
    files = [("a", random_codes(lm, 26, seed=3))]
    results = [evaluate_inner_loss(lm, files, chunk_frames=c, progress=False) for c in (1, 6)]
    token, chunked = (r.inner for r in results)
    assert token.layers == ["layer 1", "layer 3"] and list(results[1].variants) == ["ttt", "no_ttt"]
    for layer in token.layers:
        assert chunked.sums[layer].shape == (3, 26) and chunked.count[layer].tolist() == [1] * 26
        np.testing.assert_allclose(chunked.sums[layer], token.sums[layer], rtol=1e-3, atol=1e-6)
    v = verdict(chunked.binned(5)["layer 1"])
    assert v["bins"] == 6 and "l0 > lprev > lafter" in v["text"]
    with pytest.raises(ValueError, match="TTT-Linear/MLP"):
        evaluate_inner_loss(build_tiny_lm(0), files, progress=False)


def test_gating_variants_and_parse():
    assert parse_gates("0, 1e-3,learned,1.0,0") == [0.0, 0.001, None, 1.0]
    with pytest.raises(ValueError, match="number"):
        parse_gates("0,high")
    lm = ttt_lm()
    files = [("a", random_codes(lm, 16))]
    res = evaluate_variants(
        lm,
        files,
        {"g0": Variant(gate=0.0), "g1": Variant(gate=1.0)},
        chunk_frames=5,
        progress=False,
    )
    assert not np.allclose(res.variants["g0"].audio_sum, res.variants["g1"].audio_sum)
    with pytest.raises(ValueError, match="no TTT"):
        evaluate_variants(build_tiny_lm(0), files, {"g0": Variant(gate=0.0)}, progress=False)


# -- inputs -----------------------------------------------------------------------------------
def _crc_table(poly: int, bits: int) -> list[int]:
    top, mask, table = 1 << (bits - 1), (1 << bits) - 1, []
    for byte in range(256):
        crc = byte << (bits - 8)
        for _ in range(8):
            crc = ((crc << 1) ^ poly) & mask if crc & top else (crc << 1) & mask
        table.append(crc)
    return table


CRC8, CRC16 = _crc_table(0x07, 8), _crc_table(0x8005, 16)


def _crc(data: bytes, table: list[int], bits: int) -> int:
    crc, mask = 0, (1 << bits) - 1
    for byte in data:
        crc = ((crc << 8) & mask) ^ table[(crc >> (bits - 8)) ^ byte]
    return crc


def write_flac(path, samples: np.ndarray, rate: int, block: int = 4096) -> None:
    """A minimal valid FLAC (mono, 16 bits, verbatim subframes): no FLAC encoder is installed."""
    pcm = np.clip(np.round(samples * 32767), -32768, 32767).astype(">i2")
    n = len(pcm)
    info = (rate << 44) | (15 << 36) | n  # rate, channels - 1 = 0, bits - 1 = 15, samples
    streaminfo = struct.pack(">HH", block, block) + bytes(6) + info.to_bytes(8, "big") + bytes(16)
    out = bytearray(b"fLaC" + bytes([0x80, 0, 0, 34]) + streaminfo)
    for i, start in enumerate(range(0, n, block)):
        chunk = pcm[start : start + block]
        assert i < 128  # one-byte frame number
        head = bytes([0xFF, 0xF8, 0x70, 0x08, i]) + struct.pack(">H", len(chunk) - 1)
        frame = head + bytes([_crc(head, CRC8, 8), 0x02]) + chunk.tobytes()
        out += frame + struct.pack(">H", _crc(frame, CRC16, 16))
    path.write_bytes(bytes(out))


def sine(seconds: float, rate: int, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def noise(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * rate))).astype(
        np.float32
    )


@pytest.fixture
def librilight(tmp_path):
    """``<speaker>/<book>/*.flac`` at 16 kHz: two good files, an unreadable, a too-short and an
    empty one, plus a 24 kHz noise wav."""
    root = tmp_path / "librilight"
    book = root / "103" / "1240"
    book.mkdir(parents=True)
    write_flac(book / "a.flac", sine(3.0, 16000), 16000)  # 38 frames > context 12
    write_flac(book / "b.flac", sine(1.2, 16000, 330.0), 16000)  # 15 frames
    other = root / "19" / "198"
    other.mkdir(parents=True)
    sphn.write_wav(str(other / "noise.wav"), noise(0.5, 24000), 24000)  # 7 frames (6.25)
    (other / "bad.flac").write_bytes(b"fLaC" + bytes(range(200)))
    write_flac(other / "short.flac", sine(0.05, 16000), 16000)  # 0.05 s < 80 ms
    (other / "zero.flac").write_bytes(b"")
    return root


def test_inputs_audio_dir_index_and_shards(librilight, tmp_path):
    mimi = build_tiny_mimi(0)
    inputs = EvalInputs(librilight, mimi)
    assert inputs.kind == "audio_dir" and len(inputs) == 6
    got = dict(inputs)
    assert sorted(n.split("/")[-1] for n in got) == ["a.flac", "b.flac", "noise.wav"]
    codes = got[str(librilight / "103" / "1240" / "a.flac")]
    assert codes.shape == (17, 38) and codes.dtype == torch.long
    assert (codes[0] == -1).all() and (codes[9:] == -1).all()
    assert ((codes[1:9] >= 0) & (codes[1:9] < 32)).all()
    reasons = {b["name"].split("/")[-1]: b["reason"] for b in inputs.bad.files}
    assert reasons == {"bad.flac": "unreadable", "short.flac": "too_short", "zero.flac": "empty"}
    assert inputs.bad.counter.ok == 3 and inputs.bad.counter.num_bad == 3

    # the user stream, Mimi silence in the other stream, PAD text, cut to 10 frames
    placed = EvalInputs(
        librilight / "103" / "1240" / "a.flac",
        mimi,
        StreamPlacement("user", "silence", "pad"),
        max_frames=10,
    )
    ((_, user),) = list(placed)
    assert user.shape == (17, 10) and (user[0] == 3).all()
    torch.testing.assert_close(user[9:], codes[1:9, :10])
    assert ((user[1:9] >= 0) & (user[1:9] < 32)).all()
    with pytest.raises(ValueError, match="audio stream"):
        StreamPlacement(audio="left")

    index = tmp_path / "index.jsonl"
    lines = [
        {"path": "librilight/103/1240/b.flac", "duration": 1.2},
        {"path": "librilight/missing.flac", "duration": 9.0},
        {"path": "librilight/19/198/short.flac", "duration": 0.05},
    ]
    index.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    from_index = EvalInputs(index, mimi)
    assert [c.shape[-1] for _, c in from_index] == [15]
    assert [b["reason"] for b in from_index.bad.files] == ["missing", "too_short"]

    shards = tmp_path / "shards"
    shards.mkdir()
    save_file({"codes": codes[:, :20].contiguous()}, str(shards / "s0.safetensors"))
    files = [{"frames": 20, "shard": "s0.safetensors"}, {"frames": 5, "shard": "gone.safetensors"}]
    (shards / "shards.json").write_text(json.dumps({"files": files}))
    from_shards = EvalInputs(shards, max_frames=16)
    assert [c.shape for _, c in from_shards] == [(17, 16)]
    assert [b["reason"] for b in from_shards.bad.files] == ["missing"]
    with pytest.raises(FileNotFoundError):
        EvalInputs(tmp_path / "nothing", mimi)
    with pytest.raises(ValueError, match="Mimi"):
        EvalInputs(librilight)


# -- the CLI ----------------------------------------------------------------------------------
def _read_report(out):
    assert (out / "report.md").is_file()
    data = json.loads((out / "report.json").read_text())
    for plot in data["plots"]:
        assert (out / plot).is_file() and (out / plot).stat().st_size > 1000
    return (out / "report.md").read_text(), data


def test_cli_long_context_inner_loss_gating(librilight, tmp_path, capsys):
    cfg = tmp_path / "ttt.yaml"
    TTTConfig(layers="1,3", kind="mlp", mini_batch_size=4, gate_init=0.5).to_yaml(cfg)
    common = [str(librilight), "--tiny", "--ttt-config", str(cfg), "--device", "cpu"]
    common += shlex.split("--chunk-frames 8 --bin-frames 10 --no-progress")
    out = tmp_path / "lc"
    args = ["--out", str(out), *shlex.split("--reset-every 16 --speedup-frames 12")]
    rc = main(["eval", "long-context", *common, *args])
    assert rc == 0
    md, data = _read_report(out)
    assert {"loss_vs_position.png", "gain_vs_position.png"} <= set(data["plots"])
    res = data["result"]
    assert list(res["curves"]) == ["ttt", "reset_every_16", "no_ttt"]
    assert [f["frames"] for f in res["files"]] == [38, 15, 7]
    assert res["curves"]["ttt"]["start"] == [0, 10, 20, 30]
    assert all(math.isfinite(x) for c in res["curves"].values() for x in c["audio_ce"])
    assert all(math.isfinite(x) for x in res["totals"]["ttt"]["codebooks"])
    assert math.isfinite(res["gains"]["no_ttt"]["beyond_context"]["audio_ce"])
    assert res["bad"]["files_bad"] == 3 and res["speedup"]["speedup"] > 0
    assert "bad.flac" in md and "too_short" in md and "Headline" in md
    printed = capsys.readouterr().out
    assert "token-by-token streaming: x" in printed
    # audio is scored beyond the 12-frame context: the headline metric is audio CE
    assert data["metric"] == res["metric"] == "audio_ce"
    assert "audio CE beyond the context (>= 12 frames): ttt " in printed
    assert "| text CE" not in md  # no text is scored: no text column
    assert data["provenance"]["kind"] == "tiny" and data["provenance"]["weights"] == []

    out = tmp_path / "inner"
    assert main(["eval", "inner-loss", *common, "--out", str(out), "--speedup-frames", "0"]) == 0
    md, data = _read_report(out)
    assert set(data["inner_loss"]["verdicts"]) == {"layer 1", "layer 3"}
    assert "inner_loss_layer_1.png" in data["plots"] and "inner_vs_model_gain.png" in data["plots"]
    assert "l0 > lprev > lafter" in md and "loss_vs_position.png" in data["plots"]
    assert data["provenance"]["label"] == "tiny:0 (no weights file)"

    out = tmp_path / "gating"
    args = shlex.split("--gates 0,learned,1 --max-files 2 --generate --generate-seconds 0.5")
    rc = main(["eval", "gating", *common, "--out", str(out), *args])
    assert rc == 0
    md, data = _read_report(out)
    assert list(data["result"]["curves"]) == ["gate=0", "learned", "gate=1"]
    assert set(data["samples"]) == {"gate=0", "learned", "gate=1"}
    assert (out / "sample_gate_0.wav").is_file() and "Generated samples" in md
    assert data["provenance"]["label"] == "tiny:0 (no weights file)" and "provenance" in md


# -- plots that show something ----------------------------------------------------------------
def _plot_areas(fig) -> list[tuple[tuple[float, ...], list[tuple[float, ...]]]]:
    """Per axes of ``fig``: its box and its legend's box, as figure fractions (x0, y0, x1, y1)."""
    out = []
    for ax in fig.axes:
        legend = ax.get_legend()
        boxes = []
        if legend is not None:
            b = legend.get_window_extent().transformed(fig.transFigure.inverted())
            boxes.append((b.x0, b.y0, b.x1, b.y1))
        p = ax.get_position()
        out.append(((p.x0, p.y0, p.x1, p.y1), boxes))
    return out


def _shows_data(png, areas, min_pixels: int = 20) -> bool:
    """True when every axes of the PNG holds coloured pixels (a curve, a marker) outside its
    legend; black/grey (frame, context line, zero line), white and pale bands do not count."""
    img = plt.imread(str(png))[..., :3]
    h, w = img.shape[:2]
    colour = (img.max(-1) - img.min(-1)) > 0.2

    def rows_cols(box, pad):
        x0, y0, x1, y1 = box
        return (slice(int((1 - y1) * h) - pad, int((1 - y0) * h) + pad + 1),
                slice(int(x0 * w) - pad, int(x1 * w) + pad + 1))  # fmt: skip

    for box, legends in areas:
        rows, cols = rows_cols(box, -3)  # inside the frame
        inside = np.zeros_like(colour)
        inside[rows, cols] = True
        for legend in legends:
            lr, lc = rows_cols(legend, 4)
            inside[max(lr.start, 0) : lr.stop, max(lc.start, 0) : lc.stop] = False
        if int((colour & inside).sum()) < min_pixels:
            return False
    return True


def test_cli_long_context_difference_lines_follow_one_sign_convention(librilight, tmp_path, capsys):
    """Every printed difference is memory - control (negative: the memory helps), says so, and
    has the sign of the numbers; report.md's headline and difference table too."""
    cfg = tmp_path / "ttt.yaml"
    TTTConfig(layers="1,3", kind="mlp", mini_batch_size=4, gate_init=0.5).to_yaml(cfg)
    out = tmp_path / "lc"
    argv = [str(librilight), "--tiny", "--ttt-config", str(cfg), "--device", "cpu", "--out",
            str(out), *shlex.split("--chunk-frames 8 --bin-frames 10 --no-progress "
                                   "--reset-every 16 --speedup-frames 0")]  # fmt: skip
    assert main(["eval", "long-context", *argv]) == 0
    printed = capsys.readouterr().out
    md, data = _read_report(out)
    summary = data["result"]["summary"]
    m, primary = summary["metric"], summary["primary"]
    ce = {part: {v: t[m] for v, t in summary[part].items()}
          for part in ("beyond_context", "within_context")}  # fmt: skip
    found = 0
    for line in printed.splitlines():
        diff = re.search(r"(\S+) - (\S+)(?: \(gate 0\))? = ([+-]\d+\.\d+) nats", line)
        if diff is None:
            assert not re.search(r" - \S+ = ", line), line  # no other difference format
            continue
        found += 1
        a, b, value = diff.group(1), diff.group(2), float(diff.group(3))
        assert "(negative: " in line, line  # the sign is spelled out
        if (a, b) == ("memory", "base"):  # the harm line: inside the window, against gate 0
            a, b, part = primary, "no_ttt", "within_context"
            assert "(negative: the memory helps)" in line
        else:
            part = "beyond_context"
            assert a == primary and b in ce[part], line  # memory minus control
            inside = float(re.search(r"\(inside: ([+-]\d+\.\d+)\)", line).group(1))
            assert inside == pytest.approx(ce["within_context"][a] - ce["within_context"][b],
                                           abs=1e-4)  # fmt: skip
            words = "the memory helps" if b == "no_ttt" else f"{primary} better"
            assert f"(negative: {words})" in line
        assert value == pytest.approx(ce[part][a] - ce[part][b], abs=1e-4), line
    assert found == 3  # reset_every_16, no_ttt and the harm line
    # report.md: the headline and the difference table, memory - control
    d = ce["beyond_context"]["ttt"] - ce["beyond_context"]["no_ttt"]
    assert f"ttt - no_ttt = {d:+.4f} nats (ttt {'better' if d < 0 else 'worse'}" in md
    assert "negative: ttt better" in md and "| ttt - curve |" in md
    assert data["long_context"]["gains"]["no_ttt"]["beyond_context"][m] == pytest.approx(
        -d, abs=1e-9
    )


def test_shows_data_fails_on_an_empty_frame_and_a_lone_point_without_marker(tmp_path):
    for draw in ([], [[5.0]]):  # nothing; one point without a marker: no pixel of the curve
        fig, ax = plt.subplots()
        for y in draw:
            ax.plot([1.0], y, label="curve")
        ax.axvline(1.0, color="k", ls="--", label="context")
        ax.legend()
        fig.savefig(tmp_path / "p.png", dpi=110)
        assert not _shows_data(tmp_path / "p.png", _plot_areas(fig)), draw
        plt.close(fig)
    fig, ax = plt.subplots()
    ax.plot([1.0], [5.0], marker="o", label="curve")
    ax.legend()
    fig.savefig(tmp_path / "p.png", dpi=110)
    assert _shows_data(tmp_path / "p.png", _plot_areas(fig))
    plt.close(fig)


def test_every_plot_shows_its_curves_on_short_files(librilight, tmp_path, monkeypatch):
    areas, labels = {}, {}
    real = Report.add_figure

    def recording(self, fig, filename, caption):
        fig.set_dpi(110)  # as saved: legend boxes and the figure in the same pixels
        fig.tight_layout()  # as add_figure does before saving
        fig.canvas.draw()  # lays the legends out
        path = self.out / filename
        areas[path] = _plot_areas(fig)
        labels[path] = [line.get_label() for ax in fig.axes for line in ax.lines]
        return real(self, fig, filename, caption)

    monkeypatch.setattr(Report, "add_figure", recording)
    cfg = tmp_path / "ttt.yaml"
    TTTConfig(layers="1,3", kind="mlp", mini_batch_size=4, gate_init=0.5).to_yaml(cfg)
    common = [str(librilight), "--tiny", "--ttt-config", str(cfg), "--device", "cpu"]
    common += shlex.split("--chunk-frames 8 --no-progress --speedup-frames 0")  # bins: default
    lc, gating = tmp_path / "lc", tmp_path / "gating"
    assert main(["eval", "long-context", *common, "--out", str(lc), "--reset-every", "16"]) == 0
    assert main(["eval", "gating", *common, "--out", str(gating), "--gates", "0,1e-12,1"]) == 0
    for out in (lc, gating):
        data = json.loads((out / "report.json").read_text())
        written = [out / p for p in data["plots"]]
        assert "codebooks_vs_position.png" in data["plots"] and set(written) <= set(areas)
        for png in written:
            assert _shows_data(png, areas[png]), png
        lc_data = data["long_context"]
        assert lc_data["bin_frames_requested"] == 250 and lc_data["bin_frames"] == 5
        assert len(lc_data["curves"]["gate=1" if out == gating else "ttt"]["start"]) == 8
        md = (out / "report.md").read_text()
        assert "position bins of 5 frames (0.4 s; requested 250; files are only 38 frames)" in md
    # gate 1e-12 gives gate 0's curve: the legend says so (and its marker differs)
    assert "gate=1e-12 (= gate=0)" in labels[gating / "loss_vs_position.png"]
    assert len([x for x in labels[lc / "codebooks_vs_position.png"] if x.startswith("cb")]) == 8


def test_cli_bad_data_is_reported_not_a_crash(tmp_path, capsys):
    data = tmp_path / "bad"
    data.mkdir()
    (data / "x.flac").write_bytes(b"not audio")
    out = tmp_path / "out"
    args = ["--tiny", "--device", "cpu", "--out", str(out), "--no-progress"]
    rc = main(["eval", "long-context", str(data), *args])
    assert rc == 2 and "no usable file" in capsys.readouterr().err
    md, data_json = _read_report(out)
    assert "x.flac" in md and data_json["result"]["bad"]["bad_unreadable"] == 1
    rc = main(["eval", "long-context", str(tmp_path / "none"), "--tiny", "--out", str(out)])
    assert rc == 2 and "not found" in capsys.readouterr().err
    rc = main(["eval", "gating", str(data), "--tiny", "--out", str(out), "--gates", "0,x"])
    assert rc == 2
