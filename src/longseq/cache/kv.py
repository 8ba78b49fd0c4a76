"""Per-layer KV cache: keys after RoPE, values, and the original position of every kept token."""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.attention import attention_over_cache, causal_attention
from .policies import CachePolicy, Full


class KVCache:
    """The KV cache of one attention layer, governed by a :class:`CachePolicy`.

    Layout: ``k``, ``v`` are ``[B, H_kv, n, D]``; ``positions`` is ``[B, n]`` (original token positions,
    in temporal order). The attention layer hands every new chunk of keys/values to :meth:`attend`,
    which stores them and returns the attention output: storage, attention and the policy's decisions
    live together here, so the layer never needs to know which policy is active.
    """

    def __init__(self, policy: CachePolicy | None = None) -> None:
        self.policy = policy if policy is not None else Full()
        if self.policy.budget is not None:
            raise ValueError(f"{type(self.policy).__name__} is a bounded policy; this KVCache only supports Full()")
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.positions: Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """Store the new keys/values and attend the new queries over everything kept.

        Args:
            q: ``[B, H, T, D]``; k, v: ``[B, H_kv, T, D]`` (after RoPE); positions: ``[T]`` original positions.
        Returns:
            ``[B, H, T, D]``.
        """
        B = q.shape[0]
        pos = positions.to(torch.long).expand(B, -1)
        if self.k is None:
            self.k, self.v, self.positions = k, v, pos
            return causal_attention(q, k, v)
        self.k = torch.cat([self.k, k], dim=2)
        self.v = torch.cat([self.v, v], dim=2)
        self.positions = torch.cat([self.positions, pos], dim=1)
        o, _ = attention_over_cache(q, self.k, self.v, pos, self.positions)
        return o

    def kept_positions(self) -> Tensor:
        """Original positions of the kept tokens, ``[B, n]``."""
        if self.positions is None:
            return torch.empty(0, 0, dtype=torch.long)
        return self.positions

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.positions) if t is not None)
