"""Rotary position embedding (RoPE), "rotate half" convention (as Llama in HF transformers)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.rope import RopeScaling, rope_frequencies, rotate_half


class RotaryEmbedding(nn.Module):
    """Rotates query/key channel pairs ``(i, i + D/2)`` by ``position * theta^(-2i/D)``.

    The frequencies are not a buffer on purpose: ``model.to(torch.bfloat16)`` would round them, and
    bf16 angles are useless beyond a few hundred positions. They are made per call in float64 and
    the rotation runs in at least float32.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: RopeScaling | None = None) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension; got {head_dim}")
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self._inv_freq: dict[torch.device, torch.Tensor] = {}  # plain attribute: .to(dtype) must not round it

    def inv_freq_fp32(self, device: torch.device) -> torch.Tensor:
        """``theta^(-2i/D)`` ``[D/2]`` in fp32 (made in float64, as in :meth:`forward`), cached per device: the
        fused decode kernels rotate with it, and a captured step must not rebuild it."""
        cached = self._inv_freq.get(device)
        if cached is None:
            freq = rope_frequencies(self.head_dim, self.theta, device, torch.float32, self.scaling)
            cached = self._inv_freq[device] = freq
        return cached

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate ``x`` ``[B, H, T, D]`` by ``positions`` ``[T]`` or ``[B, T]`` (integer token positions)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        freq = rope_frequencies(self.head_dim, self.theta, x.device, dtype, self.scaling)
        angles = positions.to(dtype)[..., None] * freq
        if angles.dim() == 3:  # [B, T, D/2]: broadcast over heads
            angles = angles[:, None]
        return rotate_half(x, angles)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}" + (f", scaling={self.scaling}" if self.scaling else "")
