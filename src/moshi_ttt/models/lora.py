"""LoRA on the *base* linear layers of a Moshi LM (moshi's ``LoRALinear``).

moshi's own ``replace_all_linear_with_lora`` would also wrap the TTT branches' linears, which
then break; ``apply_lora`` skips them, so it works before or after ``apply_ttt``.
"""

from __future__ import annotations

from typing import Any

import torch
from moshi.modules.lora import LoRALinear
from torch import nn

from ..integration.apply import TTT_MODULE_TYPES


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """``(qualified name, module)`` of every moshi ``LoRALinear`` in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_settings(model: nn.Module) -> dict[str, Any] | None:
    """``{"rank", "scaling"}`` of the model's LoRA adapters, None without LoRA."""
    modules = lora_modules(model)
    if not modules:
        return None
    settings = {(m.rank, float(m.scaling)) for _, m in modules}
    if len(settings) > 1:
        raise ValueError(f"LoRA modules with different (rank, scaling): {sorted(settings)}")
    rank, scaling = settings.pop()
    return {"rank": int(rank), "scaling": scaling}


@torch.no_grad()
def apply_lora(
    model: nn.Module, rank: int, scaling: float = 2.0, device: torch.device | None = None
) -> int:
    """Wrap every base ``nn.Linear`` in a moshi ``LoRALinear`` (y = W x + scaling * B A x).

    The TTT branches (``GatedTTT``, ``InPlaceTTT``) are skipped, so this works before or after
    ``apply_ttt``. Init as moshi-finetune: A Kaiming-uniform, B zero (the model is unchanged).
    ``device``: of the new A and B (default: the wrapped weight's; a base on the meta device
    with ``device`` the CPU gets the values a CPU build would). Returns the number of wrapped
    linears.
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive int, got {rank!r}")
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters")

    def visit(module: nn.Module) -> int:
        count = 0
        for name, child in list(module.named_children()):
            if isinstance(child, TTT_MODULE_TYPES):
                continue
            if type(child) is nn.Linear:
                w = child.weight
                lora = LoRALinear(child.in_features, child.out_features, rank, float(scaling),
                                  device=device or w.device, dtype=w.dtype)  # fmt: skip
                nn.init.zeros_(lora.lora_B.weight)
                lora.frozen_W = child
                setattr(module, name, lora)
                count += 1
            else:
                count += visit(child)
        return count

    return visit(model)


def base_key(name: str) -> str:
    """The base checkpoint's key of a state-dict entry of a model with LoRA: a wrapped linear's
    ``x.frozen_W.weight`` is the base's ``x.weight`` (what moshi's ``LoRALinear`` load hook
    maps); other names are unchanged."""
    return name.replace(".frozen_W.", ".")
