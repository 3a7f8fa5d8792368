"""Fine-tuning Moshi with TTT (``moshi-ttt train``), one training path, torchrun/FSDP2.

- ``config``: ``TrainConfig`` (YAML + ``--set key=value``, validated before any work).
- ``loss``: the moshi-finetune weighted CE as ``LossTerms`` sums that aggregate exactly.
- ``model``: which parameters train (groups by module type, fp32 masters), FSDP2 build.
- ``checkpoint``: atomic checkpoints and exact resume; ``trainer``: the loop.

The data it reads is ``moshi_ttt.data``; the model it starts from is ``moshi_ttt.models``.
"""

from .config import DataConfig, LoraConfig, ModelConfig, OptimConfig, TrainConfig, apply_overrides
from .loss import LossTerms, compute_loss_terms, loss_masks, weight_totals

__all__ = [
    "DataConfig",
    "LoraConfig",
    "LossTerms",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "apply_overrides",
    "compute_loss_terms",
    "loss_masks",
    "weight_totals",
]
