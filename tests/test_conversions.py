"""No silent conversion (issue 26, items 3 and 12): a stereo input to ``generate`` / ``eval``
gives the channel named by ``--channel`` (default right = the user in moshi-finetune's layout)
and the command says which; an output not named ``.wav`` is refused; ``moshi-ttt --version``."""

from __future__ import annotations

import importlib.metadata
import shlex
import wave
from pathlib import Path

import numpy as np
import pytest
import sphn
import torch
from moshi.utils.compile import no_compile

from moshi_ttt.cli import main
from moshi_ttt.eval.inputs import EvalInputs
from moshi_ttt.generate import generate, read_audio, read_wav
from moshi_ttt.models.codec import build_tiny_mimi
from moshi_ttt.models.load import load_base_lm, load_codec

RATE = 24000


def write_pcm16(path: Path, channels: np.ndarray, rate: int = RATE) -> str:
    """A 16-bit PCM wav of ``channels [C, S]`` (floats in [-1, 1]) with the stdlib."""
    pcm = (np.clip(channels, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(pcm.shape[0])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.T.tobytes())
    return str(path)


def voices(seconds: float = 0.5, rate: int = RATE) -> np.ndarray:
    """``[2, S]``: left a 220 Hz sine ("Moshi"), right noise ("the user")."""
    n = int(seconds * rate)
    t = np.arange(n) / rate
    left = 0.3 * np.sin(2 * np.pi * 220 * t)
    right = 0.3 * np.random.default_rng(0).uniform(-1, 1, n)
    return np.stack([left, right])


@pytest.fixture
def stereo(tmp_path) -> str:
    return write_pcm16(tmp_path / "stereo.wav", voices())


# -- reading ------------------------------------------------------------------------------------
def test_read_audio_takes_the_named_channel(tmp_path, stereo):
    ref = np.round(voices() * 32767) / 32767
    for channel, expect in (("left", ref[0]), ("right", ref[1]), ("mix", ref.mean(0))):
        x, used = read_audio(stereo, RATE, channel)
        assert used == channel
        np.testing.assert_allclose(x, expect, atol=2e-4)
    np.testing.assert_allclose(read_wav(stereo), ref[1], atol=2e-4)  # default: right = user
    mono = write_pcm16(tmp_path / "mono.wav", voices()[:1])
    assert read_audio(mono, RATE, "left")[1] == "mono"
    three = write_pcm16(tmp_path / "three.wav", np.concatenate([voices(), voices()[:1]]))
    with pytest.raises(ValueError, match=r"three\.wav: 3 channels; --channel right expects"):
        read_audio(three)
    assert read_audio(three, RATE, "mix")[1] == "mix"
    with pytest.raises(ValueError, match="channel must be one of left, right, mix"):
        read_audio(stereo, RATE, "both")


# -- generate -----------------------------------------------------------------------------------
def test_generate_uses_the_named_channel_and_says_so(tmp_path, stereo, capsys):
    left = write_pcm16(tmp_path / "left.wav", voices()[:1])  # the left channel alone
    argv = ["generate", "--tiny", "--device", "cpu", "--no-progress", "--seed", "1"]
    texts = {}
    for name, extra in (("stereo_left", ["--channel", "left"]), ("mono_left", []),
                        ("stereo_right", [])):  # fmt: skip
        src = left if name == "mono_left" else stereo
        out = tmp_path / f"{name}.wav"
        assert main([*argv, "--input", src, "--output", str(out), *extra]) == 0
        printed = capsys.readouterr().out
        texts[name] = (tmp_path / f"{name}.txt").read_text()
        if name == "stereo_left":
            assert f"input: {stereo}, stereo, used the left channel" in printed
            assert "(--channel left)" in printed
        elif name == "mono_left":
            assert f"input: {left}, mono" in printed and "--channel" not in printed
        else:
            assert "used the right channel (the user's" in printed
            assert "(--channel right)" in printed
    # the left channel of a stereo file is exactly the mono file of that channel
    a, _ = sphn.read(str(tmp_path / "stereo_left.wav"))
    b, _ = sphn.read(str(tmp_path / "mono_left.wav"))
    np.testing.assert_array_equal(a, b)
    assert texts["stereo_left"] == texts["mono_left"]


@pytest.mark.parametrize("name", ["o.mp3", "o.flac", "o"])
def test_generate_refuses_an_output_not_named_wav(tmp_path, stereo, capsys, name):
    out = tmp_path / name
    argv = ["generate", "--tiny", "--input", stereo, "--output", str(out), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("moshi-ttt generate: error: --output")
    suffix = Path(name).suffix
    assert (f"suffix '{suffix}'" if suffix else "has no suffix") in err and ".wav" in err
    assert not out.exists() and not out.with_suffix(".txt").exists()
    assert main([*argv[:-2], str(tmp_path / "O.WAV"), "--no-progress"]) == 0  # any case


def test_generate_function_refuses_an_output_not_named_wav(tmp_path, stereo):
    model = load_base_lm("tiny:0", dtype=torch.float32)
    lm = model.lm
    mimi, _ = load_codec(model)
    with pytest.raises(ValueError, match=r"output_wav .*o\.mp3: has the suffix '\.mp3'"):
        generate(lm.eval(), mimi, None, stereo, tmp_path / "o.mp3", progress=False)
    stats = generate(lm, mimi, None, stereo, tmp_path / "o.wav", progress=False, channel="mix")
    assert stats["input_channel"] == "mix"


# -- eval ---------------------------------------------------------------------------------------
def test_eval_inputs_take_the_named_channel(tmp_path, stereo):
    mimi = build_tiny_mimi(0)
    left = write_pcm16(tmp_path / "left.wav", voices()[:1])
    right = write_pcm16(tmp_path / "right.wav", voices()[1:])
    codes = {}
    cases = [
        ("stereo_left", stereo, "left"),
        ("stereo_right", stereo, "right"),
        ("left", left, "right"),  # mono: the channel does not apply
        ("right", right, "left"),
    ]
    with no_compile():
        for key, path, channel in cases:
            inputs = EvalInputs(path, mimi, channel=channel)
            ((_, codes[key]),) = list(inputs)
            assert inputs.describe()["channel"] == channel
    assert torch.equal(codes["stereo_left"], codes["left"])
    assert torch.equal(codes["stereo_right"], codes["right"])
    assert not torch.equal(codes["left"], codes["right"])
    inputs = EvalInputs(stereo, mimi)
    list(inputs)
    assert inputs.channels_used == {"right": 1}
    assert inputs.channel_line() == (
        "stereo input: used the right channel (the user's in moshi-finetune's layout) of 1 file "
        "(--channel right)"
    )
    mono = EvalInputs(left, mimi)
    list(mono)
    assert mono.channels_used == {"mono": 1} and mono.channel_line() is None
    with pytest.raises(ValueError, match="channel must be one of"):
        EvalInputs(stereo, mimi, channel="both")


def test_cli_eval_says_which_channel_it_used(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        write_pcm16(data / f"d{i}.wav", voices(seconds=1.0))
    out = tmp_path / "lc"
    args = "--tiny --device cpu --no-progress --speedup-frames 0 --controls none --channel left"
    with no_compile():
        assert main(["eval", "long-context", str(data), "--out", str(out), *shlex.split(args)]) == 0
    printed = capsys.readouterr().out
    assert "stereo input: used the left channel (Moshi's in moshi-finetune's layout) of 2 files " \
        "(--channel left)" in printed  # fmt: skip
    report = (out / "report.json").read_text()
    assert '"channel": "left"' in report and '"channels_used": {' in report


# -- --version ----------------------------------------------------------------------------------
def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"moshi-ttt {importlib.metadata.version('moshi-ttt')}\n"
