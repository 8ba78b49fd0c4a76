"""Rotary position embedding (RoPE), "rotate half" convention (as Llama in HF transformers)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    """Rotates query/key channel pairs ``(i, i + D/2)`` by ``position * theta^(-2i/D)``.

    The frequencies are not a buffer on purpose: ``model.to(torch.bfloat16)`` would round them, and
    bf16 angles are useless beyond a few hundred positions. They are made per call in float64 and
    the rotation runs in at least float32.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension; got {head_dim}")
        self.head_dim, self.theta = head_dim, theta
        self._inv_freq: dict[torch.device, torch.Tensor] = {}  # plain attribute: .to(dtype) must not round it

    def inv_freq_fp32(self, device: torch.device) -> torch.Tensor:
        """``theta^(-2i/D)`` ``[D/2]`` in fp32 (made in float64, as in :meth:`forward`), cached per device: the
        fused decode kernels rotate with it, and a captured step must not rebuild it."""
        cached = self._inv_freq.get(device)
        if cached is None:
            exponent = torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float64) / self.head_dim
            cached = self._inv_freq[device] = (self.theta**-exponent).to(torch.float32)
        return cached

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate ``x`` ``[B, H, T, D]`` by ``positions`` ``[T]`` or ``[B, T]`` (integer token positions)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        exponent = torch.arange(0, self.head_dim, 2, device=x.device, dtype=torch.float64) / self.head_dim
        inv_freq = (self.theta**-exponent).to(dtype)
        angles = positions.to(dtype)[..., None] * inv_freq  # [(B,) T, D/2]
        if angles.dim() == 3:
            angles = angles[:, None]  # broadcast over heads
        cos, sin = angles.cos(), angles.sin()
        x1, x2 = x.to(dtype).chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}"
