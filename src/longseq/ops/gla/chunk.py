"""Chunkwise gated linear attention in pure PyTorch (the paper's FlashLinearAttention form).

Two levels, as in Yang et al. (2024), Sec. 4:

* **Chunks** of ``C`` tokens pass a ``[K, V]`` state from one to the next (a short Python loop over
  ``T / C`` chunks); everything inside a chunk is matrix multiplies.
* **Sub-chunks** of ``c`` tokens inside a chunk. Between different sub-chunks the decay factorises
  around the boundary of the later sub-chunk, so both factors are ``exp(<= 0)``; inside a sub-chunk
  (the diagonal blocks) the decay is computed in log space token pair by token pair.

Every log decay here is a *sum of gates over the exact segment it spans*, never a difference of two
cumulative sums. That keeps it free of cancellation (``-1000 + 1e-3 - (-1000)``) and of ``-inf - -inf``
when a gate is ``-inf``, so the result is stable for any ``g`` in ``[-inf, 0]`` and any ``T``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import compute_dtype


def _exclusive_cumsum(x: Tensor, dim: int) -> Tensor:
    """``out[i] = sum(x[:i])`` along ``dim``, by shifting (no subtraction)."""
    inclusive = x.cumsum(dim)
    zero = torch.zeros_like(inclusive.narrow(dim, 0, 1))
    return torch.cat([zero, inclusive.narrow(dim, 0, x.shape[dim] - 1)], dim=dim)


def _exclusive_reverse_cumsum(x: Tensor, dim: int) -> Tensor:
    """``out[i] = sum(x[i+1:])`` along ``dim``."""
    return _exclusive_cumsum(x.flip(dim), dim).flip(dim)


def gla_chunk(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float,
    initial_state: Tensor | None = None,
    chunk_size: int = 32,
    sub_chunk_size: int = 8,
) -> tuple[Tensor, Tensor]:
    """Chunkwise GLA, differentiable by autograd.

    Args:
        q, k, g: ``[B, T, H, K]``; v: ``[B, T, H, V]``; initial_state: ``[B, H, K, V]`` or None.
        chunk_size: tokens per chunk ``C``; sub_chunk_size: tokens per sub-chunk ``c`` (``C % c == 0``). The
            elementwise work per token grows as ``c`` (diagonal blocks) + ``C / c`` (off-diagonal blocks) +
            ``(C / c)^3 / C`` (the decays between sub-chunks): 32 and 8 make it 14 against 21 for 64 and 16.
            On 2 CPU cores the forward is 1.8-2.7x faster at 8K-32K tokens, fwd+bwd equal at 8K and 1.35x
            faster at 32K, and 1.3x slower at tiny shapes (benchmarks/RESULTS.md).
        Nothing is checked here: a NaN or inf in q, k or v reaches every output of its chunk, earlier
        ones included (:func:`~longseq.ops.gla.gated_linear_attention` rejects them first).
    Returns:
        ``o`` as ``[B, T, H, V]`` in the compute dtype (fp32, or fp64 for fp64 inputs) and the final
        state ``[B, H, K, V]``.
    """
    if chunk_size % sub_chunk_size:
        raise ValueError(f"chunk_size={chunk_size} must be a multiple of sub_chunk_size={sub_chunk_size}")
    dtype = compute_dtype(q, k, v, g, *([initial_state] if initial_state is not None else []))
    B, T, H, K = q.shape
    V = v.shape[-1]
    C, c = chunk_size, sub_chunk_size
    S = C // c

    # [B, H, T, *]; pad T up to a whole chunk. Padded tokens have k = v = 0 (they add nothing to the
    # state) and g = 0 (they do not decay it), so the final state is exact.
    q, k, v, g = (x.to(dtype).transpose(1, 2) for x in (q, k, v, g))
    pad = (-T) % C
    if pad:
        q, k, v, g = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v, g))
    N = (T + pad) // C
    q = q * scale

    q_ = q.reshape(B, H, N, S, c, K)
    k_ = k.reshape(B, H, N, S, c, K)
    g_ = g.reshape(B, H, N, S, c, K)
    v_ = v.reshape(B, H, N, C, V)

    # --- log decays inside each sub-chunk (all <= 0) ---
    inc = g_.cumsum(-2)  # sum g[m], m <= i         (from the sub-chunk start to i, inclusive)
    exc_after = _exclusive_reverse_cumsum(g_, -2)  # sum g[m], m > j (from after j to the sub-chunk end)
    tot = g_.sum(-2)  # [B, H, N, S, K] whole sub-chunk

    a_diag = _diagonal_blocks(q_, k_, g_, dtype)
    attn = _intra_chunk_attention(q_, k_, inc, exc_after, tot, a_diag, dtype)
    o = attn.reshape(B, H, N, C, C) @ v_  # intra-chunk part
    o, state = _add_inter_chunk(o, q_, k_, v_, inc, exc_after, tot, initial_state, dtype)
    o = o.reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2)
    return o, state


def _diagonal_blocks(q_: Tensor, k_: Tensor, g_: Tensor, dtype: torch.dtype) -> Tensor:
    """Attention inside each sub-chunk, ``[B, H, N, S, c, c]`` (query i, key j, zero above the diagonal),
    from q_, k_, g_ ``[B, H, N, S, c, K]``: ``D[j, i] = sum g[m]`` for ``j < m <= i``, per key channel."""
    c = q_.shape[-2]
    idx = torch.arange(c, device=q_.device)
    after_j = idx[None, :] > idx[:, None]  # [j, m]: m > j
    seg = torch.where(after_j[:, :, None], g_[..., None, :, :], g_.new_zeros(())).cumsum(-2)  # [.., j, i, K]
    causal = idx[:, None] >= idx[None, :]  # [i, j]: j <= i
    # Zero the exponent above the diagonal before exp so no masked entry can overflow.
    seg = torch.where(causal.T[:, :, None], seg, seg.new_zeros(()))
    decay_diag = seg.transpose(-3, -2).exp()  # [.., i, j, K]
    a_diag = (q_[..., :, None, :] * k_[..., None, :, :] * decay_diag).sum(-1)  # [.., S, i, j]
    return a_diag * causal.to(dtype)


def _intra_chunk_attention(
    q_: Tensor, k_: Tensor, inc: Tensor, exc_after: Tensor, tot: Tensor, a_diag: Tensor, dtype: torch.dtype
) -> Tensor:
    """The whole intra-chunk attention ``[B, H, N, S, c, S, c]`` (query sub-chunk I, row i, key sub-chunk J,
    column j): the diagonal blocks ``a_diag`` ``[B, H, N, S, c, c]`` where ``I == J``, and where ``J < I``
    the off-diagonal blocks from q_, k_ ``[B, H, N, S, c, K]``, the in-sub-chunk log decays ``inc`` and
    ``exc_after`` (same layout) and the whole-sub-chunk sums ``tot`` ``[B, H, N, S, K]``."""
    S = q_.shape[-3]
    # decay from key j in J to query i in I = exp(exc_after[j]) * exp(mid[I, J]) * exp(inc[i]),
    # where mid[I, J] sums whole sub-chunks strictly between J and I.
    sidx = torch.arange(S, device=q_.device)
    between = (sidx[None, None, :] > sidx[None, :, None]) & (sidx[None, None, :] < sidx[:, None, None])  # [I,J,L]
    mid = torch.where(between[..., None], tot[..., None, None, :, :], tot.new_zeros(())).sum(-2)  # [..,I,J,K]
    q_dec = q_ * inc.exp()  # [.., S, c, K]
    k_dec = k_[..., None, :, :, :] * (exc_after[..., None, :, :, :] + mid[..., None, :]).exp()  # [.., I, J, c, K]
    a_off = torch.einsum("...Iik,...IJjk->...IiJj", q_dec, k_dec)
    earlier = (sidx[None, :] < sidx[:, None]).to(dtype)  # [I, J]
    eye = torch.eye(S, device=q_.device, dtype=dtype)
    return a_off * earlier[:, None, :, None] + a_diag[..., :, :, None, :] * eye[:, None, :, None]


def _add_inter_chunk(
    o: Tensor,
    q_: Tensor,
    k_: Tensor,
    v_: Tensor,
    inc: Tensor,
    exc_after: Tensor,
    tot: Tensor,
    initial_state: Tensor | None,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Pass the ``[K, V]`` state from chunk to chunk and add what each chunk's queries read from it.

    o: the intra-chunk output ``[B, H, N, C, V]``; q_, k_ ``[B, H, N, S, c, K]`` (queries scaled); v_
    ``[B, H, N, C, V]``; inc, exc_after, tot: the sub-chunk log decays of :func:`gla_chunk`. Returns
    ``(o [B, H, N, C, V], final state [B, H, K, V])`` in the compute dtype.
    """
    B, H, N, C, V = v_.shape
    K = q_.shape[-1]
    before = _exclusive_cumsum(tot, -2)  # whole sub-chunks before I within the chunk
    after = _exclusive_reverse_cumsum(tot, -2)  # whole sub-chunks after J within the chunk
    q_in = (q_ * (before[..., None, :] + inc).exp()).reshape(B, H, N, C, K)
    k_out = (k_ * (after[..., None, :] + exc_after).exp()).reshape(B, H, N, C, K)
    # On the CPU the state is passed in float64: it crosses T / C chunk boundaries, and in fp32 each would add
    # the rounding of a multiply-add and of an exp (whose error, on some vector units, leans one way), so
    # the error would grow with T. The state is small next to the chunks' work.
    carry = torch.float64 if dtype == torch.float32 and q_.device.type == "cpu" else dtype
    chunk_decay = tot.sum(-2).to(carry).exp()  # [B, H, N, K]
    contrib = (k_out.transpose(-1, -2) @ v_).to(carry)  # [B, H, N, K, V]

    state = q_.new_zeros(B, H, K, V, dtype=carry) if initial_state is None else initial_state.to(carry)
    states_before = []
    # unbind once: indexing [:, :, n] inside the loop would give each step's backward a gradient of the whole
    # [B, H, N, K, V] tensor, quadratic in the number of chunks.
    for decay, added in zip(chunk_decay.unbind(2), contrib.unbind(2), strict=True):
        states_before.append(state)
        state = decay[..., None] * state + added
    return o + q_in @ torch.stack(states_before, dim=2).to(dtype), state.to(dtype)
