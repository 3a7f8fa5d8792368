"""Offline streaming generation (``moshi-ttt generate``) on the tiny random Moshi and Mimi."""

from __future__ import annotations

import numpy as np
import pytest
import sphn
import torch

from moshi_ttt.cli import main
from moshi_ttt.generate import generate, read_wav, resample
from moshi_ttt.integration import TTTConfig, apply_ttt
from moshi_ttt.models.adapter import save_adapter
from moshi_ttt.models.codec import build_tiny_mimi
from moshi_ttt.models.load import load_base_lm, load_codec


@pytest.fixture
def cli_main():
    """``moshi_ttt.cli.main`` (the ``moshi-ttt`` command)."""
    return main


def sine_wav(path, seconds: float = 2.0, rate: int = 16000) -> str:
    t = np.arange(int(seconds * rate)) / rate
    sphn.write_wav(str(path), (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate)
    return str(path)


def test_cli_generate_tiny_writes_wav_text_and_rtf(tmp_path, cli_main, capsys):
    wav = sine_wav(tmp_path / "user.wav", seconds=2.0)  # 16 kHz: resampled to 24 kHz
    out, text = tmp_path / "out" / "moshi.wav", tmp_path / "moshi.txt"
    argv = ["generate", "--tiny", "--input", wav, "--output", str(out), "--text", str(text)]
    assert cli_main([*argv, "--device", "cpu", "--max-seconds", "1.5"]) == 0
    captured = capsys.readouterr()
    assert "real-time factor:" in captured.out and "TTT layers [0]" in captured.out
    assert "frame" in captured.err  # the progress bar
    data, rate = sphn.read(str(out))
    assert rate == 24000 and data.shape == (1, 19 * 1920)  # 1.5 s -> 19 frames of 80 ms
    assert np.isfinite(data).all() and np.abs(data).max() > 0
    assert text.read_text().strip()  # Moshi's (random) words


def test_generate_with_adapter_is_seeded(tmp_path, cli_main, capsys):
    model = load_base_lm("tiny:0", dtype=torch.float32)
    lm = model.lm
    torch.manual_seed(0)
    apply_ttt(lm, TTTConfig(layers="1,3", kind="inplace", chunk_size=4, gate_init=0.5))
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith("conv_weight"):
                p.normal_(0, 0.3)
    save_adapter(model, tmp_path / "ad")
    wav = sine_wav(tmp_path / "user.wav", seconds=1.0, rate=24000)
    texts = []
    for run in range(2):
        out = tmp_path / f"out{run}.wav"
        argv = ["generate", "--adapter", str(tmp_path / "ad"), "--input", wav, "--output", str(out)]
        assert cli_main([*argv, "--no-progress", "--seed", "3"]) == 0
        texts.append((tmp_path / f"out{run}.txt").read_text())  # default: next to the wav
    assert "TTT layers [1, 3] (kind inplace)" in capsys.readouterr().out
    assert texts[0] == texts[1]


def test_generate_function_stats(tmp_path):
    model = load_base_lm("tiny:0", dtype=torch.float32)
    lm = model.lm
    mimi, tokenizer = load_codec(model)
    assert tokenizer.get_piece_size() == lm.text_card and mimi.frame_size == 1920
    wav = sine_wav(tmp_path / "user.wav", seconds=0.5, rate=48000)
    stats = generate(lm, mimi, None, wav, tmp_path / "o.wav", progress=False)
    assert stats["frames"] == 7 and len(stats["text_tokens"]) == 7
    assert stats["rtf"] == pytest.approx(stats["wall_s"] / stats["audio_s"])
    assert all(0 <= t < lm.text_card for t in stats["text_tokens"])


def test_missing_or_bad_input_is_a_one_line_error(tmp_path, cli_main, capsys):
    argv = ["generate", "--tiny", "--output", str(tmp_path / "o.wav"), "--input"]
    assert cli_main([*argv, str(tmp_path / "nope.wav")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "input audio not found" in err and "nope.wav" in err
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00garbage")
    with pytest.raises(
        ValueError, match=r"bad\.wav: not an audio file we can read \(WAV, FLAC, OGG"
    ):
        read_wav(bad)
    assert cli_main([*argv, str(bad)]) == 2
    assert "not an audio file we can read (WAV, FLAC, OGG" in capsys.readouterr().err


def test_resample_keeps_alignment_and_length():
    rate = 16000
    t = np.arange(rate) / rate
    chirp = np.sin(2 * np.pi * (100 * t + 300 * t**2)).astype(np.float32)  # 100 -> 700 Hz
    y = resample(chirp, rate, 24000)
    t2 = np.arange(24000) / 24000
    assert y.shape == (24000,)
    assert np.abs(y[:-100] - np.sin(2 * np.pi * (100 * t2 + 300 * t2**2))[:-100]).max() < 0.02


def test_tiny_mimi_streams_like_batch():
    mimi = build_tiny_mimi(0)
    x = 0.3 * torch.randn(1, 1, 4 * 1920, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = mimi.encode(x)
        with mimi.streaming(1):
            frames = [mimi.encode(x[..., i * 1920 : (i + 1) * 1920]) for i in range(4)]
    assert ref.shape == (1, 8, 4) and int(ref.max()) < 32
    assert torch.equal(torch.cat(frames, -1), ref)
