"""The TTT math, in plain torch (no Moshi import): inner model, and three forms of one scan.

- ``naive.ttt_naive``: the definition, a per-token loop with autograd (reference, tests only);
- ``dual.ttt_dual``: the mini-batch dual form, scanned, with group checkpointing (training, eval);
- ``primal.ttt_primal_step``: one token in primal form (streaming); ``ttt_primal_step_``: the
  same, advancing the state in place (no autograd).
All three take the same arguments and return ``(z, FastState, InnerLoss | None)``.
"""

from .dual import ttt_dual
from .inner import KINDS, FastState, InnerLoss, weight_shapes
from .naive import ttt_naive
from .primal import ttt_primal_step, ttt_primal_step_
from .rope import apply_rope

__all__ = [
    "KINDS",
    "FastState",
    "InnerLoss",
    "apply_rope",
    "ttt_dual",
    "ttt_naive",
    "ttt_primal_step",
    "ttt_primal_step_",
    "weight_shapes",
]
