"""Moshi integration: TTT hybrid layers and In-Place TTT inside Moshi's temporal transformer."""

from .apply import (
    apply_ttt,
    named_ttt_parameters,
    reset_ttt_parameters,
    set_gates,
    ttt_modules,
    ttt_parameters,
)
from .config import TTTConfig, parse_layer_spec
from .hybrid import GatedTTT, TTTHybridLayer
from .inplace import InPlaceFast, InPlaceHybridLayer, InPlaceTTT, chunked_causal_conv
from .tiny import build_tiny_lm, tiny_lm_kwargs

__all__ = [
    "GatedTTT",
    "InPlaceFast",
    "InPlaceHybridLayer",
    "InPlaceTTT",
    "TTTConfig",
    "TTTHybridLayer",
    "apply_ttt",
    "build_tiny_lm",
    "chunked_causal_conv",
    "named_ttt_parameters",
    "parse_layer_spec",
    "reset_ttt_parameters",
    "set_gates",
    "tiny_lm_kwargs",
    "ttt_modules",
    "ttt_parameters",
]
