"""Causal softmax self-attention with RoPE and grouped-query attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..cache.kv import KVCache
from ..ops.attention import causal_attention
from ..ops.rope import RopeScaling, fold_rope_into_weight
from .fused import has_hooks
from .norm import RMSNorm
from .rotary import RotaryEmbedding


@dataclass(frozen=True)
class AttentionOptions:
    """How a stateless (``cache=None``) attention call computes the same function faster.

    * ``fold_rope``: fold the RoPE rotation of each position into a copy of the qkv weight and project
      with one batched matmul (worth it where the positions are few and fixed: MEGABYTE's in-patch
      positions). Skipped when the qkv projection is not a plain hook-free ``nn.Linear`` (a LoRA wrapper
      or a hook would be bypassed).
    * ``sdpa_backends``: the SDPA backends to allow (``None``: PyTorch's choice).
    """

    fold_rope: bool = False
    sdpa_backends: tuple[SDPBackend, ...] | None = None


class Attention(nn.Module):
    """Multi-head attention, ``[B, T, d_model] -> [B, T, d_model]``.

    ``n_kv_heads < n_heads`` gives grouped-query attention. Without a cache it is plain causal
    attention (SDPA); with a :class:`KVCache` the cache stores the new keys and computes attention over
    everything it keeps, so eviction policies plug in there.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        rope_theta: float = 10000.0,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        out_bias: bool = False,
        qk_norm: bool = False,
        norm_eps: float = 1e-5,
        rope_scaling: RopeScaling | None = None,
    ) -> None:
        super().__init__()
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
            head_dim = d_model // n_heads
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.qkv = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * head_dim, bias=qkv_bias)
        self.out = nn.Linear(n_heads * head_dim, d_model, bias=out_bias)
        # Qwen3-style RMSNorm of each query and key head before RoPE (None: no such norm).
        self.q_norm = RMSNorm(head_dim, eps=norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps=norm_eps) if qk_norm else None
        self.rope = RotaryEmbedding(head_dim, rope_theta, rope_scaling)

    def forward(
        self,
        x: Tensor,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        *,
        row_mask: Tensor | None = None,
        options: AttentionOptions | None = None,
    ) -> Tensor:
        """x: ``[B, T, d_model]``; positions: ``[T]`` (or ``[B, T]``) original token positions (default
        ``0..T-1``); row_mask: ``[B]`` bool, see :meth:`KVCache.attend`; options: see
        :class:`AttentionOptions` (stateless calls only)."""
        B, T, _ = x.shape
        if positions is None:
            positions = torch.arange(T, device=x.device)
        if cache is None and options is not None and options.fold_rope and self._foldable():
            q, k, v = self._qkv_rope_folded(x, positions)
        else:
            q, k, v = self.split_heads(self.qkv(x), positions)
        if cache is not None:
            o = cache.attend(q, k, v, positions, row_mask)
        elif options is not None and options.sdpa_backends is not None:
            with sdpa_kernel(list(options.sdpa_backends)):
                o = causal_attention(q, k, v)
        else:
            o = causal_attention(q, k, v)
        return self.out(o.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def split_heads(self, qkv: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``[B, T, (H + 2 H_kv) D]`` projections -> q ``[B, H, T, D]``, k, v ``[B, H_kv, T, D]``, RoPE applied."""
        B, T, _ = qkv.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
        q, k = q.view(B, T, H, D), k.view(B, T, Hkv, D)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = self.rope(q.transpose(1, 2), positions)
        k = self.rope(k.transpose(1, 2), positions)
        return q, k, v.view(B, T, Hkv, D).transpose(1, 2)

    def attend_packed(self, qkv: Tensor, positions: Tensor, cache: KVCache, row_mask: Tensor | None) -> Tensor:
        """One token per row from its packed, un-rotated projections ``qkv`` ``[B, (H + 2 H_kv) D]`` at
        ``positions`` ``[B, 1]``: attention over ``cache`` (which stores the token), ``[B, H * D]``.

        A static ``Full`` cache takes RoPE and its write in a fused kernel; any other cache gets the rotated
        q, k, v through :meth:`KVCache.attend`, so every policy works."""
        B = qkv.shape[0]
        if cache.can_attend_packed(qkv, positions):
            o = cache.attend_packed(qkv, positions, self.n_heads, self.rope.inv_freq_fp32(qkv.device), row_mask)
        else:
            q, k, v = self.split_heads(qkv[:, None], positions)
            o = cache.attend(q, k, v, positions, row_mask)
        return o.reshape(B, self.n_heads * self.head_dim)

    def _foldable(self) -> bool:
        # The folded weights stand in for the qkv projection and the rotation: both must be plain.
        plain = type(self.qkv) is nn.Linear and self.qkv.bias is None and self.q_norm is None
        return plain and self.rope.scaling is None and not (has_hooks(self.qkv) or has_hooks(self.rope))

    def _qkv_rope_folded(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`split_heads` of ``qkv(x)`` for ``positions`` ``[L]`` through RoPE-folded weights (see
        :class:`AttentionOptions`); x: ``[N, L, d]``."""
        N, L, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        w = fold_rope_into_weight(self.qkv.weight, H + Hkv, D, self.rope.theta, positions)  # [L, 3d, d]
        # [L, N, d] @ [L, d, 3d]: the transposed view of x is a valid cuBLAS operand (no copy).
        qkv = torch.bmm(x.transpose(0, 1), w.transpose(1, 2))
        q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)  # [L, N, *]
        q = q.view(L, N, H, D).permute(1, 2, 0, 3)  # [N, H, L, D]
        k = k.view(L, N, Hkv, D).permute(1, 2, 0, 3)
        v = v.view(L, N, Hkv, D).permute(1, 2, 0, 3)
        return q, k, v
