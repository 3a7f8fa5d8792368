"""The moshi-finetune loss, as sums and weight totals that aggregate exactly.

For one micro-batch (``LMOutput`` of ``LMModel.forward(codes)``, ``codes [B, 17, T]``), with CE the
natural-log cross-entropy in float32 and masked positions contributing exactly 0 (their logits are
NaN; they are replaced by 0 before the CE, so no NaN reaches values or gradients):

- text:  ``w = text_mask * (text_padding_weight if target in {PAD 3, EPAD 0} else 1)``
- audio: ``w = mask * (first_codebook_weight on codebook 0 else 1)`` (the 8 Moshi codebooks;
  the user stream is never scored)
- ``loss = sum(w CE)_text / sum(w)_text + sum(w CE)_audio / sum(w)_audio``

``LossTerms`` keeps the numerators and denominators (plus the unweighted text CE and per-codebook
audio CE, for logging), so ``sum(terms).all_reduce().metrics()`` is the token-weighted mean over
micro-batches and ranks: exactly the loss of one big batch, not a mean of means. For gradients of
that global mean, get the global denominators before the forward (``weight_totals(codes)``
summed over micro-batches and ``all_reduce``d: they depend on the codes only) and backpropagate
``terms.objective(text_total, audio_total)`` of every micro-batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..format import NUM_CODEBOOKS, ZERO_TOKEN
from ..token_weights import audio_weights, text_weights


class LMOutputLike(Protocol):
    logits: torch.Tensor  # [B, 8, T, card], NaN where mask is False
    mask: torch.Tensor  # [B, 8, T] bool
    text_logits: torch.Tensor  # [B, 1, T, text_card]
    text_mask: torch.Tensor  # [B, 1, T] bool


def loss_masks(codes: torch.Tensor, delays: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(text_mask [B, 1, T], mask [B, 8, T])`` exactly as ``LMModel.forward`` returns them, from
    the codes alone: a target is scored iff it is not -1 and not lost to its stream's delay (the
    last ``delay`` frames). ``delays``: the model's 17 delays (``lm.delays``)."""
    T = codes.shape[-1]
    valid = codes[:, : 1 + NUM_CODEBOOKS] != ZERO_TOKEN
    keep = torch.ones(1 + NUM_CODEBOOKS, T, dtype=torch.bool, device=codes.device)
    for k, d in enumerate(delays[: 1 + NUM_CODEBOOKS]):
        if d > 0:
            keep[k, T - d :] = False
    valid = valid & keep
    return valid[:, :1], valid[:, 1:]


def weight_totals(
    codes: torch.Tensor,
    delays: Sequence[int],
    *,
    first_codebook_weight: float,
    text_padding_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum text w, sum audio w)`` of a batch, float32 scalars, before any forward: equal to
    ``LossTerms.text_weight`` / ``audio_weight`` of ``compute_loss_terms`` on its output."""
    text_mask, mask = loss_masks(codes, delays)
    tw = text_weights(codes[:, :1], text_mask, text_padding_weight).sum()
    return tw, audio_weights(mask, first_codebook_weight).sum()


@dataclass
class LossTerms:
    """Sums over the scored tokens of one or more micro-batches (float32 tensors).

    ``text_sum`` / ``audio_sum`` (weighted CE sums) carry gradients; the rest is detached.
    ``audio_ce_sum`` / ``audio_count`` are per codebook, shape ``[8]``.
    """

    text_sum: torch.Tensor
    text_weight: torch.Tensor
    audio_sum: torch.Tensor
    audio_weight: torch.Tensor
    text_ce_sum: torch.Tensor
    text_count: torch.Tensor
    audio_ce_sum: torch.Tensor
    audio_count: torch.Tensor

    # -- the differentiable objective -------------------------------------------------------
    def loss(self) -> torch.Tensor:
        """``text_sum / text_weight + audio_sum / audio_weight`` (a part with weight 0 counts 0)."""
        return _ratio(self.text_sum, self.text_weight) + _ratio(self.audio_sum, self.audio_weight)

    def objective(
        self, text_total: torch.Tensor | float, audio_total: torch.Tensor | float
    ) -> torch.Tensor:
        """This micro-batch's share of the loss of a larger batch whose weight totals are given
        (global over micro-batches and ranks): summing it over the micro-batches gives that
        loss, so its gradients sum to the gradient of the token-weighted mean."""
        return _ratio(self.text_sum, text_total) + _ratio(self.audio_sum, audio_total)

    # -- aggregation ------------------------------------------------------------------------
    def __add__(self, other: LossTerms) -> LossTerms:
        return LossTerms(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __radd__(self, other: Any) -> LossTerms:
        if isinstance(other, int) and other == 0:  # sum([...]) starts from 0
            return self
        return NotImplemented

    def detach(self) -> LossTerms:
        return LossTerms(*(getattr(self, f.name).detach() for f in fields(self)))

    def to_vector(self) -> torch.Tensor:
        """All values, detached, as one float32 vector of 22 (for one ``all_reduce``)."""
        return torch.cat([getattr(self, f.name).detach().float().reshape(-1) for f in fields(self)])

    @staticmethod
    def from_vector(v: torch.Tensor) -> LossTerms:
        scalars = [v[i] for i in range(6)]
        k = (v.numel() - 6) // 2
        return LossTerms(*scalars, v[6 : 6 + k], v[6 + k : 6 + 2 * k])

    def all_reduce(self, group: Any = None) -> LossTerms:
        """Detached sums over all ranks (a no-op copy without ``torch.distributed``)."""
        v = self.to_vector().clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(v, op=dist.ReduceOp.SUM, group=group)
        return LossTerms.from_vector(v)

    # -- logging ----------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """Token-weighted means as floats (NaN where nothing was scored; in ``loss`` a part with
        nothing scored counts 0, as in the objective, NaN if neither part has any) and counts:
        ``loss``, ``text_loss``, ``audio_loss`` (weighted, the training objective), ``text_ce``,
        ``audio_ce`` and ``audio_ce_cb0`` ... ``audio_ce_cb7`` (unweighted), ``text_tokens``,
        ``audio_tokens``."""
        v = self.detach()
        text = _mean(v.text_sum, v.text_weight)
        audio = _mean(v.audio_sum, v.audio_weight)
        out = {
            "loss": float(v.loss()) if float(v.text_weight + v.audio_weight) > 0 else math.nan,
            "text_loss": text,
            "audio_loss": audio,
            "text_ce": _mean(v.text_ce_sum, v.text_count),
            "audio_ce": _mean(v.audio_ce_sum.sum(), v.audio_count.sum()),
        }
        for k in range(v.audio_ce_sum.numel()):
            out[f"audio_ce_cb{k}"] = _mean(v.audio_ce_sum[k], v.audio_count[k])
        out["text_tokens"] = float(v.text_count)
        out["audio_tokens"] = float(v.audio_count.sum())
        return out


def _ratio(num: torch.Tensor, den: torch.Tensor | float) -> torch.Tensor:
    den_t = torch.as_tensor(den, dtype=num.dtype, device=num.device)
    return torch.where(den_t > 0, num / den_t.clamp_min(1e-30), torch.zeros_like(num))


def _mean(num: torch.Tensor, den: torch.Tensor) -> float:
    return float(num) / float(den) if float(den) > 0 else float("nan")


def _masked_ce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Float32 CE ``[B, K, T]`` of ``logits [B, K, T, C]``; exactly 0 (value and gradient) where
    ``mask`` is False, whatever the logits hold there (NaN)."""
    safe = torch.where(mask[..., None], logits.float(), 0.0)
    tgt = torch.where(mask, target, 0)
    ce = F.cross_entropy(safe.flatten(0, 2), tgt.flatten(), reduction="none")
    return ce.view_as(tgt) * mask


def compute_loss_terms(
    output: LMOutputLike,
    codes: torch.Tensor,
    *,
    first_codebook_weight: float,
    text_padding_weight: float,
) -> LossTerms:
    """``LossTerms`` of ``output = LMModel.forward(codes)``, ``codes [B, 17, T]``."""
    B, _, T = codes.shape
    if output.logits.shape[:3] != (B, NUM_CODEBOOKS, T) or output.text_logits.shape[:3] != (
        B,
        1,
        T,
    ):
        raise ValueError(
            f"LMOutput logits {tuple(output.logits.shape)} / text_logits "
            f"{tuple(output.text_logits.shape)} do not match codes {tuple(codes.shape)}"
        )
    text_target, audio_target = codes[:, :1], codes[:, 1 : 1 + NUM_CODEBOOKS]
    text_mask, mask = output.text_mask.bool(), output.mask.bool()

    text_ce = _masked_ce(output.text_logits, text_target, text_mask)
    tw = text_weights(text_target, text_mask, text_padding_weight)
    audio_ce = _masked_ce(output.logits, audio_target, mask)
    aw = audio_weights(mask, first_codebook_weight)
    return LossTerms(
        text_sum=(text_ce * tw).sum(),
        text_weight=tw.sum(),
        audio_sum=(audio_ce * aw).sum(),
        audio_weight=aw.sum(),
        text_ce_sum=text_ce.detach().sum(),
        text_count=text_mask.sum().float(),
        audio_ce_sum=audio_ce.detach().sum(dim=(0, 2)),
        audio_count=mask.sum(dim=(0, 2)).float(),
    )


def covered_kl_sum(
    student: LMOutputLike,
    teacher: LMOutputLike,
    frames: int,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """``KL(teacher || student)`` summed over the scored text and audio tokens of frames
    ``< frames`` (float32 scalar, differentiable in ``student``): the harm term of
    ``TrainConfig.kl_to_base``; ``teacher`` is the gate-0 model's output on the same codes.
    ``rows [B]`` bool, if given: only those batch rows count (with a carried TTT state, the
    rows that start a file: elsewhere the memory knows earlier windows the attention does not).
    """
    total = torch.zeros((), dtype=torch.float32, device=student.logits.device)
    for s_logits, t_logits, mask in (
        (student.text_logits, teacher.text_logits, student.text_mask),
        (student.logits, teacher.logits, student.mask),
    ):
        m = mask.bool().clone()
        m[..., frames:] = False
        if rows is not None:
            m[~rows.to(device=m.device, dtype=torch.bool)] = False
        if not bool(m.any()):
            continue
        s = F.log_softmax(s_logits[m].float(), dim=-1)
        t = F.log_softmax(t_logits[m].float(), dim=-1)
        total = total + (t.exp() * (t - s)).sum()
    return total


def covered_ce_sums(output: LMOutputLike, codes: torch.Tensor, frames: int) -> torch.Tensor:
    """``[CE sum, token count]`` (float32, detached) over the scored text and audio tokens of
    frames ``< frames``: where the attention sees the whole prefix (the harm check)."""
    text = _masked_ce(output.text_logits, codes[:, :1], output.text_mask.bool())
    audio = _masked_ce(output.logits, codes[:, 1 : 1 + NUM_CODEBOOKS], output.mask.bool())
    tm, am = output.text_mask.bool()[..., :frames], output.mask.bool()[..., :frames]
    total = text[..., :frames].sum() + audio[..., :frames].sum()
    return torch.stack([total.detach().float(), (tm.sum() + am.sum()).float()])
