"""Inference-time window extension: ScaledRope at factor 1 == moshi's RoPE; NTK and YaRN
frequencies against their formulas; the context manager changes the window and restores it."""

from __future__ import annotations

import math

import pytest
import torch
from moshi.modules.rope import RotaryEmbedding
from moshi.utils.compile import no_compile

from moshi_ttt.eval.long_context import attention_context, stream_losses
from moshi_ttt.eval.window import ScaledRope, extended_window, rope_frequencies
from moshi_ttt.integration import build_tiny_lm


@pytest.fixture(autouse=True)
def _eager():
    with no_compile():
        yield


@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("time_before_heads", [True, False])
def test_scaled_rope_factor_one_equals_moshi(interleave, time_before_heads):
    g = torch.Generator().manual_seed(0)
    shape = (2, 7, 3, 16) if time_before_heads else (2, 3, 7, 16)
    q, k = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    offset = torch.tensor([0, 5])
    ref = RotaryEmbedding(interleave=interleave, max_period=10_000.0)
    freqs, scale = rope_frequencies(16, 10_000.0, "yarn", 1.0, 12)
    ours = ScaledRope(freqs, scale, interleave)
    for a, b in zip(ours(q, k, offset, time_before_heads), ref(q, k, offset, time_before_heads)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_ntk_and_yarn_frequencies_follow_their_formulas():
    D, P, s, L = 16, 10_000.0, 4.0, 64
    base, _ = rope_frequencies(D, P)
    ntk, scale = rope_frequencies(D, P, "ntk", s, L)
    assert scale == 1.0 and ntk[0] == base[0]  # the fastest rotation is kept
    assert float(base[-1] / ntk[-1]) == pytest.approx(s ** ((D - 2) / (D - 2)) * 1.0, rel=1e-9)
    yarn, scale = rope_frequencies(D, P, "yarn", s, L)
    assert scale == pytest.approx(0.1 * math.log(s) + 1)
    turns = L * base / (2 * math.pi)
    for f, f0, r in zip(yarn, base, turns):
        if r > 32:
            assert float(f) == pytest.approx(float(f0))  # short wavelengths: unchanged
        elif r < 1:
            assert float(f) == pytest.approx(float(f0) / s)  # long ones: interpolated
        else:
            assert float(f0) / s <= float(f) <= float(f0)
    with pytest.raises(ValueError, match="scaling"):
        rope_frequencies(D, P, "linear")
    with pytest.raises(ValueError, match=">= 1"):
        rope_frequencies(D, P, "ntk", 0.5)


def test_extended_window_changes_and_restores():
    lm = build_tiny_lm(0)  # context 12
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, lm.card, (17, 30), generator=g)
    codes[0] = torch.randint(0, lm.text_card, (30,), generator=g)
    before = stream_losses(lm, codes, chunk_frames=30)
    rope = lm.transformer.layers[0].self_attn.rope
    for scaling in ("none", "ntk", "yarn"):
        with extended_window(lm, 30, scaling):
            assert attention_context(lm) == 30
            wide = stream_losses(lm, codes, chunk_frames=30)
        assert attention_context(lm) == 12 and lm.transformer.layers[0].self_attn.rope is rope
        torch.testing.assert_close(
            wide.text[:12], before.text[:12], rtol=1e-4, atol=1e-4
        ) if scaling == "none" else None
        assert not torch.allclose(wide.text[12:], before.text[12:])
    after = stream_losses(lm, codes, chunk_frames=30)
    torch.testing.assert_close(after.text, before.text)
    with pytest.raises(ValueError, match="trained window"), extended_window(lm, 5):
        pass
