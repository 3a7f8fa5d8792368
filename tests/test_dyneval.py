"""Dynamic evaluation against its definition: lr 0 is the frozen model's streaming losses; one
update equals SGD by hand on the first chunk's loss (LMModel.forward) followed by streaming the
updated copy; weights come back unchanged; the sweep picks on the files it is given."""

from __future__ import annotations

import copy

import pytest
import torch
from moshi.utils.compile import no_compile

from moshi_ttt.eval.dyneval import (
    DynEvalConfig,
    dyneval_losses,
    evaluate_dyneval,
    sweep_dyneval,
    updated_parameters,
)
from moshi_ttt.eval.long_context import stream_losses
from moshi_ttt.integration import build_tiny_lm
from moshi_ttt.train.loss import _masked_ce

TOL = {"rtol": 1e-4, "atol": 1e-5}


@pytest.fixture(autouse=True)
def _eager():
    with no_compile():
        yield


def codes_for(lm, T: int, seed: int = 0, audio: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, lm.card, (17, T), generator=g)
    if not audio:
        codes[1:] = -1
    codes[0] = torch.randint(0, lm.text_card, (T,), generator=g)
    codes[0, 3] = -1
    return codes


def test_lr0_equals_streaming_and_weights_restored():
    lm = build_tiny_lm(0)
    codes = codes_for(lm, 40)
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    ref = stream_losses(lm, codes, chunk_frames=1)
    got = dyneval_losses(lm, codes, DynEvalConfig(lr=0.0, chunk_frames=7))
    torch.testing.assert_close(got.text, ref.text, **TOL)
    torch.testing.assert_close(got.audio, ref.audio, **TOL)
    assert torch.equal(got.text_mask, ref.text_mask) and torch.equal(got.audio_mask, ref.audio_mask)
    dyneval_losses(lm, codes, DynEvalConfig(lr=0.5, chunk_frames=7, steps=2))
    after = lm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in lm.parameters()] == [
        p.requires_grad for p in build_tiny_lm(0).parameters()
    ]


@pytest.mark.parametrize("audio", [True, False])
def test_one_update_equals_sgd_by_hand(audio):
    lm = build_tiny_lm(0)  # context 12
    K, T = 10, 20
    codes = codes_for(lm, T, audio=audio)
    cfg = DynEvalConfig(lr=0.3, layers="top:2", chunk_frames=K)
    got = dyneval_losses(lm, codes, cfg)

    ref_lm = copy.deepcopy(lm)
    params = updated_parameters(ref_lm, "top:2")
    out = ref_lm(codes[None, :, :K])
    text = _masked_ce(out.text_logits, codes[None, :1, :K], out.text_mask)
    aud = _masked_ce(out.logits, codes[None, 1:9, :K], out.mask)
    n = out.text_mask.sum() + out.mask.sum()
    loss = (text.sum() + aud.sum()) / n
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, gr in zip(params, grads):
            p -= 0.3 * gr
    ref = stream_losses(ref_lm.eval(), codes, chunk_frames=1)
    first = stream_losses(lm, codes, chunk_frames=1)
    # Frames whose every step lies in the second chunk come from the updated copy.
    torch.testing.assert_close(got.text[K:], ref.text[K:], **TOL)
    torch.testing.assert_close(got.text[:K], first.text[:K], **TOL)
    if audio:
        torch.testing.assert_close(got.audio[:, K:], ref.audio[:, K:], **TOL)
    assert float((got.text[K:] - first.text[K:]).abs().max()) > 1e-4  # the update did something


def test_clip_decay_and_nonfinite_update_leave_finite_weights():
    lm = build_tiny_lm(0)
    codes = codes_for(lm, 30)
    got = dyneval_losses(lm, codes, DynEvalConfig(lr=1e30, chunk_frames=10))
    assert torch.isfinite(got.text).all()  # huge steps: skipped where non-finite
    a = dyneval_losses(lm, codes, DynEvalConfig(lr=0.5, chunk_frames=10, clip=1e-9))
    b = dyneval_losses(lm, codes, DynEvalConfig(lr=0.0, chunk_frames=10))
    torch.testing.assert_close(a.text, b.text, rtol=1e-4, atol=1e-5)  # a clip of ~0 = no update
    d = dyneval_losses(lm, codes, DynEvalConfig(lr=0.5, chunk_frames=10, decay=0.5))
    assert torch.isfinite(d.text).all()


def test_config_refuses_bad_values():
    for bad in (
        {"lr": -1},
        {"lr": float("nan")},
        {"chunk_frames": 0},
        {"steps": 0},
        {"clip": -1},
        {"decay": 1.0},
    ):
        with pytest.raises(ValueError, match="dyneval"):
            DynEvalConfig(**bad)
    with pytest.raises(ValueError):
        dyneval_losses(build_tiny_lm(0), codes_for(build_tiny_lm(0), 20), DynEvalConfig(layers="7"))


def test_sweep_returns_the_best_on_the_given_files():
    lm = build_tiny_lm(0)
    files = [(f"f{i}", codes_for(lm, 30, seed=i)) for i in range(2)]
    grid = [DynEvalConfig(lr=lr, chunk_frames=10) for lr in (0.0, 0.05)]
    best, scores = sweep_dyneval(lm, files, grid)
    values = [s["text_ce"] for s in scores]
    assert best == grid[values.index(min(values))]
    curve = evaluate_dyneval(lm, files, best)
    assert curve.totals(12)["text_ce"] == pytest.approx(min(values))
