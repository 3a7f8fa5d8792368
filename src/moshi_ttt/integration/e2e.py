"""The end-to-end memory inside Moshi: a prime SwiGLU MLP after a layer, with fast weights.

``E2ELayer`` (``TTTConfig(kind="e2e")``) is a moshi layer followed by ``PrimeMLP``::

    x = layer(x)                                   # moshi's layer, unchanged
    x = x + [post_norm](prime_mlp(norm(x); W))     # W: the sequence's fast weights

``W = (w_in [B, dim, 2h], w_out [B, h, dim])`` starts from the module's parameters (``w_out``
is zero, so an untrained memory adds exactly 0: the base model) and is changed only by the
inner SGD steps of ``integration.e2e_scan`` on the model's own next-token loss. Where W comes
from, in order:

1. ``fast=`` segments passed to ``forward`` (the scan: frames of different chunks use the
   weights of their own chunk);
2. the streaming state ``E2EState`` (one W per batch element, reset per element to the
   parameters, never stored in parameters: moshi's streaming API);
3. the parameters themselves (a plain forward: the memory before any update).

``gate_override`` (a float) scales what the memory adds (0: the base model), as for the gated
TTT branches.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from moshi.modules.streaming import State, StreamingModule
from moshi.modules.transformer import StreamingTransformerLayer
from torch import nn

from ..ttt.e2e import prime_mlp
from .hybrid import AdoptingLayer, fresh_norm, reset_norm_

# ``(start, end, (w_in, w_out))``: frames [start, end) of the call use these fast weights.
Segment = tuple[int, int, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class E2EState(State):
    """Streaming state of one ``PrimeMLP``: the fast weights of each batch element.

    ``record``: when True, every call's input (the prime MLP's input, ``[B, T, dim]``) is kept
    in ``inputs`` for the streamed update (``e2e_stream.E2EStreamer`` turns it on and empties it);
    ``on_reset(mask)`` is called on every reset (the streamer forgets those rows' past).
    """

    w_in: torch.Tensor
    w_out: torch.Tensor
    init: tuple[torch.Tensor, torch.Tensor]
    record: bool = False
    inputs: list[torch.Tensor] = field(default_factory=list)
    on_reset: Callable[[torch.Tensor], None] | None = None

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        if self.on_reset is not None:  # the streamer forgets these rows' past
            self.on_reset(reset_mask)
        m = reset_mask.view(-1, 1, 1)
        self.w_in.copy_(torch.where(m, self.init[0][None].to(self.w_in), self.w_in))
        self.w_out.copy_(torch.where(m, self.init[1][None].to(self.w_out), self.w_out))

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.w_in, self.w_out

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The per-row state tensors (saved and restored with a conversation)."""
        return (self.w_in, self.w_out)

    def set_weights(self, w_in: torch.Tensor, w_out: torch.Tensor) -> None:
        self.w_in.copy_(w_in.detach())
        self.w_out.copy_(w_out.detach())


def fast_copy(w: torch.Tensor, batch: int) -> torch.Tensor:
    """``w [1, ...]`` repeated for ``batch`` sequences, detached, in float32 at least (fast
    weights accumulate small updates: bf16 would round them away)."""
    dtype = torch.promote_types(w.dtype, torch.float32)
    return w.detach().to(dtype).expand(batch, *w.shape[1:]).clone()


class PrimeMLP(StreamingModule[E2EState]):
    """``x [B, T, dim] -> x + memory(x)`` (module docstring).

    Args:
        norm: the pre-norm (a copy of the layer's norm, reset to the identity).
        dim: model width.
        hidden: the prime MLP's hidden width.
        lr: the initial inner learning rate (the parameter ``log_lr`` holds its log).
        post_norm: an RMSNorm-like copy of ``norm`` on the output.
    """

    def __init__(self, norm: nn.Module, dim: int, hidden: int, lr: float,
                 post_norm: bool = False) -> None:  # fmt: skip
        super().__init__()
        ref = next(norm.parameters())
        self.norm = norm
        self.post_norm = copy.deepcopy(norm) if post_norm else None
        self.dim, self.hidden, self.lr_init = dim, hidden, float(lr)
        kw = {"device": ref.device, "dtype": ref.dtype}
        self.w_in = nn.Parameter(torch.empty(dim, 2 * hidden, **kw))
        self.w_out = nn.Parameter(torch.empty(hidden, dim, **kw))
        self.log_lr = nn.Parameter(torch.empty(1, **kw))  # 1-D: FSDP2 shards no scalar
        self.gate_override: float | None = None
        if ref.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Identity norms, ``w_in ~ N(0, 1/dim)``, ``w_out = 0``, ``lr`` as configured."""
        reset_norm_(self.norm)
        if self.post_norm is not None:
            reset_norm_(self.post_norm)
        nn.init.normal_(self.w_in, std=self.dim**-0.5)
        nn.init.zeros_(self.w_out)
        self.log_lr.fill_(math.log(self.lr_init))

    def lr(self) -> torch.Tensor:
        """The inner learning rate, a scalar (``exp(log_lr)``: always > 0)."""
        return self.log_lr.exp()[0]

    def initial(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The initial fast weights ``([1, dim, 2h], [1, h, dim])`` (the parameters)."""
        return self.w_in[None], self.w_out[None]

    def _init_streaming_state(self, batch_size: int) -> E2EState:
        w_in, w_out = (fast_copy(w[None], batch_size) for w in (self.w_in, self.w_out))
        return E2EState(batch_size, w_in.device, w_in, w_out,
                        (self.w_in.detach(), self.w_out.detach()))  # fmt: skip

    def forward(self, x: torch.Tensor, fast: list[Segment] | None = None) -> torch.Tensor:
        state = self._streaming_state
        if fast is None:
            ws = state.weights() if state is not None else self.initial()
            fast = [(0, x.shape[1], ws)]
        if state is not None and state.record:
            state.inputs.append(x.detach())
        z = self.norm(x)
        y = torch.cat([prime_mlp(z[:, a:b], wi, wo) for a, b, (wi, wo) in fast], dim=1)
        if y.shape[1] != x.shape[1]:
            raise ValueError(f"fast-weight segments cover {y.shape[1]} frames, the input "
                             f"{x.shape[1]}")  # fmt: skip
        if self.post_norm is not None:
            y = self.post_norm(y)
        if self.gate_override is not None:
            y = y * self.gate_override
        return x + y.to(x.dtype)


class E2ELayer(AdoptingLayer):
    """A moshi layer followed by a ``PrimeMLP`` (``self.e2e``)."""

    e2e: PrimeMLP

    @classmethod
    def from_layer(cls, layer: StreamingTransformerLayer, hidden: int | None = None,
                   lr: float = 0.1, post_norm: bool = False,
                   device: torch.device | None = None) -> E2ELayer:  # fmt: skip
        if layer.skip_self_attn:
            raise ValueError("the end-to-end memory needs a layer with self-attention")
        new = cls.adopt(layer)
        dim = layer.self_attn.embed_dim
        new.e2e = PrimeMLP(fresh_norm(layer.norm2, device), dim, hidden or dim, lr, post_norm)
        return new

    def forward(
        self,
        x: torch.Tensor,
        cross_attention_src: torch.Tensor | None = None,
        ttt_embeddings: torch.Tensor | None = None,
        fast: list[Segment] | None = None,
        prime: bool = True,
        layer: bool = True,
    ) -> torch.Tensor:
        """moshi's layer, then the memory (``prime=False``: the layer alone; ``layer=False``:
        the memory alone, on the layer's output ``x``, as the scan recomputes it; ``fast``: the
        scan's per-frame fast weights). Called through the module (never ``.e2e`` directly),
        so FSDP2 gathers the layer's parameters."""
        if layer:
            x = super().forward(x, cross_attention_src, ttt_embeddings)
        return self.e2e(x, fast=fast) if prime else x


def e2e_layers(model: nn.Module) -> list[tuple[int, E2ELayer]]:
    """``(index, layer)`` of the end-to-end memory layers of an LMModel's temporal transformer
    (empty: the model has none)."""
    transformer = getattr(model, "transformer", None)
    if transformer is None:
        return []
    return [(i, layer) for i, layer in enumerate(transformer.layers) if isinstance(layer, E2ELayer)]


def chunk_frames(config_chunk: int | None, context: int | None) -> int:
    """K, the frames between two updates: ``e2e_chunk``, or C/8 of the attention context C
    (at least 1; 16 without a context). A K longer than C is refused, naming the key."""
    if config_chunk is None:
        return max(1, (context or 128) // 8)
    if context is not None and config_chunk > context:
        raise ValueError(f"e2e_chunk: {config_chunk} frames is longer than the attention "
                         f"context ({context} frames); use at most {context} (default C/8 = "
                         f"{max(1, context // 8)})")  # fmt: skip
    return int(config_chunk)
