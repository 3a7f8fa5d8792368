"""Chunked streaming of Moshi's temporal transformer: helpers shared by evaluation and tests.

In ``with lm.streaming(B):`` every call to ``lm.forward_text`` advances the attention KV caches
and the TTT states by the frames it is given. Calls of T > 1 frames ("chunks") give the same
outputs as T calls of one frame if the KV caches can hold ``context + T - 1`` keys: moshi's
``RingKVCache`` holds exactly ``context``, so a chunk would overwrite keys that its first
queries still need (``widen_kv_caches``; the attention mask still uses ``context``).

    with chunked_streaming(lm, batch_size=1, chunk=250):
        for cols in inputs.split(250, dim=-1):       # inputs [B, 17, T]: delayed columns
            out, text_logits = lm.forward_text(cols)

``delayed_inputs`` gives the columns that ``LMModel.forward`` feeds the temporal transformer;
``reset_ttt_states`` restarts the TTT memory only (attention caches untouched).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from moshi.models.lm import LMModel
from moshi.modules.transformer import RingKVCache, StreamingMultiheadAttention
from torch import nn

from ..layer import TTTLayer, TTTState
from .e2e import E2EState, PrimeMLP
from .inplace import InPlaceTTT
from .recall import RecallMemory, RecallState

# the streaming modules with fast weights (saved, restored and reset with a conversation)
TTT_STATE_TYPES = (TTTLayer, InPlaceTTT, PrimeMLP, RecallMemory)


def widen_kv_caches(model: nn.Module, batch_size: int, chunk: int) -> int:
    """Give every streaming self-attention KV cache of ``model`` ``context + chunk - 1`` slots
    (fresh, empty), so chunks of up to ``chunk`` frames stream exactly like single frames.

    Call right after entering ``model.streaming(batch_size)``, before the first frame. The
    caches keep the device, dtype and exec-mask behaviour of the ones they replace. Returns the
    number of caches replaced (attention without a finite context is left alone).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 frame, got {chunk}")
    count = 0
    for m in model.modules():
        if not isinstance(m, StreamingMultiheadAttention) or m._streaming_state is None:
            continue
        old = m._streaming_state.kv_cache
        if old is None or m.context is None:
            continue
        _, rows, heads, _, head_dim = old.cache.shape
        if rows != batch_size:
            raise ValueError(f"streaming batch size is {rows}, not {batch_size}")
        m._streaming_state.kv_cache = RingKVCache(
            batch_size,
            heads,
            head_dim,
            m.context + chunk - 1,
            respect_exec_mask=old.respect_exec_mask,
            device=old.cache.device,
            dtype=old.cache.dtype,
        )
        count += 1
    return count


@contextmanager
def chunked_streaming(model: nn.Module, batch_size: int, chunk: int) -> Iterator[nn.Module]:
    """``model.streaming(batch_size)`` with KV caches widened for chunks of ``chunk`` frames."""
    with model.streaming(batch_size):
        if chunk > 1:
            widen_kv_caches(model, batch_size, chunk)
        yield model


def ttt_states(model: nn.Module) -> list[tuple[str, TTTState | E2EState | RecallState]]:
    """``(module name, streaming state)`` of every fast-weight memory of ``model`` that is
    streaming (``TTTLayer``, In-Place TTT, the end-to-end memory, the recall memory), read
    through moshi's public
    ``is_streaming`` / ``get_streaming_state``."""
    return [
        (name, m.get_streaming_state()[""])
        for name, m in model.named_modules()
        if isinstance(m, TTT_STATE_TYPES) and m.is_streaming
    ]


def has_live_hooks(model: nn.Module) -> bool:
    """Whether the model's memories run Python hooks at every streamed step (the end-to-end
    memory's live update, the recall memory): CUDA graphs, which replay kernels without them,
    must be off (``moshi.utils.compile.no_cuda_graph``)."""
    if isinstance(getattr(model, "recall", None), RecallMemory):
        return True
    transformer = getattr(model, "transformer", None)
    return transformer is not None and any(isinstance(m, PrimeMLP) for m in transformer.modules())


def reset_ttt_states(model: nn.Module, mask: torch.Tensor | None = None) -> int:
    """Restart the TTT fast weights (``TTTLayer`` and In-Place states) of the sequences in
    ``mask`` (``[B]`` bool; None: all) while streaming; attention caches and positions go on.
    Returns the number of states reset (0 without TTT layers or outside streaming)."""
    count = 0
    for _, state in ttt_states(model):
        rows = state.batch_size
        state.reset(
            torch.ones(rows, dtype=torch.bool, device=state.device)
            if mask is None
            else mask.to(device=state.device, dtype=torch.bool)
        )
        count += 1
    return count


def delay_codes(codes: torch.Tensor, delays: Sequence[int], initial: torch.Tensor) -> torch.Tensor:
    """Row ``k`` of ``codes [B, K, T]`` shifted right by ``delays[k]``, the first ``delays[k]``
    frames filled with ``initial[:, k]`` (``[B, K, 1]``): moshi's delay pattern."""
    T = codes.shape[-1]
    out = codes.clone()
    for k, d in enumerate(delays):
        d = min(int(d), T)
        if d > 0:
            out[:, k, d:] = codes[:, k, : T - d]
            out[:, k, :d] = initial[:, k]
    return out


def delayed_inputs(lm: LMModel, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, delayed)``, both ``[B, 17, T]`` for ``codes [B, 17, T]``.

    ``delayed`` is the codes in moshi's delay pattern (the depformer's tokens and the targets:
    step ``s`` predicts ``delayed[:, :, s]``); ``inputs`` is what the temporal transformer reads
    at step ``s``: the initial tokens at ``s = 0``, else ``delayed[:, :, s - 1]``. Exactly the
    columns of ``LMModel.forward``, so streaming ``inputs`` in chunks reproduces it.
    """
    initial = lm._get_initial_token().to(codes.device).expand(codes.shape[0], -1, -1)
    delayed = delay_codes(codes, lm.delays, initial)
    inputs = torch.cat([initial, delayed[:, :, :-1]], dim=2)
    return inputs, delayed
