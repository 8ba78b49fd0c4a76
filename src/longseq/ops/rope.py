"""Rotary position embedding (RoPE) math shared by the modules, the fused decode kernels' references and
MEGABYTE's RoPE-folded weights: the "rotate half" convention (as Llama in HF transformers), channel
pairs ``(i, i + D/2)`` rotated by ``position * theta^(-2i/D)``."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3's frequency-dependent stretch of RoPE (``rope_type="llama3"`` in HF configs).

    Wavelengths longer than ``original_max_len / low_freq_factor`` are stretched by ``factor``, those
    shorter than ``original_max_len / high_freq_factor`` are kept, and the band between is interpolated
    linearly in ``original_max_len / wavelength``.
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_len: int

    def __post_init__(self) -> None:
        if self.factor <= 0 or self.original_max_len < 1:
            raise ValueError(f"rope scaling needs factor > 0 and original_max_len >= 1; got {self}")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(f"rope scaling needs 0 < low_freq_factor < high_freq_factor; got {self}")

    def apply(self, inv_freq: Tensor) -> Tensor:
        """The scaled frequencies (same shape and dtype as ``inv_freq``)."""
        wavelength = 2 * math.pi / inv_freq
        ratio = self.original_max_len / wavelength  # how many wavelengths fit the original context
        smooth = ((ratio - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)).clamp(0.0, 1.0)
        # smooth = 0: long wavelengths, fully stretched; 1: short ones, untouched; the band between blends.
        return inv_freq * (smooth + (1 - smooth) / self.factor)


def rope_frequencies(
    head_dim: int, theta: float, device: torch.device | str | None, dtype: torch.dtype,
    scaling: RopeScaling | None = None,
) -> Tensor:
    """``theta^(-2i/D)`` ``[D/2]`` (stretched by ``scaling`` if given), made in float64 and cast to ``dtype``
    (bf16 frequencies would be useless beyond a few hundred positions, so callers pass at least fp32)."""
    exponent = torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim
    inv_freq = theta**-exponent
    if scaling is not None:
        inv_freq = scaling.apply(inv_freq)
    return inv_freq.to(dtype)


def rotate_half(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate ``x`` ``[..., D]`` by ``angles`` (broadcastable to ``[..., D/2]``, already in the compute
    dtype): ``[x1 cos - x2 sin, x2 cos + x1 sin]`` in at least fp32, cast back to ``x``'s dtype."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.to(dtype).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def fold_rope_into_weight(
    weight: Tensor, n_rotated_heads: int, head_dim: int, theta: float, positions: Tensor
) -> Tensor:
    """``[L, N, d]``: copy ``j`` of the projection ``weight`` ``[N, d]`` with the RoPE rotation of
    ``positions[j]`` folded into its first ``n_rotated_heads`` heads of ``head_dim`` rows (queries and keys;
    the rows after them, values, are copied as they are).

    ``rope_p(W x) = (R_p W) x``: for a handful of fixed positions (MEGABYTE's in-patch positions ``p < P``)
    one batched matmul with the folded weights replaces rotating every query and key. The rotation runs
    in at least fp32 and the result is cast back to ``weight``'s dtype.
    """
    dtype = torch.promote_types(weight.dtype, torch.float32)
    angles = positions.to(dtype)[:, None] * rope_frequencies(head_dim, theta, positions.device, dtype)
    cos, sin = angles.cos()[:, None, :, None], angles.sin()[:, None, :, None]  # [L, 1, D/2, 1]
    rows = n_rotated_heads * head_dim
    w_rot = weight[:rows].to(dtype).view(n_rotated_heads, 2, head_dim // 2, -1)
    w1, w2 = w_rot[:, 0], w_rot[:, 1]  # [heads, D/2, d]: the two halves that rotate together
    rotated = torch.stack([w1 * cos - w2 * sin, w2 * cos + w1 * sin], dim=2)  # [L, heads, 2, D/2, d]
    L = positions.shape[0]
    rest = weight[rows:].to(dtype).expand(L, -1, -1)
    return torch.cat([rotated.reshape(L, rows, -1), rest], dim=1).to(weight.dtype)
