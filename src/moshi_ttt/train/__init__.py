"""Fine-tuning Moshi with TTT: config schema, moshi-finetune data pipeline and loss.

- ``config``: ``TrainConfig`` (YAML + ``--set key=value``, validated before any work).
- ``data``: JSONL index + stereo audio + word alignments -> codes ``[17, T]`` -> windows ->
  batches (``WindowLoader``), bad-file accounting, ``tokenize_index`` shards.
- ``loss``: the moshi-finetune weighted CE as ``LossTerms`` sums that aggregate exactly.
"""

from .config import DataConfig, LoraConfig, ModelConfig, OptimConfig, TrainConfig, apply_overrides
from .data import (
    AudioSource,
    BadFile,
    BadFileCounter,
    Batch,
    DataError,
    ShardSource,
    ToyEncoder,
    ToyTokenizer,
    Window,
    WindowLoader,
    build_text_stream,
    cut_windows,
    open_source,
    read_index,
    tokenize_index,
)
from .loss import LossTerms, compute_loss_terms, loss_masks, weight_totals

__all__ = [
    "AudioSource",
    "BadFile",
    "BadFileCounter",
    "Batch",
    "DataConfig",
    "DataError",
    "LoraConfig",
    "LossTerms",
    "ModelConfig",
    "OptimConfig",
    "ShardSource",
    "ToyEncoder",
    "ToyTokenizer",
    "TrainConfig",
    "Window",
    "WindowLoader",
    "apply_overrides",
    "build_text_stream",
    "compute_loss_terms",
    "cut_windows",
    "loss_masks",
    "open_source",
    "read_index",
    "tokenize_index",
    "weight_totals",
]
