"""Rotary position embedding (RoPE), "rotate half" convention (as Llama in HF transformers)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    """Rotates query/key channel pairs ``(i, i + D/2)`` by ``position * theta^(-2i/D)``."""

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension; got {head_dim}")
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate ``x`` ``[B, H, T, D]`` by ``positions`` ``[T]`` or ``[B, T]`` (integer token positions)."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq  # [(B,) T, D/2]
        if angles.dim() == 3:
            angles = angles[:, None]  # broadcast over heads
        cos, sin = angles.cos(), angles.sin()
        x32 = x.float()
        x1, x2 = x32.chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return out.to(x.dtype)
