"""Rotary position embedding on Q/K, with positions relative to the TTT mini-batch."""

from __future__ import annotations

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
    if x.stride(-1) != 1 or any(s % 2 for s in x.stride()[:-1]) or x.storage_offset() % 2:
        x = x.contiguous()
    xc = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * torch.complex(cos, sin)).flatten(-2)


def mini_batch_rotation(
    mini_batch_size: int, head_dim: int, dtype: torch.dtype, device=None, theta: float = 10000.0
) -> torch.Tensor:
    """The rotations of the positions 0..n-1 inside a mini-batch as complex numbers
    ``[n, d/2]`` (complex ``dtype``: float32 -> complex64)."""
    pos = torch.arange(mini_batch_size, device=device).view(1, -1)
    cos, sin = rope_rotation(pos, head_dim, dtype, theta)
    return torch.complex(cos, sin).view(mini_batch_size, head_dim // 2)


def rope_into(dst: torch.Tensor, x: torch.Tensor, rotation: torch.Tensor) -> None:
    """``dst = x`` rotated pairwise by ``rotation`` (complex, broadcastable to ``[..., d/2]``),
    written into the real view dst ``[..., d]`` (even strides, unit last stride) without a
    temporary when no gradient is needed. Compiled: real arithmetic (no complex kernels)."""
    if torch.compiler.is_compiling():
        xr, xi, c, s = x[..., 0::2], x[..., 1::2], rotation.real, rotation.imag
        dst[..., 0::2].copy_(xr * c - xi * s)
        dst[..., 1::2].copy_(xr * s + xi * c)
        return
    if x.stride(-1) != 1 or any(st % 2 for st in x.stride()[:-1]) or x.storage_offset() % 2:
        x = x.contiguous()
    xc = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
    out = torch.view_as_complex(dst.unflatten(-1, (-1, 2)))
    if torch.is_grad_enabled() and (x.requires_grad or dst.requires_grad):
        out.copy_(xc * rotation)  # out= does not record autograd
    else:
        torch.mul(xc, rotation, out=out)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotate pairs ``(x[..., 2i], x[..., 2i+1])`` by ``positions * theta^(-2i/d)``.

    x ``[B, H, T, d]`` (d even); positions ``[B, T]`` (integers, any dtype). Same dtype out.
    """
    rot = rope_rotation(positions, x.shape[-1], x.dtype, theta)
    return rope_time_major(x.transpose(1, 2), rot).transpose(1, 2)
