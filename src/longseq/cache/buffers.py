"""The buffers of a :class:`~longseq.cache.KVCache`, declared once for the mixins that make it up
(:mod:`.eviction`, :mod:`.static`); their layout is described in :mod:`.kv`."""

from __future__ import annotations

from torch import Tensor

from .policies import CachePolicy


class CacheBuffers:
    policy: CachePolicy
    budget: int | None
    k: Tensor | None  # [B, H_kv, C, D]
    v: Tensor | None  # [B, H_kv, C, D]
    slot_pos: Tensor | None  # [B, G, C] int64, -1 = empty
    score: Tensor | None  # [B, G, C] accumulated attention (H2O only)
    _free: Tensor | None  # [B, G] slot the next token is written into, once full
    _n: int
    static: bool
    capacity: int  # slots per row and head (a property of KVCache)
