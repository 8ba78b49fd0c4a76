"""Gated linear attention as the plain recurrence: the ground truth every other backend is tested against."""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: state arithmetic never runs below fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def gla_recurrent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Step-by-step GLA.

    ``S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t`` and ``o_t = scale * q_t S_t``.

    Args:
        q, k, g: ``[B, T, H, K]``; v: ``[B, T, H, V]``; initial_state: ``[B, H, K, V]`` or None.
    Returns:
        ``o`` as ``[B, T, H, V]`` in the compute dtype and the final state ``[B, H, K, V]``.
    """
    dtype = compute_dtype(q, k, v, g, *([initial_state] if initial_state is not None else []))
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v, g = (x.to(dtype) for x in (q, k, v, g))
    if initial_state is None:
        state = q.new_zeros(B, H, K, V)
    else:
        state = initial_state.to(dtype)
    outputs = []
    for t in range(T):
        state = g[:, t, :, :, None].exp() * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, state))
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(B, 0, H, V)
    return o, state
