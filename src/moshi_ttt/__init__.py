"""moshi-ttt: Test-Time-Training layers for Kyutai's Moshi.

Layout: ``moshi_ttt.ttt`` is the TTT math in plain torch; ``moshi_ttt.layer`` wraps it as a
streaming module (``TTTLayer``); the Moshi integration, training and evaluation build on those.
"""

from .integration import (
    InPlaceHybridLayer,
    InPlaceTTT,
    TTTConfig,
    TTTHybridLayer,
    apply_ttt,
    build_tiny_lm,
    named_ttt_parameters,
    parse_layer_spec,
    reset_ttt_parameters,
    set_gates,
    tiny_lm_kwargs,
    ttt_modules,
    ttt_parameters,
)
from .layer import InnerLossProbe, TTTLayer, TTTState, record_inner_loss
from .ttt import FastState, InnerLoss

__version__ = "0.1.0"
__all__ = [
    "FastState",
    "InPlaceHybridLayer",
    "InPlaceTTT",
    "InnerLoss",
    "InnerLossProbe",
    "TTTConfig",
    "TTTHybridLayer",
    "TTTLayer",
    "TTTState",
    "apply_ttt",
    "build_tiny_lm",
    "named_ttt_parameters",
    "parse_layer_spec",
    "record_inner_loss",
    "reset_ttt_parameters",
    "set_gates",
    "tiny_lm_kwargs",
    "ttt_modules",
    "ttt_parameters",
]
