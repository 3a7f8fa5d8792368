"""moshi 0.2.13 works on our torch: build the tiny Moshi-architecture model, a forward, LMGen."""

from __future__ import annotations

import pytest
import torch
from moshi.models.lm import LMGen, LMModel
from moshi.utils.compile import no_compile

from moshi_ttt.integration import build_tiny_lm, tiny_lm_kwargs


@pytest.fixture(autouse=True)
def _eager():
    """moshi torch.compiles a few functions lazily; on CPU that costs minutes, so stay eager."""
    with no_compile():
        yield


def test_tiny_kwargs_keep_the_7b_kinds():
    from moshi.models.loaders import _lm_kwargs

    kw = tiny_lm_kwargs(num_layers=2)
    assert kw["num_layers"] == 2 and kw["dim"] == 64
    for key in ("norm", "gating", "positional_embedding", "hidden_scale", "delays", "n_q", "dep_q"):
        assert kw[key] == _lm_kwargs[key], key
    model = LMModel(**kw)  # LMModel accepts them as they are
    assert len(model.transformer.layers) == 2


def test_forward_and_lmgen():
    lm = build_tiny_lm(seed=1)
    assert not lm.training and next(lm.parameters()).dtype == torch.float32
    B, T = 2, 10
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, lm.card, (B, lm.num_codebooks, T), generator=g)
    codes[:, 0] = torch.randint(0, lm.text_card, (B, T), generator=g)
    with torch.no_grad():
        out = lm(codes)
    assert out.logits.shape == (B, lm.dep_q, T, lm.card)
    assert out.text_logits.shape == (B, 1, T, lm.text_card)
    assert out.mask.sum(-1)[0].tolist() == [T] + [T - 1] * 7  # the acoustic delay
    assert torch.isfinite(out.logits[out.mask]).all()

    gen = LMGen(lm, temp=0.8, temp_text=0.7, top_k=10, top_k_text=10)
    outs = []
    with gen.streaming(B):
        for _ in range(6):
            user = torch.randint(0, lm.card, (B, 8, 1), generator=g)
            outs.append(gen.step(user))
    assert outs[0] is None  # the first frame only fills the delays
    assert all(o.shape == (B, 1 + lm.dep_q, 1) for o in outs[1:])
    assert all(
        int(o[:, 1:].max()) < lm.card and int(o[:, :1].max()) < lm.text_card for o in outs[1:]
    )


def test_build_is_seeded_and_leaves_global_rng():
    state = torch.get_rng_state()
    a, b, c = build_tiny_lm(seed=3), build_tiny_lm(seed=3), build_tiny_lm(seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    pa, pb, pc = (m.transformer.layers[0].gating.linear_in.weight for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
