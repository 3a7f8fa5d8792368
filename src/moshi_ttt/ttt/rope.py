"""Rotary position embedding on Q/K, with positions relative to the TTT mini-batch."""

from __future__ import annotations

import math

import torch


def rope_rotation(
    positions: torch.Tensor, head_dim: int, dtype: torch.dtype, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` of the angles ``positions * theta^(-2j/d)`` (computed in float64):
    positions ``[B, T]`` (integers) -> two ``[B, T, 1, d/2]`` tensors in ``dtype``."""
    d = head_dim
    freqs = theta ** (-torch.arange(0, d, 2, device=positions.device, dtype=torch.float64) / d)
    angles = (positions.to(torch.float64).unsqueeze(-1) * freqs).unsqueeze(2)  # [B, T, 1, d/2]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rope_time_major(x: torch.Tensor, rotation: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate pairs ``(x[..., 2i], x[..., 2i+1])`` of x ``[B, T, G, d]`` (time before heads)
    by ``rotation`` (from ``rope_rotation``). Eager: one complex multiply; compiled: the same
    in real arithmetic (fused by the compiler). Contiguous output."""
    cos, sin = rotation
    if torch.compiler.is_compiling():
        xr, xi = x[..., 0::2], x[..., 1::2]
        return torch.stack((xr * cos - xi * sin, xr * sin + xi * cos), dim=-1).flatten(-2)
    return torch.view_as_real(_complex_pairs(x) * torch.complex(cos, sin)).flatten(-2)


def _complex_pairs(x: torch.Tensor) -> torch.Tensor:
    """x ``[..., d]`` as complex ``[..., d/2]`` (a view; a copy first if its strides forbid)."""
    if x.stride(-1) != 1 or any(s % 2 for s in x.stride()[:-1]) or x.storage_offset() % 2:
        x = x.contiguous()
    return torch.view_as_complex(x.unflatten(-1, (-1, 2)))


def mini_batch_rotation(
    mini_batch_size: int, head_dim: int, dtype: torch.dtype, device=None, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` of the positions 0..n-1 inside a mini-batch, each ``[n, d/2]``.

    Compiled, the table is computed in Python (float64 ``math``) so that it enters the graph as
    a constant: built from torch ops, inductor recomputes the float64 pow/cos/sin for every
    element of the buffer it feeds (5x slower forward at T = 512)."""
    n, half = mini_batch_size, head_dim // 2
    if torch.compiler.is_compiling():
        angles = [r * theta ** (-2 * j / head_dim) for r in range(n) for j in range(half)]
        table = [[math.cos(a) for a in angles], [math.sin(a) for a in angles]]
        cos, sin = torch.tensor(table, dtype=dtype, device=device).view(2, n, half)
        return cos, sin
    pos = torch.arange(n, device=device).view(1, -1)
    cos, sin = rope_rotation(pos, head_dim, dtype, theta)
    return cos.view(n, half), sin.view(n, half)


def rope_into(
    dst: torch.Tensor, x: torch.Tensor, rotation: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """``dst = x`` with pairs ``(x[..., 2i], x[..., 2i+1])`` rotated by ``rotation = (cos, sin)``
    (broadcastable to ``[..., d/2]``), written into the real view dst ``[..., d]`` (even strides,
    unit last stride): one complex multiply, without a temporary when no gradient is needed.
    Compiled: real arithmetic (inductor has no complex kernels)."""
    cos, sin = rotation
    if torch.compiler.is_compiling():
        xr, xi = x[..., 0::2], x[..., 1::2]
        dst[..., 0::2].copy_(xr * cos - xi * sin)
        dst[..., 1::2].copy_(xr * sin + xi * cos)
        return
    xc, out = _complex_pairs(x), torch.view_as_complex(dst.unflatten(-1, (-1, 2)))
    if torch.is_grad_enabled() and (x.requires_grad or dst.requires_grad):
        out.copy_(xc * torch.complex(cos, sin))  # out= does not record autograd
    else:
        torch.mul(xc, torch.complex(cos, sin), out=out)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotate pairs ``(x[..., 2i], x[..., 2i+1])`` by ``positions * theta^(-2i/d)``.

    x ``[B, H, T, d]`` (d even); positions ``[B, T]`` (integers, any dtype). Same dtype out.
    """
    rot = rope_rotation(positions, x.shape[-1], x.dtype, theta)
    return rope_time_major(x.transpose(1, 2), rot).transpose(1, 2)
