"""The moshi-finetune loss: hand computation, NaN-masked logits, weights, per-codebook CE, exact
token-weighted aggregation over micro-batches, masks from codes equal to the model's."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from moshi.utils.compile import no_compile

from moshi_ttt.integration import build_tiny_lm
from moshi_ttt.train.loss import LossTerms, compute_loss_terms, loss_masks, weight_totals

CARD, TEXT_CARD = 11, 13
M, TPW = 100.0, 0.5  # first codebook weight, text padding weight
DELAYS = [0, 0] + [1] * 7 + [0] + [1] * 7  # moshi's: acoustic codebooks lag one frame


def fake_output(codes: torch.Tensor, seed: int) -> SimpleNamespace:
    """Random logits shaped like LMOutput for ``codes [B, 17, T]``: NaN wherever the mask is
    False, as moshi's undelay leaves them."""
    g = torch.Generator().manual_seed(seed)
    B, _, T = codes.shape
    text_mask, mask = loss_masks(codes, DELAYS)
    logits = torch.randn(B, 8, T, CARD, generator=g) * 3
    text_logits = torch.randn(B, 1, T, TEXT_CARD, generator=g) * 3
    logits[~mask] = float("nan")
    text_logits[~text_mask] = float("nan")
    return SimpleNamespace(logits=logits, mask=mask, text_logits=text_logits, text_mask=text_mask)


def random_codes(B: int, T: int, seed: int, pad_tail: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, CARD, (B, 17, T), generator=g)
    codes[:, 0] = torch.randint(0, TEXT_CARD, (B, T), generator=g)
    codes[:, 0, ::3] = 3  # PAD
    codes[:, 0, 1::5] = 0  # EPAD
    if pad_tail:
        codes[-1, :, T - pad_tail :] = -1  # the padded end of a file's last window
    return codes


def hand_terms(out, codes) -> dict[str, float]:
    """Position by position, float64."""
    B, _, T = codes.shape
    s = dict(text=0.0, text_w=0.0, audio=0.0, audio_w=0.0, text_ce=0.0, text_n=0)
    cb = [0.0] * 8
    cb_n = [0] * 8
    for b in range(B):
        for t in range(T):
            if out.text_mask[b, 0, t]:
                y = int(codes[b, 0, t])
                ce = -torch.log_softmax(out.text_logits[b, 0, t].double(), -1)[y].item()
                w = TPW if y in (0, 3) else 1.0
                s["text"] += w * ce
                s["text_w"] += w
                s["text_ce"] += ce
                s["text_n"] += 1
            for k in range(8):
                if out.mask[b, k, t]:
                    y = int(codes[b, 1 + k, t])
                    ce = -torch.log_softmax(out.logits[b, k, t].double(), -1)[y].item()
                    w = M if k == 0 else 1.0
                    s["audio"] += w * ce
                    s["audio_w"] += w
                    cb[k] += ce
                    cb_n[k] += 1
    s["cb"], s["cb_n"] = cb, cb_n
    return s


def moshi_finetune_loss(logits, target, target_mask, mode, m=1.0, tpw=1.0, ids=None):
    """A transcription of moshi-finetune's ``compute_loss_with_mask``."""
    target = torch.where(target_mask, target, torch.zeros_like(target))
    weights = target_mask.float()
    if mode == "audio":
        weights[:, 0] *= m
    else:
        for i in ids:
            weights[target == i] *= tpw
    logits = logits.reshape(-1, logits.size(-1)).float()
    mb = F.cross_entropy(logits, target.reshape(-1), reduction="none")
    weights = weights.view(-1)
    mb = torch.where(weights > 0.0, mb * weights, torch.zeros_like(mb))
    return torch.sum(mb) / torch.sum(weights)


def terms_of(out, codes) -> LossTerms:
    return compute_loss_terms(out, codes, first_codebook_weight=M, text_padding_weight=TPW)


def test_matches_hand_computation_and_moshi_finetune():
    codes = random_codes(2, 9, seed=0, pad_tail=4)
    out = fake_output(codes, seed=1)
    assert torch.isnan(out.logits).any() and torch.isnan(out.text_logits).any()
    terms = terms_of(out, codes)
    h = hand_terms(out, codes)
    close = dict(rel=1e-5, abs=1e-5)
    assert float(terms.text_sum) == pytest.approx(h["text"], **close)
    assert float(terms.text_weight) == pytest.approx(h["text_w"], **close)
    assert float(terms.audio_sum) == pytest.approx(h["audio"], **close)
    assert float(terms.audio_weight) == pytest.approx(h["audio_w"], **close)
    m = terms.metrics()
    assert m["text_loss"] == pytest.approx(h["text"] / h["text_w"], **close)
    assert m["audio_loss"] == pytest.approx(h["audio"] / h["audio_w"], **close)
    assert m["loss"] == pytest.approx(float(terms.loss()), **close)
    assert m["text_ce"] == pytest.approx(h["text_ce"] / h["text_n"], **close)
    for k in range(8):
        assert m[f"audio_ce_cb{k}"] == pytest.approx(h["cb"][k] / h["cb_n"][k], **close)
    assert m["audio_ce"] == pytest.approx(sum(h["cb"]) / sum(h["cb_n"]), **close)
    assert m["text_tokens"] == h["text_n"] and m["audio_tokens"] == sum(h["cb_n"])
    # codebook 0 weighted x100: 100 / 107 of the audio weight on an unpadded row
    assert h["cb_n"][0] == 2 * 9 - 4 and h["cb_n"][1] == 2 * 8 - 3
    ref = moshi_finetune_loss(
        out.text_logits, codes[:, :1], out.text_mask, "text", tpw=TPW, ids={3, 0}
    ) + moshi_finetune_loss(out.logits, codes[:, 1:9], out.mask, "audio", m=M)
    assert float(terms.loss()) == pytest.approx(float(ref), rel=1e-6)


def test_gradients_finite_and_zero_at_masked_positions():
    codes = random_codes(2, 7, seed=3, pad_tail=2)
    out = fake_output(codes, seed=4)
    out.logits.requires_grad_(True)
    out.text_logits.requires_grad_(True)
    terms_of(out, codes).loss().backward()
    for logits, mask in ((out.logits, out.mask), (out.text_logits, out.text_mask)):
        assert torch.isfinite(logits.grad).all()
        assert (logits.grad[~mask] == 0).all() and (logits.grad[mask].abs().sum(-1) > 0).all()


def test_micro_batches_aggregate_to_the_concatenated_batch():
    c1, c2 = random_codes(2, 10, seed=5, pad_tail=7), random_codes(3, 10, seed=6)
    o1, o2 = fake_output(c1, seed=7), fake_output(c2, seed=8)
    cat = SimpleNamespace(
        **{k: torch.cat([getattr(o1, k), getattr(o2, k)]) for k in vars(o1)}
    )  # fmt: skip
    whole = terms_of(cat, torch.cat([c1, c2]))
    parts = sum([terms_of(o1, c1), terms_of(o2, c2)])
    for key, value in whole.metrics().items():
        assert parts.metrics()[key] == pytest.approx(value, rel=1e-6), key
    mean_of_means = (terms_of(o1, c1).loss() + terms_of(o2, c2).loss()) / 2
    assert abs(float(mean_of_means) - whole.metrics()["loss"]) > 1e-3  # not what we compute
    # one vector round trip (what all_reduce sums), and all_reduce without a process group
    again = LossTerms.from_vector(parts.to_vector())
    assert again.metrics() == parts.detach().metrics() == parts.all_reduce().metrics()

    # gradients: per micro-batch objectives with global weight totals == the big batch's loss
    totals = [
        weight_totals(c, DELAYS, first_codebook_weight=M, text_padding_weight=TPW) for c in (c1, c2)
    ]
    text_total = totals[0][0] + totals[1][0]
    audio_total = totals[0][1] + totals[1][1]
    assert float(text_total) == float(whole.text_weight)
    assert float(audio_total) == float(whole.audio_weight)
    for o in (o1, o2, cat):
        o.logits.requires_grad_(True)
        o.text_logits.requires_grad_(True)
    whole = terms_of(cat, torch.cat([c1, c2]))
    whole.loss().backward()
    for o, c in ((o1, c1), (o2, c2)):
        terms_of(o, c).objective(text_total, audio_total).backward()
    grad = torch.cat([o1.logits.grad, o2.logits.grad])
    torch.testing.assert_close(grad, cat.logits.grad, rtol=1e-5, atol=1e-7)
    text_grad = torch.cat([o1.text_logits.grad, o2.text_logits.grad])
    torch.testing.assert_close(text_grad, cat.text_logits.grad, rtol=1e-5, atol=1e-7)


def test_empty_batch_is_zero_loss_and_nan_metrics():
    codes = torch.full((1, 17, 5), -1)
    out = fake_output(codes, seed=0)
    terms = terms_of(out, codes)
    assert float(terms.loss()) == 0.0 and float(terms.text_weight) == 0.0
    assert math.isnan(terms.metrics()["loss"]) and terms.metrics()["audio_tokens"] == 0


def test_shape_mismatch_is_an_error():
    codes = random_codes(1, 6, seed=0)
    out = fake_output(random_codes(1, 5, seed=0), seed=0)
    with pytest.raises(ValueError, match="do not match codes"):
        terms_of(out, codes)


def test_masks_and_weights_from_codes_equal_the_models():
    """On the tiny Moshi: ``loss_masks`` = LMOutput masks, ``weight_totals`` = terms' weights."""
    lm = build_tiny_lm(seed=0)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 32, (2, 17, 15), generator=g)
    codes[:, 0] = torch.randint(0, 64, (2, 15), generator=g)
    codes[:, 0, ::4] = 3
    codes[1, :, 9:] = -1
    with no_compile(), torch.no_grad():
        out = lm(codes)
    text_mask, mask = loss_masks(codes, lm.delays)
    assert torch.equal(text_mask, out.text_mask) and torch.equal(mask, out.mask)
    assert mask.sum(-1)[0].tolist() == [15] + [14] * 7  # the delay-lost last frame
    terms = compute_loss_terms(out, codes, first_codebook_weight=M, text_padding_weight=TPW)
    tw, aw = weight_totals(codes, lm.delays, first_codebook_weight=M, text_padding_weight=TPW)
    assert float(tw) == float(terms.text_weight) and float(aw) == float(terms.audio_weight)
    assert math.isfinite(float(terms.loss()))
    # a random model's loss: about ln(text_card) + ln(card)
    m = terms.metrics()
    assert abs(m["text_ce"] - math.log(64)) < 1.5 and abs(m["audio_ce"] - math.log(32)) < 1.5
