"""``apply_ttt``: convert layers of Moshi's temporal transformer into TTT hybrid layers.

The depformer is never touched. New parameters are found by module type (``ttt_modules``),
never by parameter-name substrings.
"""

from __future__ import annotations

from typing import Any

import torch
from moshi.models.lm import LMModel
from moshi.modules.streaming import StreamingModule
from torch import nn

from .config import TTTConfig, parse_layer_spec
from .e2e import E2ELayer, PrimeMLP, chunk_frames
from .hybrid import AdoptingLayer, GatedTTT, PassthroughLayer, TTTHybridLayer
from .inplace import InPlaceHybridLayer, InPlaceTTT
from .recall import RecallSetting, apply_recall

TTT_MODULE_TYPES = (GatedTTT, InPlaceTTT, PrimeMLP)


def apply_ttt(
    lm_model: LMModel, config: TTTConfig | dict[str, Any], device: torch.device | None = None
) -> list[int]:
    """Convert the layers of ``lm_model.transformer`` named by ``config.layers`` in place.

    Returns the converted layer indices. Base parameter names and values are unchanged; the new
    parameters live under ``transformer.layers.<i>.ttt.`` and are created in the model's dtype
    on ``device`` (default: the model's; on the meta device they stay uninitialised: use
    ``reset_ttt_parameters`` after ``to_empty``). A base on the meta device with ``device`` the
    CPU gives the new parameters the values a CPU build would (same seeded draws). Sets
    ``lm_model.ttt_config`` and ``lm_model.ttt_layers``.
    """
    if isinstance(config, dict):
        config = TTTConfig.from_dict(config)
    elif not isinstance(config, TTTConfig):
        raise ValueError(f"apply_ttt expected a TTTConfig or a dict, got {type(config).__name__}")
    config.validate()
    transformer = lm_model.transformer
    if any(isinstance(layer, AdoptingLayer) for layer in transformer.layers):
        raise ValueError("this model already has TTT layers (apply_ttt was called before)")
    if any(isinstance(m, StreamingModule) and m.is_streaming for m in lm_model.modules()):
        raise ValueError("apply_ttt cannot convert a model while it is streaming")
    indices = parse_layer_spec(config.layers, len(transformer.layers))
    if config.kind == "e2e":  # a chunk longer than the window is refused now, naming the key
        chunk_frames(config.e2e_chunk, transformer.layers[0].self_attn.context)

    embeddings = (config.kind == "inplace" and config.inplace_target == "embeddings") or (
        config.kind != "inplace" and config.input == "embeddings"
    )
    for i, layer in enumerate(transformer.layers):
        if i in indices:
            transformer.layers[i] = convert_layer(layer, config, device)
        elif embeddings:  # every layer must accept the ``ttt_embeddings`` keyword
            transformer.layers[i] = PassthroughLayer.from_layer(layer)
    if embeddings:
        transformer.register_forward_pre_hook(_pass_embeddings, with_kwargs=True)
    for module in lm_model.modules():  # moshi caches the streaming children on first use
        if isinstance(module, StreamingModule):
            module._cached_children = None
    lm_model.ttt_config = config
    lm_model.ttt_layers = list(indices)
    if config.recall_keys:
        apply_recall(lm_model, recall_setting(config))
    return indices


def recall_setting(config: TTTConfig) -> RecallSetting:
    """The recall memory of a config's ``recall_*`` keys."""
    return RecallSetting(keys=config.recall_keys, active=config.recall_active,
                         beta=config.recall_beta, sharpen=config.recall_sharpen,
                         scale=config.recall_scale, context=config.recall_context,
                         lam=config.recall_lam, seed=config.recall_seed,
                         gate=tuple(config.recall_gate or ()))  # fmt: skip


def convert_layer(
    layer: nn.Module, config: TTTConfig, device: torch.device | None = None
) -> AdoptingLayer:
    """One hybrid layer built from a moshi ``StreamingTransformerLayer``, its new parameters
    on ``device`` (default: the layer's)."""
    if config.kind == "e2e":
        return E2ELayer.from_layer(layer, hidden=config.e2e_hidden, lr=config.e2e_lr,
                                   post_norm=config.e2e_post_norm, device=device)  # fmt: skip
    if config.kind == "inplace":
        return InPlaceHybridLayer.from_layer(
            layer,
            chunk_size=config.chunk_size,
            lr=config.inplace_lr,
            conv_kernel=config.inplace_conv_kernel,
            target=config.inplace_target,
            device=device,
        )
    return TTTHybridLayer.from_layer(
        layer,
        kind=config.kind,
        num_heads=config.num_heads,
        mini_batch_size=config.mini_batch_size,
        base_lr=config.base_lr,
        gate_init=config.gate_init,
        checkpoint_group_size=config.checkpoint_group_size,
        placement=config.placement,
        output_init=config.output_init,
        output_scale=config.output_scale,
        input=config.input,
        device=device,
    )


def _pass_embeddings(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook on the transformer: hand its input (the token embeddings) to every
    layer as ``ttt_embeddings`` (kept by activation checkpointing for the recomputation)."""
    return args, {**kwargs, "ttt_embeddings": args[0]}


def ttt_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every TTT branch (``GatedTTT``, ``InPlaceTTT``)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TTT_MODULE_TYPES)]


def named_ttt_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(qualified name, parameter)`` of the parameters added by ``apply_ttt``."""
    return [
        (f"{name}.{pname}", p)
        for name, module in ttt_modules(model)
        for pname, p in module.named_parameters()
    ]


def ttt_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters added by ``apply_ttt`` (gates, norms, TTT and In-Place weights)."""
    return [p for _, p in named_ttt_parameters(model)]


def set_gates(model: nn.Module, value: float | None) -> int:
    """Force every TTT branch's gate to ``value`` (None: back to the learned gates).

    For gated branches ``value`` replaces ``tanh(alpha)``; for In-Place layers it scales the
    fast-weight correction (0 gives the base model, 1 the learned model). Parameters are not
    written. Returns the number of branches changed.
    """
    if value is not None:
        value = float(value)
    modules = ttt_modules(model)
    for _, module in modules:
        module.gate_override = value
    return len(modules)


@torch.no_grad()
def reset_ttt_parameters(model: nn.Module) -> None:
    """(Re)initialise every parameter added by ``apply_ttt`` (e.g. after ``to_empty``)."""
    for _, module in ttt_modules(model):
        module.reset_parameters()
