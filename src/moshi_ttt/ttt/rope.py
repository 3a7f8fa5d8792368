"""Rotary position embedding on Q/K, with positions relative to the TTT mini-batch."""

from __future__ import annotations

import torch


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotate pairs ``(x[..., 2i], x[..., 2i+1])`` by ``positions * theta^(-2i/d)``.

    x ``[B, H, T, d]`` (d even); positions ``[B, T]`` (integers, any dtype). Same dtype out.
    """
    d = x.shape[-1]
    freqs = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float64) / d)
    angles = (positions.to(torch.float64).unsqueeze(-1) * freqs).unsqueeze(1)  # [B, 1, T, d/2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    xr, xi = x[..., 0::2], x[..., 1::2]
    return torch.stack((xr * cos - xi * sin, xr * sin + xi * cos), dim=-1).flatten(-2)
