"""Gated linear attention: ``S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t``, ``o_t = scale * q_t S_t``.

Backends (pick with ``backend=``):

* ``"recurrent"`` — the token-by-token loop of :mod:`.reference`; the ground truth.
* ``"chunk"`` — the chunkwise (FlashLinearAttention) form of :mod:`.chunk`, pure PyTorch, autograd.
* ``"auto"`` (default) — the best available: ``recurrent`` for a handful of tokens (decoding),
  ``chunk`` otherwise.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .chunk import gla_chunk
from .reference import gla_recurrent

__all__ = ["gated_linear_attention", "gla_chunk", "gla_recurrent", "BACKENDS"]

BACKENDS = ("auto", "recurrent", "chunk")
# Below this many new tokens a plain loop beats padding a 64-token chunk (decode, short prefills).
_RECURRENT_MAX_T = 16
_log = logging.getLogger("longseq.ops.gla")
_said: set[str] = set()


def _say_once(msg: str) -> None:
    if msg not in _said:
        _said.add(msg)
        _log.info(msg)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, g: Tensor, initial_state: Tensor | None) -> None:
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, T, H, {'V' if name == 'v' else 'K'}]; got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor; got dtype {x.dtype}")
    if k.shape != q.shape or g.shape != q.shape:
        raise ValueError(
            f"q, k and g must share the shape [B, T, H, K]; got q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"g {tuple(g.shape)}"
        )
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] with q's B, T, H = {tuple(q.shape[:3])}; got {tuple(v.shape)}")
    B, _, H, K = q.shape
    V = v.shape[-1]
    if initial_state is not None and tuple(initial_state.shape) != (B, H, K, V):
        raise ValueError(f"initial_state must be [B, H, K, V] = {(B, H, K, V)}; got {tuple(initial_state.shape)}")
    # Value checks read the tensor back (a host sync); skip them while a graph is being traced.
    if not torch.compiler.is_compiling() and g.numel():
        if torch.isnan(g).any():
            raise ValueError(f"g contains NaN at {int(torch.isnan(g).sum())} of {g.numel()} entries")
        g_max = g.max()
        if g_max > 0:
            raise ValueError(f"g is the log forget gate and must be <= 0; got max(g) = {g_max.item():.4g}")


def gated_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    backend: str | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Gated linear attention over a sequence, optionally continuing from a state.

    Args:
        q, k: ``[B, T, H, K]`` queries and keys.
        v: ``[B, T, H, V]`` values (``V`` may differ from ``K``).
        g: ``[B, T, H, K]`` log forget gates, ``<= 0`` (``-inf`` allowed: a full reset of that channel).
        scale: query scale, default ``K ** -0.5``.
        initial_state: ``[B, H, K, V]`` state before the first token, or None for zeros.
        output_final_state: also return the state after the last token.
        backend: ``"recurrent"``, ``"chunk"`` or ``"auto"``/None.
    Returns:
        ``(o, final_state)``: ``o`` is ``[B, T, H, V]`` in ``v``'s dtype; ``final_state`` is
        ``[B, H, K, V]`` in float32 (float64 when the inputs are float64), or None unless asked for.
    Raises:
        ValueError: on mismatched shapes, an unknown backend, NaN in ``g`` or ``g > 0``.
    """
    backend = backend or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"unknown GLA backend {backend!r}; choose one of {BACKENDS}")
    _check_inputs(q, k, v, g, initial_state)
    K = q.shape[-1]
    scale = K**-0.5 if scale is None else float(scale)

    if backend == "auto":
        backend = "recurrent" if q.shape[1] <= _RECURRENT_MAX_T else "chunk"
        if q.is_cuda and backend == "chunk":
            _say_once("longseq: GLA backend 'auto' -> 'chunk' (PyTorch); no fused CUDA kernel is installed")
    if backend == "recurrent":
        o, state = gla_recurrent(q, k, v, g, scale, initial_state)
    elif torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, g, initial_state)):
        # As in the paper, keep only the inputs for backward and recompute the chunk internals there:
        # the intra-chunk decay tensors are ~16x the size of q and would dominate activation memory.
        o, state = checkpoint(gla_chunk, q, k, v, g, scale, initial_state, use_reentrant=False)
    else:
        o, state = gla_chunk(q, k, v, g, scale, initial_state)
    return o.to(v.dtype), (state if output_final_state else None)
