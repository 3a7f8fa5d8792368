"""``TTTConfig``: which layers of Moshi's temporal transformer get TTT, and how.

Layer specs (``parse_layer_spec``), for a transformer of L layers (indices 0 .. L-1):

- ``"all"``: every layer;
- ``"middle"``: the single layer ``L // 2`` (16 of Moshi's 32);
- ``"upper"``: the last half, layers ``L // 2 .. L - 1`` (16-31 of Moshi's 32; the retrofit's);
- ``"quarter"``: the last quarter, ``max(1, L // 4)`` layers (24-31 of Moshi's 32; the
  end-to-end memory's default, as in TTT-E2E);
- ``"top:N"`` / ``"bottom:N"``: the last / first N layers;
- ``"every:K"``: layers 0, K, 2K, ... (the In-Place TTT paper's pattern);
- explicit lists ``[3, 5]`` and strings of indices and inclusive ranges ``"10,20,29-31"``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from .. import schema
from ..schema import option

KINDS = ("linear", "mlp", "inplace", "e2e")
PLACEMENTS = ("before_attention", "after_attention", "after_ffn")
INPLACE_TARGETS = ("ffn_input", "embeddings")
OUTPUT_INITS = ("normal", "zero")
OUTPUT_SCALES = ("fixed", "residual_rms")
INPUTS = ("residual", "embeddings")
_NAMED_SPECS = ("all", "middle", "upper", "quarter", "top:N", "bottom:N", "every:K",
                "'3,5,10-12'", "[3, 5]")  # fmt: skip


@dataclass
class TTTConfig:
    """How to put TTT into Moshi (``apply_ttt``). Frames are 80 ms.

    Attributes:
        layers: layer spec of the temporal transformer's layers to convert (module docstring).
            Default ``"0"``: the first layer (with ``placement="before_attention"`` the branch
            reads the token embeddings; docs/retrofit.md).
        kind: ``"linear"`` / ``"mlp"`` (a gated TTT branch, ``moshi_ttt.TTTLayer``),
            ``"inplace"`` (In-Place TTT on the FFN's output projection) or ``"e2e"`` (the
            end-to-end memory: a prime MLP after the layer whose fast weights take SGD steps on
            the model's own next-token loss, ``integration.e2e``; its keys start with ``e2e_``;
            use ``layers: quarter``).

    The defaults are a plain TTT-Linear branch before layer 0's attention (the mechanism
    recipe, ``recipes.FORCED_TTT``, with its default mini-batch). The shipped retrofit of a
    frozen, pretrained model is ``recipes.RETROFIT_TTT`` (upper layers, after the attention,
    zero-init output) with ``recipes.RETROFIT_TRAIN`` (docs/retrofit.md).
        mini_batch_size: TTT tokens (frames) per inner update; 16 = 1.28 s.
        base_lr: TTT inner learning-rate scale; None = the layer's default (1.0 linear, 0.1 mlp).
        gate_init: initial value of the per-channel gate parameter alpha (the branch is scaled by
            ``tanh(alpha)``). Default 1.0: an open gate, so the branch is trained from step 1
            (at 0 it sits on the zero-gate saddle and, in the retrofit study, ends up hurting);
            0.0 makes the converted model start *exactly* as the base model, and so does
            ``output_init="zero"`` with any gate.
        num_heads: TTT heads; None = the transformer's number of attention heads.
        checkpoint_group_size: TTT mini-batches per activation-checkpointing group (0 = off).
        placement: where the gated branch goes in the layer: ``"before_attention"`` (default:
            the frozen attention and FFN read what the memory writes), ``"after_attention"`` (the
            video-TTT recipe: after self-attention, before the FFN) or ``"after_ffn"``.
        chunk_size: In-Place TTT chunk, in frames (256 = 20.5 s): the fast weight is updated
            once per chunk and used from the next chunk on.
        inplace_lr: In-Place TTT step size eta in ``dW = eta (conv(X) W_target)^T Z``
            (the official code's default, 0.3).
        inplace_target: In-Place TTT X: ``"ffn_input"`` (the normalised FFN input, for fine-tuning
            a trained model) or ``"embeddings"`` (the temporal transformer's input embeddings).
        inplace_conv_kernel: kernel size of the causal depthwise conv computing the target.
        output_init: initialisation of the TTT branch's output projection ``o_proj``:
            ``"normal"`` (N(0, 0.02), the reference code) or ``"zero"`` (the branch adds exactly
            0 at the start whatever the gate, yet ``o_proj`` gets a gradient from step 1: the
            ControlNet recipe, no gate saddle).
        output_scale: ``"fixed"`` (the branch adds ``tanh(alpha) * TTT(norm(x))``) or
            ``"residual_rms"`` (it adds ``tanh(alpha) * rms(x) * TTT(norm(x))``, rms over the
            channels of each frame): the branch then acts *relative* to the residual stream it
            joins, whose scale grows with depth in a trained model (docs/retrofit.md).
        input: what a gated TTT branch reads: ``"residual"`` (the layer's residual stream at
            ``placement``) or ``"embeddings"`` (the temporal transformer's input, the summed
            token embeddings: clean token identities at any depth); it always writes into the
            residual stream at ``placement``.
        e2e_chunk: end-to-end memory: K, the frames scored between two updates (None: C/8 of
            the model's attention context C; at most the training window).
        e2e_lr: the inner SGD learning rate (> 0; each layer's is a parameter, meta-trainable).
        e2e_hidden: the prime MLP's hidden width (None: the model width).
        e2e_steps: inner SGD steps per chunk.
        e2e_clip: bound on each sequence's inner gradient norm (0: none).
        e2e_decay: pull toward the initial fast weights per step, in [0, 1) (Krause's rule).
        e2e_second_order: meta-training backpropagates through the inner gradients (True) or
            treats them as constants (False: first order, cheaper).
        e2e_post_norm: an RMSNorm on the prime MLP's output (off by default: with it, any
            non-zero update adds a full-norm vector, whatever the learning rate).
        recall_keys: the associative recall memory (``integration.recall``) beside the TTT
            layers: its key units Dk (0: none). Its text distribution is mixed into the
            model's while streaming; training is unchanged. ``recall_active`` key units on,
            ``recall_beta`` the delta rule's strength, ``recall_sharpen`` / ``recall_scale``
            its read, ``recall_context`` inputs in each key, ``recall_lam`` the mixing weight,
            ``recall_seed`` its projection, ``recall_gate`` a learned gate's 6 numbers in place
            of ``recall_lam`` (docs/retrofit.md, "Recall").
    """

    layers: str | list[int] = "0"
    kind: Literal[KINDS] = "linear"
    mini_batch_size: int = option(16, ge=1)
    base_lr: float | None = option(None, gt=0)
    gate_init: float = 1.0
    num_heads: int | None = option(None, ge=1)
    checkpoint_group_size: int = option(4, ge=0)
    placement: Literal[PLACEMENTS] = "before_attention"
    chunk_size: int = option(256, ge=1)
    inplace_lr: float = option(0.3, gt=0)
    inplace_target: Literal[INPLACE_TARGETS] = "ffn_input"
    inplace_conv_kernel: int = option(5, ge=1)
    output_init: Literal[OUTPUT_INITS] = "normal"
    output_scale: Literal[OUTPUT_SCALES] = "fixed"
    input: Literal[INPUTS] = "residual"
    e2e_chunk: int | None = option(None, ge=1)
    e2e_lr: float = option(0.1, gt=0)
    e2e_hidden: int | None = option(None, ge=1)
    e2e_steps: int = option(1, ge=1)
    e2e_clip: float = option(0.0, ge=0)
    e2e_decay: float = option(0.0, ge=0, lt=1)
    e2e_second_order: bool = False
    e2e_post_norm: bool = False
    recall_keys: int = option(0, ge=0)
    recall_active: int = option(64, ge=1)
    recall_beta: float = option(1.0, gt=0, le=1)
    recall_sharpen: float = option(2.0, gt=0)
    recall_scale: float = option(1.0, gt=0)
    recall_context: int = option(4, ge=0)
    recall_lam: float = option(0.7, ge=0, le=1)
    recall_seed: int = 0
    recall_gate: list[float] | None = None

    def __post_init__(self) -> None:
        self.validate()

    # -- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field with a wrong type or impossible value
        (``moshi_ttt.schema``; a field set after construction is checked again here)."""
        schema.validate(self, "TTTConfig.")

    def rules(self) -> None:
        """Beyond the types: the layer spec's syntax (its range needs the model)."""
        if isinstance(self.layers, str):
            _check_spec_syntax(self.layers)
        if self.recall_keys and self.recall_active > self.recall_keys:
            raise ValueError(f"recall_active: {self.recall_active} key units on of recall_keys "
                             f"{self.recall_keys}; use at most recall_keys")  # fmt: skip

    # -- (de)serialisation ------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TTTConfig:
        """Build from a mapping; an unknown key is a ``ValueError`` naming the closest field."""
        return schema.build(cls, data)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (YAML/JSON safe)."""
        out = {name: getattr(self, name) for name in self.field_names()}
        if isinstance(out["layers"], list):
            out["layers"] = [int(i) for i in out["layers"]]
        return out

    @classmethod
    def from_yaml(cls, path: str | Path) -> TTTConfig:
        """Read a YAML file whose top level is the config mapping (an empty file = defaults)."""
        data = yaml.safe_load(Path(path).read_text())
        return cls.from_dict(data if data is not None else {})

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# -- layer specs ----------------------------------------------------------------------------
_PREFIX_SPEC = re.compile(r"^(top|bottom|every):(\d+)$")
_LIST_SPEC = re.compile(r"^\s*\d+(\s*-\s*\d+)?(\s*,\s*\d+(\s*-\s*\d+)?)*\s*$")


def _check_spec_syntax(spec: str) -> None:
    s = spec.strip().lower()
    if s in ("all", "middle", "upper", "quarter") or _PREFIX_SPEC.match(s) or _LIST_SPEC.match(s):
        return
    raise ValueError(f"layers: bad layer spec {spec!r}; expected one of {_NAMED_SPECS}")


def parse_layer_spec(spec: str | list[int] | tuple[int, ...], num_layers: int) -> list[int]:
    """Sorted, de-duplicated layer indices of a spec for a transformer of ``num_layers`` layers.

    A spec that names no layer or an index out of range is a ``ValueError`` stating the count.
    """
    where = f"the model has {num_layers} layers (indices 0..{num_layers - 1})"
    if isinstance(spec, (list, tuple)):
        if not all(_is_int(i) for i in spec):
            raise ValueError(f"layer spec {spec!r}: expected a list of ints; {where}")
        indices = [int(i) for i in spec]
    elif isinstance(spec, str):
        _check_spec_syntax(spec)
        s = spec.strip().lower()
        m = _PREFIX_SPEC.match(s)
        if s == "all":
            indices = list(range(num_layers))
        elif s == "middle":
            indices = [num_layers // 2] if num_layers > 0 else []
        elif s == "upper":
            indices = list(range(num_layers // 2, num_layers))
        elif s == "quarter":
            indices = list(range(num_layers - max(1, num_layers // 4), num_layers))
        elif m:
            kind, n = m.group(1), int(m.group(2))
            if n < 1 or (kind != "every" and n > num_layers):
                raise ValueError(f"layer spec {spec!r}: N must be in 1..{num_layers}; {where}")
            if kind == "top":
                indices = list(range(num_layers - n, num_layers))
            elif kind == "bottom":
                indices = list(range(n))
            else:
                indices = list(range(0, num_layers, n))
        else:
            indices = []
            for part in s.split(","):
                lo, _, hi = part.partition("-")
                lo_i, hi_i = int(lo), int(hi) if hi.strip() else int(lo)
                if hi_i < lo_i:
                    raise ValueError(f"layer spec {spec!r}: empty range {part.strip()!r}; {where}")
                indices += range(lo_i, hi_i + 1)
    else:
        raise ValueError(f"layer spec must be a string or a list of ints, got {spec!r}; {where}")
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"layer spec {spec!r}: indices {bad} out of range; {where}")
    if not indices:
        raise ValueError(f"layer spec {spec!r} names no layer; {where}")
    return sorted(set(indices))


# -- small validators -----------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
