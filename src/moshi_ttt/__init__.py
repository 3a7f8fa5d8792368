"""moshi-ttt: Test-Time-Training layers for Kyutai's Moshi.

Layout: ``moshi_ttt.ttt`` is the TTT math in plain torch; ``moshi_ttt.layer`` wraps it as a
streaming module (``TTTLayer``); the Moshi integration, training and evaluation build on those.
"""

from .layer import InnerLossProbe, TTTLayer, TTTState, record_inner_loss
from .ttt import FastState, InnerLoss

__version__ = "0.1.0"
__all__ = ["FastState", "InnerLoss", "InnerLossProbe", "TTTLayer", "TTTState", "record_inner_loss"]
