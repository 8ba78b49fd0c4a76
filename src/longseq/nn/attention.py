"""Causal softmax self-attention with RoPE and grouped-query attention."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..cache.kv import KVCache
from ..ops.attention import causal_attention
from .rotary import RotaryEmbedding


class Attention(nn.Module):
    """Multi-head attention, ``[B, T, d_model] -> [B, T, d_model]``.

    ``n_kv_heads < n_heads`` gives grouped-query attention. Without a cache it is plain causal
    attention (SDPA); with a :class:`KVCache` the cache stores the new keys and computes attention over
    everything it keeps, so eviction policies plug in there.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, rope_theta: float = 10000.0) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}")
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.qkv = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=False)
        self.out = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        self.rope = RotaryEmbedding(self.head_dim, rope_theta)

    def forward(self, x: Tensor, positions: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """x: ``[B, T, d_model]``; positions: ``[T]`` original token positions (default ``0..T-1``)."""
        B, T, _ = x.shape
        if positions is None:
            positions = torch.arange(T, device=x.device)
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = self.rope(q.view(B, T, H, D).transpose(1, 2), positions)
        k = self.rope(k.view(B, T, Hkv, D).transpose(1, 2), positions)
        v = v.view(B, T, Hkv, D).transpose(1, 2)
        o = causal_attention(q, k, v) if cache is None else cache.attend(q, k, v, positions)
        return self.out(o.transpose(1, 2).reshape(B, T, H * D))
