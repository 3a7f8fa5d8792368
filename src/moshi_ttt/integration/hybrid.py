"""Hybrid Moshi layers: the original ``StreamingTransformerLayer`` plus a gated TTT branch.

A hybrid layer is a subclass of moshi's ``StreamingTransformerLayer`` that *adopts* the original
layer's submodules under their own attribute names, so every base parameter keeps its name
(``transformer.layers.3.self_attn.in_projs.0.weight`` ...), a base state dict loads with
``strict=True`` on the base keys, and FSDP policies keyed on ``StreamingTransformerLayer``
still match. Everything new lives under ``.ttt``.

``TTTHybridLayer`` (kinds ``"linear"``/``"mlp"``), with ``placement="after_attention"``::

    x = x + self_attn(norm1(x))
    x = x + tanh(alpha) * TTT(norm_ttt(x))      # alpha: per channel [dim]
    x = x + gating(norm2(x))

With ``alpha = 0`` the outputs equal the base layer's bit for bit.
"""

from __future__ import annotations

import copy
from typing import TypeVar

import torch
from moshi.modules.transformer import StreamingTransformerLayer
from torch import nn

from ..layer import TTTLayer

L = TypeVar("L", bound="AdoptingLayer")


class AdoptingLayer(StreamingTransformerLayer):
    """Base of the layers built from an existing moshi layer (``from_layer``), never directly."""

    def __init__(self, *args, **kwargs):  # pragma: no cover - guard only
        raise TypeError(f"build {type(self).__name__} with {type(self).__name__}.from_layer(layer)")

    @classmethod
    def adopt(cls: type[L], layer: StreamingTransformerLayer) -> L:
        """A new ``cls`` instance sharing ``layer``'s submodules, parameters and attributes."""
        if type(layer) is not StreamingTransformerLayer:
            raise ValueError(
                "expected a plain moshi StreamingTransformerLayer (not yet converted), "
                f"got {type(layer).__name__}"
            )
        if layer._streaming_state is not None:
            raise ValueError("cannot convert a layer while it is streaming")
        new = cls.__new__(cls)
        for key, value in layer.__dict__.items():
            # Own copies of the registries (_modules, _parameters, hooks...), shared members.
            new.__dict__[key] = copy.copy(value) if isinstance(value, (dict, set)) else value
        new._cached_children = None
        new._embeddings = None
        return new

    def forward(
        self,
        x: torch.Tensor,
        cross_attention_src: torch.Tensor | None = None,
        ttt_embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """moshi's layer forward; ``ttt_embeddings`` ``[B, T, dim]`` (the transformer's input,
        passed by ``apply_ttt``'s hook when a layer needs it) is kept for the call only."""
        self._embeddings = ttt_embeddings
        try:
            return super().forward(x, cross_attention_src)
        finally:
            self._embeddings = None

    def base_state_dict_keys(self) -> list[str]:
        """The keys of the adopted base layer (everything not under ``ttt.``)."""
        return [k for k in self.state_dict() if not k.startswith("ttt.")]


class PassthroughLayer(AdoptingLayer):
    """A base layer that only accepts (and ignores) ``ttt_embeddings``; same numbers."""

    @classmethod
    def from_layer(cls, layer: StreamingTransformerLayer) -> PassthroughLayer:
        return cls.adopt(layer)


class GatedTTT(nn.Module):
    """``tanh(alpha) * TTT(norm(x))`` (times ``rms(x)`` with ``output_scale="residual_rms"``):
    x ``[B, T, dim]`` -> ``[B, T, dim]`` (x's dtype).

    ``gate_override`` (a float, or None for the learned gates) replaces ``tanh(alpha)``; it is a
    plain attribute, so it never touches parameters (frozen at capture under CUDA graphs).
    """

    def __init__(
        self,
        norm: nn.Module,
        ttt: TTTLayer,
        gate_init: float,
        output_init: str = "normal",
        output_scale: str = "fixed",
    ):
        super().__init__()
        self.norm = norm
        self.layer = ttt
        self.alpha = nn.Parameter(
            torch.full((ttt.dim,), float(gate_init), device=ttt.W1.device, dtype=ttt.W1.dtype)
        )
        self.gate_init = float(gate_init)
        self.output_init = output_init
        self.output_scale = output_scale
        if output_init == "zero":
            nn.init.zeros_(ttt.o_proj.weight)
        self.gate_override: float | None = None
        self.carry = None  # a ``StateCarry`` while training with carried state (carry.py)

    def reset_parameters(self) -> None:
        """Identity norm, fresh TTT weights (``o_proj`` 0 if ``output_init`` is "zero"),
        ``alpha = gate_init``."""
        reset_norm_(self.norm)
        self.layer.reset_parameters()
        if self.output_init == "zero":
            nn.init.zeros_(self.layer.o_proj.weight)
        nn.init.constant_(self.alpha, self.gate_init)

    def gate(self) -> torch.Tensor:
        if self.gate_override is not None:
            return torch.full_like(self.alpha, self.gate_override)
        return torch.tanh(self.alpha)

    def forward(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        """x: the residual stream ``[B, T, dim]`` the branch is added to; ``source``: what the
        TTT layer reads instead of x (``input="embeddings"``), same shape."""
        inp = self.norm(x if source is None else source.to(x.dtype))
        if self.carry is None:
            y = self.layer(inp)
        else:  # training with the fast weights carried from the previous window
            state = self.carry.state_for(self, x.shape[0])
            y, new_state = self.layer(inp, state=state, return_state=True)
            self.carry.store(self, new_state)
        if self.output_scale == "residual_rms":  # relative to the stream it is added to
            y = y * x.float().pow(2).mean(-1, keepdim=True).sqrt().to(y.dtype)
        return self.gate().to(y.dtype) * y


class TTTHybridLayer(AdoptingLayer):
    """A moshi layer plus a gated TTT branch at ``placement`` (see the module docstring)."""

    ttt: GatedTTT

    @classmethod
    def from_layer(
        cls,
        layer: StreamingTransformerLayer,
        kind: str = "mlp",
        num_heads: int | None = None,
        mini_batch_size: int = 16,
        base_lr: float | None = None,
        gate_init: float = 0.0,
        checkpoint_group_size: int = 4,
        placement: str = "after_attention",
        output_init: str = "normal",
        output_scale: str = "fixed",
        input: str = "residual",
        device: torch.device | None = None,
    ) -> TTTHybridLayer:
        if placement not in ("before_attention", "after_attention", "after_ffn"):
            raise ValueError(f"unknown TTT placement {placement!r}")
        if layer.skip_self_attn:
            raise ValueError("TTT hybrid layers need a layer with self-attention")
        new = cls.adopt(layer)
        ref = next(layer.self_attn.parameters())  # the model's device and dtype
        dim = layer.self_attn.embed_dim
        ttt = TTTLayer(
            dim,
            num_heads or layer.self_attn.num_heads,
            kind=kind,
            mini_batch_size=mini_batch_size,
            base_lr=base_lr,
            checkpoint_group_size=checkpoint_group_size,
            device=device or ref.device,
            dtype=ref.dtype,
        )
        norm = fresh_norm(layer.norm2, device)
        new.placement = placement
        new.input = input
        new.ttt = GatedTTT(norm, ttt, gate_init, output_init, output_scale)
        return new

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        if self.input == "embeddings":
            if self._embeddings is None:
                raise RuntimeError("TTT input 'embeddings': the transformer passed no embeddings")
            return x + self.ttt(x, self._embeddings).to(x.dtype)
        return x + self.ttt(x).to(x.dtype)

    def _sa_block(self, x: torch.Tensor) -> torch.Tensor:
        if self.placement == "before_attention":
            x = self._branch(x)
        return super()._sa_block(x)

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        if self.placement == "after_attention":
            x = self._branch(x)
        x = super()._ff_block(x)
        if self.placement == "after_ffn":
            x = self._branch(x)
        return x


def fresh_norm(norm: nn.Module, device: torch.device | None = None) -> nn.Module:
    """A copy of a moshi norm made the identity map (``reset_norm_``), on ``device`` (default:
    the norm's own; a norm on the meta device copied elsewhere gets storage there)."""
    new = copy.deepcopy(norm)
    if device is not None and any(p.device != torch.device(device) for p in new.parameters()):
        new = new.to_empty(device=device)
    reset_norm_(new)
    return new


@torch.no_grad()
def reset_norm_(norm: nn.Module) -> None:
    """Make a moshi norm (RMSNorm: ``alpha``; LayerNorm: ``weight``/``bias``) the identity map."""
    for name, p in norm.named_parameters():
        if name in ("alpha", "weight"):
            p.fill_(1.0)
        elif name == "bias":
            p.zero_()
        else:
            raise ValueError(f"cannot reset norm parameter {name!r} of {type(norm).__name__}")
