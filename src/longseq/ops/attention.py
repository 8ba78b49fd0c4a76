"""Causal softmax attention of new queries over a set of cached keys, addressed by original positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def expand_kv_heads(x: Tensor, n_heads: int) -> Tensor:
    """``[B, H_kv, S, D] -> [B, n_heads, S, D]`` for grouped-query attention (query head h uses kv head h // G)."""
    groups = n_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Plain causal self-attention over one sequence (training / prefill from scratch).

    q: ``[B, H, T, D]``; k, v: ``[B, H_kv, T, D]`` -> ``[B, H, T, D]``.
    """
    H = q.shape[1]
    return F.scaled_dot_product_attention(q, expand_kv_heads(k, H), expand_kv_heads(v, H), is_causal=True)


def attention_over_cache(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Tensor,
    k_pos: Tensor,
    *,
    return_weights: bool = False,
    block_size: int = 1024,
) -> tuple[Tensor, Tensor | None]:
    """Each query attends to the cached keys whose original position is ``<=`` its own.

    Args:
        q: ``[B, H, T, D]`` new queries (after RoPE).
        k, v: ``[B, H_kv, S, D]`` cached keys (after RoPE) and values, in any order.
        q_pos: ``[T]`` or ``[B, T]`` original positions of the queries.
        k_pos: ``[S]`` or ``[B, S]`` original positions of the keys; a negative position marks an empty slot.
        return_weights: also return the softmax rows ``[B, H, T, S]`` (fp32), e.g. for eviction scores.
        block_size: queries per block, so memory is ``block_size x S``, never ``T x S`` for long prompts.
    Returns:
        ``(o, weights)`` with ``o`` ``[B, H, T, D]`` and ``weights`` or None.
    """
    B, H, T, _ = q.shape
    k, v = expand_kv_heads(k, H), expand_kv_heads(v, H)
    q_pos = q_pos.expand(B, T) if q_pos.dim() == 1 else q_pos
    k_pos = k_pos.expand(B, k.shape[2]) if k_pos.dim() == 1 else k_pos
    outs, weights = [], []
    for start in range(0, T, block_size):
        qb = q[:, :, start : start + block_size]
        qp = q_pos[:, start : start + block_size]
        mask = (k_pos[:, None, :] <= qp[:, :, None]) & (k_pos[:, None, :] >= 0)  # [B, t, S]
        mask = mask[:, None]  # broadcast over heads
        if return_weights:
            scores = (qb.float() @ k.float().transpose(-1, -2)) * qb.shape[-1] ** -0.5
            w = scores.masked_fill(~mask, float("-inf")).softmax(-1)
            outs.append((w.to(v.dtype) @ v).to(q.dtype))
            weights.append(w)
        else:
            outs.append(F.scaled_dot_product_attention(qb, k, v, attn_mask=mask))
    o = torch.cat(outs, dim=2)
    return o, (torch.cat(weights, dim=2) if return_weights else None)
