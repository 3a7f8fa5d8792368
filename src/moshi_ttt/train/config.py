"""``TrainConfig``: the validated schema of ``moshi-ttt train CONFIG.yaml [--set key=value ...]``.

Every key, its type and its bounds are checked when the config is built, before any work: an
unknown or misspelt key names the full dotted key and the closest valid one (moshi-finetune's
names, e.g. ``first_codebook_weight_multiplier`` or ``optim.lr``, point to ours), a wrong type or
an impossible value names the key and what was expected (``moshi_ttt.schema``).

Units: durations in seconds, frames at 12.5 Hz (80 ms), steps are optimizer steps, ``batch_size``
is per rank and per micro-batch (global batch = batch_size x grad_accum x world size).
Relative paths are relative to the working directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .. import schema
from ..format import frames_for_duration
from ..integration.config import TTTConfig, parse_layer_spec
from ..models.spec import LoraConfig, ModelConfig, ModelSpec
from ..schema import option, read_yaml
from ..token_weights import FIRST_CODEBOOK_WEIGHT, TEXT_PADDING_WEIGHT

# Names used by moshi-finetune (and common guesses) -> ours, for "did you mean" messages.
ALIASES: dict[str, str] = {
    "first_codebook_weight_multiplier": "first_codebook_weight",
    "num_microbatches": "grad_accum",
    "log_freq": "log_every",
    "eval_freq": "eval_every",
    "ckpt_freq": "ckpt_every",
    "num_ckpt_keep": "keep_last",
    "param_dtype": "model.dtype",
    "moshi_paths": "model",
    "hf_repo_id": "model.hf_repo",
    "train_data": "data.train",
    "eval_data": "data.eval",
    "do_eval": "eval_every",
    "do_ckpt": "ckpt_every",
    "warmup": "optim.pct_start",
    "warmup_steps": "optim.pct_start",
    "warmup_frac": "optim.pct_start",
    "optim.lr": "lr",
    "lora.lr": "lora_lr",
    "ttt.lr": "ttt_lr",
    "clip": "max_norm",
    "grad_clip": "max_norm",
    "ft_embed": "model.train_embeddings",
    "shards": "data.train",
    "shards_dir": "data.train",
}


@dataclass
class DataConfig:
    """The moshi-finetune dataset format, raw or pre-tokenized (``moshi-ttt tokenize``).

    Attributes:
        train / eval: index paths: a JSONL index (``{"path", "duration"}`` per line, audio paths
            relative to the index's directory) or a shards directory (or its ``shards.json``).
        state_carry: ``"none"``: every window starts from the initial TTT state;
            ``"detached"``: the windows of one file are fed in order to the same batch row and
            the TTT state is carried from one window to the next (no gradient through it).
        shuffle: shuffle the file order at every epoch (windows within a file stay in order).
        max_bad_fraction: stop the run when more than this fraction of the files seen so far is
            unusable (missing, unreadable, empty, too short, wrong channel count, bad alignments).
        min_duration_sec: files shorter than this are skipped as too short.
        require_alignments: a file without its ``.json`` alignments is skipped (else it is used
            with no text: text tokens -1, no text loss).
        main_speaker: the alignment speaker label that is Moshi (left channel).
        encode_chunk_sec: Mimi encodes a file in streaming chunks of this length (bounded
            memory on long files); 0 = the whole file in one call.
        num_workers: background threads reading and decoding audio ahead of the trainer.
    """

    train: list[str] = field(default_factory=list)
    eval: list[str] = field(default_factory=list)
    state_carry: Literal["none", "detached"] = "none"
    shuffle: bool = True
    max_bad_fraction: float = option(0.1, ge=0, le=1)
    min_duration_sec: float = option(1.0, ge=0)
    require_alignments: bool = True
    main_speaker: str = option("SPEAKER_MAIN", nonempty=True)
    encode_chunk_sec: float = option(60.0, ge=0)
    num_workers: int = option(2, ge=0)


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (peak rates are the top-level ``lr``/``ttt_lr``/...).

    Attributes:
        schedule: ``"cosine"`` (linear warm-up over ``pct_start`` of the steps from 0, then
            cosine decay to ``min_lr_ratio`` x peak), ``"onecycle"`` (torch ``OneCycleLR`` as
            moshi-finetune: from peak/25, warm-up ``pct_start``, down to peak/2.5e5) or
            ``"constant"`` (after the same linear warm-up).
        pct_start: fraction of ``max_steps`` spent warming up.
    """

    weight_decay: float = option(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = option(1e-8, gt=0)
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    pct_start: float = option(0.05, ge=0, lt=1)
    min_lr_ratio: float = option(0.0, ge=0, le=1)

    def rules(self) -> None:
        b1, b2 = self.betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"betas: expected two numbers in [0, 1), got {[b1, b2]}")


@dataclass
class TrainConfig:
    """Everything a training run needs. See the module docstring for units.

    Attributes:
        run_dir: output directory (resolved config, metrics.jsonl, TensorBoard, checkpoints).
        seed: seeds the initialisation of the new parameters and the data order.
        max_steps: optimizer steps.
        duration_sec: window length; a file is cut into consecutive windows of this length
            (``ceil(12.5 * duration_sec)`` frames, the last one padded).
        batch_size: windows per micro-batch per rank.
        grad_accum: micro-batches per optimizer step.
        global_batch: windows per optimizer step over all ranks; null = ``batch_size x
            grad_accum x world size``. Set, it fixes the global batch (and so the meaning of
            the learning rates) whatever the number of GPUs or nodes: ``grad_accum`` is then
            derived at start (``resolve_grad_accum``) and must divide exactly.
        lr: peak learning rate of the TTT parameters and of anything without its own rate.
        ttt_lr / lora_lr: peak learning rates of the TTT parameters / LoRA; null = ``lr``.
        max_norm: gradient clipping (global norm over all trainable parameters); 0 = off.
        first_codebook_weight: loss multiplier of the semantic codebook (moshi-finetune's
            ``first_codebook_weight_multiplier``). Default 100, the value of moshi-finetune's
            example and of the Moshi paper; it makes codebook 0 ~93 % of the audio loss, so the
            unweighted per-codebook losses are logged beside it.
        text_padding_weight: loss weight of text targets PAD (3) and EPAD (0).
        log_every / eval_every / ckpt_every: in steps; 0 = never (eval needs ``data.eval``;
            a final checkpoint is always written).
        eval_max_batches: cap on batches per evaluation per rank; null = the whole eval set.
        keep_last: checkpoints kept (older ones are deleted).
        max_bad_steps: consecutive non-finite steps (skipped) that stop the run.
        kl_to_base: weight of a KL term ``KL(gate-0 model || model)`` on the frames that the
            step's attention window covers entirely (frame index < the window): there the
            memory knows nothing attention does not, so any change it makes to the
            predictions is harm. Summed over those tokens and divided by the step's total
            loss weight (exact over micro-batches and ranks); 0 = off. Needs TTT layers.
            With ``state_carry: detached`` only the windows that start a file count (in the
            others the carried memory knows earlier windows that the attention does not).
    """

    run_dir: str = option("runs/moshi_ttt", nonempty=True)
    seed: int = option(0, ge=0)
    max_steps: int = option(100, ge=1)
    duration_sec: float = option(10.0, gt=0)
    batch_size: int = option(1, ge=1)
    grad_accum: int = option(1, ge=1)
    global_batch: int | None = option(None, ge=1)
    lr: float = option(1e-4, gt=0)
    ttt_lr: float | None = option(None, gt=0)
    lora_lr: float | None = option(None, gt=0)
    max_norm: float = option(1.0, ge=0)
    first_codebook_weight: float = option(FIRST_CODEBOOK_WEIGHT, ge=0)
    text_padding_weight: float = option(TEXT_PADDING_WEIGHT, ge=0)
    log_every: int = option(1, ge=1)
    eval_every: int = option(0, ge=0)
    eval_max_batches: int | None = option(None, ge=1)
    ckpt_every: int = option(0, ge=0)
    keep_last: int = option(3, ge=1)
    max_bad_steps: int = option(5, ge=1)
    kl_to_base: float = option(0.0, ge=0)
    model: ModelConfig = field(default_factory=ModelConfig)
    ttt: TTTConfig | None = field(default_factory=TTTConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Types and bounds of every key, then the rules of each section (``schema.validate``);
        also run on construction."""
        schema.validate(self)

    def rules(self) -> None:
        """The rules between keys of different sections."""
        if not self.data.train:
            raise ValueError("data.train: expected at least one JSONL index or shards directory")
        if self.eval_every > 0 and not self.data.eval:
            raise ValueError("eval_every: evaluation needs data.eval (an index); got no index")
        m = self.model
        if self.ttt is None and not self.lora.enable and not (m.train_embeddings or m.train_base):
            raise ValueError(
                "ttt: null with lora.enable false and no train_embeddings: nothing to train"
            )
        if self.kl_to_base > 0 and (self.ttt is None or self.ttt.kind == "inplace"):
            raise ValueError(
                "kl_to_base: the KL to the gate-0 model needs gated TTT layers (ttt.kind "
                "linear or mlp)"
            )
        if self.data.state_carry == "detached":
            self._check_state_carry()
        if self.ttt is not None:
            self._check_ttt_update_is_used()

    def check_ttt_layers(self, num_layers: int) -> list[int]:
        """The converted layer indices of ``ttt.layers`` for a base of ``num_layers`` layers;
        an out-of-range or empty spec is a ``ValueError`` naming ``ttt.layers``. The trainer
        checks it from the base's config files (no weights) before the model is built."""
        if self.ttt is None:
            return []
        try:
            return parse_layer_spec(self.ttt.layers, num_layers)
        except ValueError as e:
            raise ValueError(f"ttt.layers: {e}") from None

    def _check_state_carry(self) -> None:
        if self.ttt is None:
            raise ValueError("data.state_carry: detached needs TTT layers (ttt is null)")
        if self.ttt.kind == "inplace":
            raise ValueError(
                "data.state_carry: detached is for kinds linear/mlp; In-Place TTT (kind inplace) "
                "keeps no state across windows in training: use state_carry: none"
            )

    def _check_ttt_update_is_used(self) -> None:
        """Refuse a TTT layer whose fast-weight update can never be used inside a training
        window: the first update lands at the end of the first chunk (In-Place) or mini-batch
        (linear/mlp) and is read from the next one on, so a chunk as long as the window trains
        nothing of the memory (the gradient reaching the TTT parameters is only the base's)."""
        frames = self.frames_per_window
        carried = self.data.state_carry == "detached"
        if self.ttt.kind == "e2e":
            if carried:
                raise ValueError(
                    "data.state_carry: detached carries TTT states across the windows of a "
                    "file, but the end-to-end memory starts over with every training window; "
                    "use data.state_carry: none")  # fmt: skip
            if self.ttt.e2e_chunk is None:
                return  # C/8 of the model's context: checked when the model is built
            key, size = "ttt.e2e_chunk", self.ttt.e2e_chunk
        elif self.ttt.kind == "inplace":
            key, size = "ttt.chunk_size", self.ttt.chunk_size
        else:
            key, size = "ttt.mini_batch_size", self.ttt.mini_batch_size
        if size >= frames and not carried:
            raise ValueError(
                f"{key}: {size} frames >= the training window of {frames} frames "
                f"(duration_sec {self.duration_sec:g}): the fast weights are updated at the end "
                f"of a {'chunk' if key.endswith('chunk_size') else 'mini-batch'} and read from "
                f"the next one, so the update is never used within a window and the memory "
                f"gets no training signal; use {key} <= {frames // 2} (several updates per "
                f"window) or a longer duration_sec"
            )

    def resolve_grad_accum(self, world_size: int) -> None:
        """With ``global_batch`` set: set ``grad_accum`` so that ``batch_size x grad_accum x
        world_size == global_batch``; a ``ValueError`` naming the numbers when it cannot."""
        if self.global_batch is None:
            return
        per_step = self.batch_size * world_size
        if self.global_batch % per_step:
            raise ValueError(
                f"global_batch: {self.global_batch} windows per step is not a multiple of "
                f"batch_size {self.batch_size} x {world_size} process(es) = {per_step}: change "
                "global_batch or batch_size (grad_accum is derived from them)"
            )
        accum = self.global_batch // per_step
        if self.grad_accum not in (1, accum):
            raise ValueError(
                f"grad_accum: {self.grad_accum} with global_batch {self.global_batch} and "
                f"{per_step} windows per micro-batch step (needs grad_accum {accum}): leave "
                "grad_accum at 1 when global_batch is set"
            )
        self.grad_accum = accum

    # -- derived values ---------------------------------------------------------------------
    @property
    def frames_per_window(self) -> int:
        """Frames per window: ``ceil(12.5 * duration_sec)`` (as moshi-finetune); with
        ``state_carry: detached``, rounded up to a multiple of ``ttt.mini_batch_size`` so that
        every window ends on a TTT mini-batch boundary (the carried state is then committed)."""
        frames = frames_for_duration(self.duration_sec)
        if self.data.state_carry == "detached" and self.ttt is not None:
            n = self.ttt.mini_batch_size
            frames = -(-frames // n) * n
        return frames

    @property
    def spec(self) -> ModelSpec:
        """The model this config trains (``seed``, ``model``, ``ttt``, ``lora``), shared with
        the config rather than copied."""
        return ModelSpec(seed=self.seed, model=self.model, ttt=self.ttt, lora=self.lora)

    @property
    def warmup_steps(self) -> int:
        return round(self.optim.pct_start * self.max_steps)

    @property
    def effective_ttt_lr(self) -> float:
        return self.lr if self.ttt_lr is None else self.ttt_lr

    @property
    def effective_lora_lr(self) -> float:
        return self.lr if self.lora_lr is None else self.lora_lr

    # -- (de)serialisation ------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> TrainConfig:
        """Build and validate from a mapping (an unknown key names the closest valid one)."""
        return schema.build(cls, data if data is not None else {}, aliases=ALIASES)

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
        """Read a YAML file, apply ``--set key=value`` overrides, build and validate."""
        return cls.from_dict(apply_overrides(read_yaml(path), overrides))

    def to_dict(self) -> dict[str, Any]:
        """The resolved config, plain types only (``from_dict(to_dict())`` gives it back)."""
        return schema.to_dict(self)

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def apply_overrides(
    data: dict[str, Any] | None, overrides: list[str] | tuple[str, ...]
) -> dict[str, Any]:
    """A copy of ``data`` with ``--set`` overrides (``"optim.weight_decay=0"``, ``"ttt=null"``).

    Values are parsed with ``yaml.safe_load`` (``lr=1e-4`` is a number, ``data.train=[a, b]``
    a list). Keys are checked when the result is built (``TrainConfig.from_dict``).
    """
    return schema.apply_overrides(data, overrides)
