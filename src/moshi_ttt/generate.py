"""Offline streaming inference: user audio in, Moshi's audio and text out, frame by frame.

For each 80 ms frame (1920 samples at 24 kHz): Mimi encodes the user's frame into 8 codes, one
``LMGen.step`` runs the temporal transformer (with its TTT layers: their state persists across
the whole session) and the depformer, and Mimi decodes Moshi's 8 codes back to audio. This is
the same code path on a tiny CPU model and on the 7B on a GPU.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import sphn
import torch
from moshi.models.compression import MimiModel
from moshi.models.lm import LMGen, LMModel
from moshi.utils.compile import no_compile, no_cuda_graph

from .format import SAMPLE_RATE, TEXT_EPAD, TEXT_PAD
from .integration.e2e import e2e_layers
from .integration.e2e_stream import LiveE2E
from .integration.streaming import has_live_hooks

CHANNELS = ("left", "right", "mix")
DEFAULT_CHANNEL = "right"  # moshi-finetune's stereo layout: left = Moshi, right = the user
CHANNEL_TEXT = {
    "mono": "mono",
    "left": "stereo, used the left channel (Moshi's in moshi-finetune's layout)",
    "right": "stereo, used the right channel (the user's in moshi-finetune's layout)",
    "mix": "stereo, used both channels averaged",
}


def read_audio(
    path: str | Path, sample_rate: int = SAMPLE_RATE, channel: str = DEFAULT_CHANNEL
) -> tuple[np.ndarray, str]:
    """Mono float32 samples ``[S]`` at ``sample_rate`` (resampled if needed) and which input
    channel they are: ``"mono"``, or for a stereo file ``channel`` (``"left"``, ``"right"``:
    that channel; ``"mix"``: both averaged). ``CHANNEL_TEXT[used]`` says it in words.

    A missing file is a ``FileNotFoundError``; an unreadable, empty or non-finite (NaN/Inf
    samples) one, or one of more than 2 channels with ``left``/``right``, a ``ValueError``
    naming it.
    """
    if channel not in CHANNELS:
        raise ValueError(f"channel must be one of {', '.join(CHANNELS)}, got {channel!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input audio not found: {path}")
    try:
        data, sr = sphn.read(str(path))
    except (ValueError, OSError, RuntimeError) as e:
        raise ValueError(
            f"{path}: not an audio file we can read (WAV, FLAC, OGG, MP3 ...): {e}"
        ) from e
    if data.size == 0:
        raise ValueError(f"{path}: no audio samples")
    data = np.asarray(data, dtype=np.float32).reshape(-1, data.shape[-1])
    if data.shape[0] == 1:
        used, mono = "mono", data[0]
    elif channel == "mix":
        used, mono = "mix", data.mean(axis=0)
    elif data.shape[0] == 2:
        used, mono = channel, data[0 if channel == "left" else 1]
    else:
        raise ValueError(
            f"{path}: {data.shape[0]} channels; --channel {channel} expects mono or stereo "
            "audio (use --channel mix to average the channels)"
        )
    if not np.isfinite(mono).all():
        bad = int((~np.isfinite(mono)).sum())
        raise ValueError(f"{path}: {bad} non-finite (NaN/Inf) samples; expected finite audio")
    out = resample(mono, int(sr), sample_rate) if sr != sample_rate else mono
    return np.ascontiguousarray(out, dtype=np.float32), used


def read_wav(
    path: str | Path, sample_rate: int = SAMPLE_RATE, channel: str = DEFAULT_CHANNEL
) -> np.ndarray:
    """The samples of ``read_audio`` (mono ``[S]`` at ``sample_rate``; of a stereo file the
    ``channel``, default right = the user's)."""
    return read_audio(path, sample_rate, channel)[0]


def check_wav_suffix(path: str | Path, option: str = "--output") -> None:
    """Refuse an output name not ending in ``.wav`` (the audio written is WAV, whatever the
    name says): a ``ValueError`` naming ``option``, the path and its suffix."""
    suffix = Path(path).suffix
    if suffix.lower() != ".wav":
        what = f"has the suffix {suffix!r}" if suffix else "has no suffix"
        raise ValueError(
            f"{option} {path}: {what}, expected .wav; the audio is written as WAV (mono, "
            "24 kHz) only, and nothing is converted: name it .wav and convert afterwards if "
            "needed (e.g. ffmpeg -i out.wav out.mp3)"
        )


def resample(x: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """``sphn.resample`` without its leading delay and lost tail: ``[S] -> [round(S dst/src)]``.

    sphn's resampler delays the signal by a rate-dependent number of samples; it is measured
    with an impulse and cut, and the input is padded so that its end comes out.
    """
    n_out = round(len(x) * dst_rate / src_rate)
    pad = np.zeros(src_rate // 5, dtype=np.float32)  # 200 ms, well past the filter's delay
    y = sphn.resample(np.concatenate([x, pad]), src_rate, dst_rate)
    probe = np.zeros(len(x) + len(pad), dtype=np.float32)
    probe[0] = 1.0
    delay = int(np.argmax(np.abs(sphn.resample(probe, src_rate, dst_rate))))
    out = y[delay : delay + n_out]
    return np.pad(out, (0, n_out - len(out))).astype(np.float32)


def token_text(tokenizer: Any | None, token: int) -> str:
    """The text of one Moshi text token ('' for padding): a sentencepiece piece with '▁' as a
    space, or ``"<id> "`` without a tokenizer."""
    if token in (TEXT_PAD, TEXT_EPAD):
        return ""
    if tokenizer is None:
        return f"<{token}> "
    if not 0 <= token < tokenizer.get_piece_size():
        return f"<{token}>"
    return tokenizer.id_to_piece(token).replace("▁", " ")


@torch.no_grad()
def generate(
    lm: LMModel,
    mimi: MimiModel,
    tokenizer: Any | None,
    input_wav: str | Path,
    output_wav: str | Path,
    text_path: str | Path | None = None,
    *,
    seed: int = 0,
    max_seconds: float | None = None,
    temp: float = 0.8,
    temp_text: float = 0.7,
    top_k: int = 250,
    top_k_text: int = 25,
    progress: bool = True,
    channel: str = DEFAULT_CHANNEL,
) -> dict[str, Any]:
    """Run Moshi (``lm``, eval mode, TTT layers or not) on a user recording, frame by frame.

    The input is cut to ``max_seconds`` and padded to whole frames, plus one frame of silence
    (the first ``LMGen`` step only fills the delays), so the output has as many frames as the
    input. A stereo input gives its ``channel`` (``read_audio``; default right = the user).
    Writes ``output_wav`` (mono, 24 kHz; a name not ending in ``.wav`` is refused) and, if
    given, ``text_path`` (Moshi's text stream: pieces, or ``<id>`` without a tokenizer).
    Sampling is seeded by ``seed``.

    Returns stats: ``frames``, ``audio_s`` (input length), ``wall_s``, ``rtf`` (wall / audio,
    < 1 = faster than real time), ``ms_per_frame``, ``text``, ``text_tokens`` (ids per frame),
    ``output_wav``, ``text_path``, ``input_channel`` (``read_audio``'s: mono, left, right, mix);
    with an end-to-end memory (which learns while it streams, ``LiveE2E``) also ``e2e_updates``,
    ``e2e_ms_per_update`` and ``e2e_rollbacks``.
    """
    if lm.training:
        raise ValueError("generate needs the model in eval mode (lm.eval())")
    check_wav_suffix(output_wav, "output_wav")
    audio, used = read_audio(input_wav, int(mimi.sample_rate), channel)
    if max_seconds is not None:
        if not max_seconds > 0:
            raise ValueError(f"max_seconds must be positive, got {max_seconds}")
        audio = audio[: int(max_seconds * mimi.sample_rate)]
    frame = int(mimi.frame_size)
    frames = -(-len(audio) // frame)
    if frames == 0:
        raise ValueError(f"{input_wav}: shorter than one sample after cutting")
    padded = np.zeros((frames + 1) * frame, dtype=np.float32)
    padded[: len(audio)] = audio
    device, mimi_device = lm.device, next(mimi.parameters()).device
    pcm = torch.from_numpy(padded).to(device=mimi_device, dtype=torch.float32).view(1, 1, -1)

    gen = LMGen(
        lm,
        temp=temp,
        temp_text=temp_text,
        top_k=min(top_k, lm.card),
        top_k_text=min(top_k_text, lm.text_card),
    )
    eager = no_compile() if device.type == "cpu" else contextlib.nullcontext()
    out_pcm, tokens = [], []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        graphs = no_cuda_graph() if has_live_hooks(lm) else contextlib.nullcontext()
        with eager, graphs, mimi.streaming(1), gen.streaming(1):
            live = LiveE2E(lm) if e2e_layers(lm) else None  # the end-to-end memory learns
            steps = range(frames + 1)
            if progress:
                from tqdm import tqdm

                steps = tqdm(steps, desc="generate", unit="frame", leave=False)
            start = time.perf_counter()
            for i in steps:
                codes = mimi.encode(pcm[..., i * frame : (i + 1) * frame])  # [1, K, 1]
                out = gen.step(codes[:, : lm.n_q - lm.dep_q].to(device))
                if out is None:
                    continue
                tokens.append(int(out[0, 0, 0]))
                out_pcm.append(mimi.decode(out[:, 1:].to(mimi_device)).float().cpu())
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - start
            if live is not None:
                live.close()
    wav = torch.cat(out_pcm, dim=-1)[0, 0].numpy()
    output_wav = Path(output_wav)
    output_wav.parent.mkdir(parents=True, exist_ok=True)
    sphn.write_wav(str(output_wav), wav, int(mimi.sample_rate))
    text = "".join(token_text(tokenizer, t) for t in tokens).strip()
    if text_path is not None:
        text_path = Path(text_path)
        text_path.parent.mkdir(parents=True, exist_ok=True)
        text_path.write_text(text + "\n")
    audio_s = frames * frame / mimi.sample_rate
    return {
        "frames": frames,
        "audio_s": audio_s,
        "wall_s": wall,
        "rtf": wall / audio_s,
        "ms_per_frame": 1000 * wall / (frames + 1),
        "text": text,
        "text_tokens": tokens,
        "output_wav": str(output_wav),
        "text_path": None if text_path is None else str(text_path),
        "input_channel": used,
        **(
            {}
            if live is None
            else {
                "e2e_updates": live.streamer.updates,
                "e2e_ms_per_update": 1000
                * live.streamer.update_seconds
                / max(1, live.streamer.updates),
                "e2e_rollbacks": live.streamer.rollbacks,
            }
        ),
    }
