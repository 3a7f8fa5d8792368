"""Mimi and the text tokenizer that go with a model: the checkpoint's files, or for tiny
models a tiny random Mimi (``build_tiny_mimi``) and a tiny sentencepiece tokenizer.

Units: audio at ``format.SAMPLE_RATE`` (24 kHz), one code per codebook every
``format.FRAME_SIZE`` (1920) samples (12.5 Hz).
"""

from __future__ import annotations

import io
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import sentencepiece
import torch
from moshi.models import loaders
from moshi.models.compression import MimiModel
from torch import nn

from ..format import SAMPLE_RATE
from .files import check_safetensors, no_pickle_loads
from .sources import tiny_seed


def load_codec_files(
    codec: str,
    info: loaders.CheckpointInfo | None,
    sizes: Mapping[str, Any],
    device: torch.device | str,
) -> tuple[MimiModel, Any | None]:
    """``(Mimi, text tokenizer or None)`` of ``codec`` (``"tiny:SEED"`` or a checkpoint source)
    with ``info``'s files; ``sizes``: the LM's ``card``, ``n_q``, ``dep_q``, ``text_card``."""
    seed = tiny_seed(codec)
    if seed is not None and (info is None or not Path(info.mimi_weights).is_file()):
        mimi = build_tiny_mimi(seed, card=int(sizes["card"]),
                               num_codebooks=int(sizes["n_q"]) - int(sizes["dep_q"]),
                               device=device)  # fmt: skip
        return mimi, build_tiny_tokenizer(int(sizes["text_card"]), seed)
    if info is None:
        raise ValueError(f"no Mimi codec known for the model loaded from {codec or '?'}")
    check_safetensors(info.mimi_weights, "Mimi weights")
    tokenizer = None
    if Path(info.tokenizer).is_file():
        try:
            tokenizer = info.get_text_tokenizer()
        except (RuntimeError, OSError) as e:  # sentencepiece: not a model file
            raise ValueError(f"{info.tokenizer}: not a sentencepiece tokenizer model ({e})") from e
    with no_pickle_loads():
        return info.get_mimi(device=device), tokenizer


def tiny_mimi_config(card: int = 32, num_codebooks: int = 8) -> dict[str, Any]:
    """``get_mimi`` config of a tiny Mimi: moshi's architecture kinds (SEANet with strides
    8·6·5·4, a causal transformer on each side, split RVQ with 1 semantic codebook, conv
    resampling 25 -> 12.5 Hz) at 24 kHz / 12.5 Hz (1920 samples per frame), small widths."""
    seanet = dict(loaders._seanet_kwargs, dimension=32, n_filters=4)
    quantizer = dict(loaders._quantizer_kwargs, dimension=16, n_q=num_codebooks, bins=card,
                     input_dimension=32, output_dimension=32)  # fmt: skip
    transformer = dict(loaders._transformer_kwargs, d_model=32, num_heads=2, num_layers=1,
                       dim_feedforward=64, input_dimension=32, output_dimensions=[32])  # fmt: skip
    return dict(loaders._mimi_config, seanet=seanet, quantizer=quantizer, transformer=transformer)


@torch.no_grad()
def build_tiny_mimi(
    seed: int = 0, card: int = 32, num_codebooks: int = 8, device: torch.device | str = "cpu"
) -> MimiModel:
    """A tiny random ``MimiModel`` (float32, eval): ``encode([B, 1, 1920 n]) -> [B, K, n]`` codes
    in ``[0, card)``. A fresh Mimi has all-zero codebooks; here each codebook, in order, is set
    to ``card`` of the vectors it receives on seeded calibration audio (sines and noise at
    several loudnesses), so codes depend on the input as with a trained Mimi.
    The global RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mimi = loaders.get_mimi(None, tiny_mimi_config(card, num_codebooks), device="cpu",
                                num_codebooks=num_codebooks)  # fmt: skip
        mimi.eval()
        audio = _calibration_audio(seed)
        codebooks = [m for m in mimi.modules() if hasattr(m, "embedding_sum")]
        for codebook in codebooks:
            seen: list[torch.Tensor] = []
            original = codebook.encode

            def capture(x: torch.Tensor, _orig=original, _seen=seen) -> torch.Tensor:
                _seen.append(x.reshape(-1, x.shape[-1]))
                return _orig(x)

            codebook.encode = capture  # instance attribute, removed below
            try:
                _fill_codebook(codebook, torch.zeros(1, codebook.embedding_sum.shape[1]))
                mimi.encode(audio)
            finally:
                del codebook.encode
            samples = torch.cat(seen)
            pick = torch.randperm(samples.shape[0])[:card]
            vectors = samples[pick]
            if vectors.shape[0] < card:  # short calibration: jitter copies
                extra = vectors[torch.randint(0, vectors.shape[0], (card - vectors.shape[0],))]
                vectors = torch.cat([vectors, extra + 0.01 * torch.randn_like(extra)])
            _fill_codebook(codebook, vectors)
    return mimi.to(device).eval()


def _fill_codebook(codebook: nn.Module, vectors: torch.Tensor) -> None:
    """Set a moshi ``EuclideanCodebook``'s centroids (broadcast to its size) and mark it ready."""
    codebook.embedding_sum.copy_(vectors.expand_as(codebook.embedding_sum))
    codebook.cluster_usage.fill_(1.0)
    codebook._initialized.fill_(1.0)
    codebook._embedding = None


def _calibration_audio(seed: int, seconds: float = 6.0) -> torch.Tensor:
    """``[4, 1, S]`` 24 kHz: sines of several pitches and loudnesses, and noise."""
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * SAMPLE_RATE)
    t = torch.arange(n) / SAMPLE_RATE
    rows = []
    for k in range(4):
        f = 80 + 400 * torch.rand((), generator=g)
        env = 0.5 + 0.5 * torch.sin(2 * torch.pi * (0.2 + k * 0.3) * t)
        tone = 0.05 * (k + 1) * env * torch.sin(2 * torch.pi * f * t)
        rows.append(tone + 0.02 * k * torch.randn(n, generator=g))
    return torch.stack(rows)[:, None]


_TINY_WORDS = str.split(
    "alpha bravo charlie delta echo foxtrot golf hotel india juliett kilo lima mike november "
    "oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu one two three "
    "four five six seven eight nine zero hello world moshi speech memory test time training "
    "layer stream"
)


def build_tiny_tokenizer(vocab_size: int = 64, seed: int = 0) -> Any:
    """A ``sentencepiece.SentencePieceProcessor`` of exactly ``vocab_size`` pieces, trained in
    memory (about 30 ms) on random sentences of a fixed word list. Ids 0-3 are
    ``<unk> <s> </s> <pad>`` like Moshi's tokenizer (3 = text PAD)."""
    rng = random.Random(seed)
    words, n = list(_TINY_WORDS), 200
    if vocab_size > 78:  # the word list holds 78 pieces: add random words for a larger vocabulary
        letters = "abcdefghijklmnopqrstuvwxyz"
        words += ["".join(rng.choice(letters) for _ in range(rng.randint(3, 8)))
                  for _ in range(4 * vocab_size)]  # fmt: skip
        n = 4 * vocab_size
    sentences = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(n)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        minloglevel=2,
    )
    return sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
