"""One GLA decoding step, as thin as the kernel under it: the public op a decode loop calls per token.

:func:`~longseq.ops.gla.gated_linear_attention` takes whole sequences and checks its inputs' values (one host
sync); a decode loop that calls it for each new token pays that sync, the sequence bookkeeping and a fresh
state per call. :func:`gla_decode_step` takes one token per row, checks shapes only (no device work, no
sync, so it can be captured in a CUDA graph) and updates the state in place.
"""

from __future__ import annotations

import torch
from torch import Tensor

_BACKENDS = ("auto", "triton", "torch")


def gla_decode_step(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, state: Tensor, *, scale: float | None = None,
    backend: str | None = None,
) -> Tensor:
    """``state <- diag(exp(g)) state + k^T v`` in place, then ``o = scale * q state``, for one token per row.

    Args:
        q, k: ``[B, H, K]`` the token's queries and keys; v: ``[B, H, V]``; g: ``[B, H, K]`` log forget gates
            (``<= 0``; not checked: a decode step never waits on the device).
        state: ``[B, H, K, V]``, float32 (float64 for float64 inputs), contiguous; updated in place.
        scale: query scale, default ``K ** -0.5``.
        backend: ``"triton"`` (the fused recurrent kernel: CUDA tensors, or CPU ones under
            ``TRITON_INTERPRET=1``), ``"torch"`` (PyTorch ops) or ``"auto"``/None (triton on CUDA when it
            can run these inputs, else torch).
    Returns:
        ``o`` ``[B, H, V]`` in ``v``'s dtype.
    Raises:
        ValueError: on mismatched shapes or devices, a state of another dtype than the compute dtype or not contiguous,
            an unknown backend, or ``"triton"`` for inputs it cannot run (saying why).
    """
    backend = backend or "auto"
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {_BACKENDS}")
    _check_shapes(q, k, v, g, state)
    K = q.shape[-1]
    scale = K**-0.5 if scale is None else float(scale)
    if backend != "torch":
        from . import _triton_unusable

        why_not = _triton_unusable(q, k, v, g, state) if (q.is_cuda or backend == "triton") else "not CUDA"
        if why_not is None:
            from .triton import recurrent_step

            return recurrent_step(q, k, v, g, scale, state)
        if backend == "triton":
            raise ValueError(f"backend 'triton' cannot run these inputs: {why_not}")
    return _torch_step(q, k, v, g, state, scale)


@torch.no_grad()
def _torch_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor, state: Tensor, scale: float) -> Tensor:
    dtype = state.dtype
    state.mul_(g.to(dtype).exp().unsqueeze(-1)).add_(k.to(dtype).unsqueeze(-1) * v.to(dtype).unsqueeze(-2))
    return (scale * torch.einsum("bhk,bhkv->bhv", q.to(dtype), state)).to(v.dtype)


def _check_shapes(q: Tensor, k: Tensor, v: Tensor, g: Tensor, state: Tensor) -> None:
    named = (("q", q), ("k", k), ("v", v), ("g", g), ("state", state))
    for name, x in named:
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor; got dtype {x.dtype}")
    if any(x.device != q.device for _, x in named):
        raise ValueError("q, k, v, g and state must be on one device; got "
                         + ", ".join(f"{name} on {x.device}" for name, x in named))
    if q.dim() != 3 or k.shape != q.shape or g.shape != q.shape:
        raise ValueError(f"q, k and g must share one shape [B, H, K] (one token per row); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, g {tuple(g.shape)}")
    B, H, K = q.shape
    if v.dim() != 3 or v.shape[:2] != (B, H):
        raise ValueError(f"v must be [B, H, V] with q's B, H = {(B, H)}; got {tuple(v.shape)}")
    V = v.shape[-1]
    if tuple(state.shape) != (B, H, K, V):
        raise ValueError(f"state must be [B, H, K, V] = {(B, H, K, V)}; got {tuple(state.shape)}")
    want = torch.float64 if any(x.dtype == torch.float64 for x in (q, k, v, g)) else torch.float32
    if state.dtype != want:
        raise ValueError(f"state must be {want} for {q.dtype} inputs (it is updated in place); got {state.dtype}")
    if not state.is_contiguous():
        raise ValueError("state must be contiguous (it is updated in place)")
