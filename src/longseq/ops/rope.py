"""Rotary position embedding (RoPE) math shared by the modules, the fused decode kernels' references and
MEGABYTE's RoPE-folded weights: the "rotate half" convention (as Llama in HF transformers), channel
pairs ``(i, i + D/2)`` rotated by ``position * theta^(-2i/D)``."""

from __future__ import annotations

import torch
from torch import Tensor


def rope_frequencies(head_dim: int, theta: float, device: torch.device | str | None, dtype: torch.dtype) -> Tensor:
    """``theta^(-2i/D)`` ``[D/2]``, made in float64 and cast to ``dtype`` (bf16 frequencies would be useless
    beyond a few hundred positions, so callers pass at least fp32)."""
    exponent = torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim
    return (theta**-exponent).to(dtype)


def rotate_half(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate ``x`` ``[..., D]`` by ``angles`` (broadcastable to ``[..., D/2]``, already in the compute
    dtype): ``[x1 cos - x2 sin, x2 cos + x1 sin]`` in at least fp32, cast back to ``x``'s dtype."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.to(dtype).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
