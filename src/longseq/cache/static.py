"""Static mode of :class:`~longseq.cache.KVCache`: every buffer allocated once, one fixed-shape step per token.

Used by ``model.init_state(..., max_len=N)``. Bounded policies get ``budget + 1`` slots (empty slots hold
position ``-1``), ``Full`` gets ``max_len`` slots (slot ``i`` holds position ``i``). Every new token goes
through one fixed-shape path (:meth:`_StaticMode._static_step`): write into the first empty slot
(bounded) or slot ``position`` (Full), attend over *all* slots with a mask that hides empty ones (Full on
CUDA: a split-KV kernel that reads only the filled prefix ``[0, position]``), and evict only in the rows
whose cache is now over budget (a ``torch.where``, not a Python branch). Positions are per-row device
tensors, so rows may sit at different positions, and nothing depends on the step count: the step can be
captured in a CUDA graph and replayed. Rows are filled from an ordinary (dynamic) cache with
:meth:`_StaticMode.load_`, which is how prompts are prefilled.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..ops.attention import attention_for_eviction, attention_over_cache
from .buffers import CacheBuffers

if TYPE_CHECKING:
    from .kv import KVCache
    from .state import LayerState

#: Static ``Full`` caches of at most this many slots (MEGABYTE's patch-local caches) take RoPE, the cache
#: write and the attention in one kernel (all slots fit one program); larger ones the split-KV kernel.
PATCH_KERNEL_MAX_SLOTS = 32
#: Whether a static bounded cache evicts with the fused kernel where its policy has an ``eviction_rule``: None
#: (default) on CUDA tensors; True on CPU ones too (the tests, through Triton's interpreter); False never
#: (the tests' PyTorch reference).
FUSED_EVICTION: bool | None = None


class _StaticMode(CacheBuffers):
    """Mixin of :class:`~longseq.cache.KVCache` (its buffers are described there)."""

    def can_attend_packed(self, qkv: Tensor, positions: Tensor) -> bool:
        """Whether :meth:`attend_packed` applies: a static cache in ``qkv``'s dtype with a power-of-two head
        dim, one token per row (``positions`` ``[B, 1]``); ``Full``, or a bounded policy with a
        :attr:`~longseq.cache.policies.CachePolicy.eviction_rule` where the kernels run."""
        if not (self.static and self.k is not None and self.k.dtype == qkv.dtype):
            return False
        D = self.k.shape[3]
        if D & (D - 1) or positions.shape != (qkv.shape[0], 1):
            return False
        return self.budget is None or self._fused_eviction(qkv)

    def _fused_eviction(self, x: Tensor) -> bool:
        """Whether this static bounded cache evicts with :func:`~longseq.ops.decode_block.evict`."""
        from ..ops import decode_block

        assert self.slot_pos is not None and self.k is not None
        # fp32 attention averages: a float64 cache (the exactness tests) keeps the float64 PyTorch path.
        return (self.policy.eviction_rule is not None and self.k.dtype != torch.float64
                and self.slot_pos.shape[2] <= decode_block.EVICT_MAX_SLOTS
                and (x.is_cuda if FUSED_EVICTION is None else FUSED_EVICTION) and decode_block.use_kernels(x))

    def _attend_and_evict(self, q: Tensor, positions: Tensor, row_mask: Tensor | None) -> Tensor:
        """A bounded static cache's attention ``q`` ``[B, H, 1, D]`` at ``positions`` ``[B, 1]`` over its slots,
        then the step's eviction in one kernel. Attention-scored policies hand the kernel the softmax logits
        and their log-sum-exp to normalise as it reads them (:func:`attention_for_eviction`)."""
        from ..ops import decode_block

        assert self.slot_pos is not None and self.budget is not None
        rule = self.policy.eviction_rule
        assert rule is not None
        rows = lse = None
        if self.policy.needs_attention_weights:
            o, rows, lse = attention_for_eviction(q, self.k, self.v, positions, self.slot_pos)
            rows, lse = rows[:, :, 0], (lse[:, :, 0] if lse is not None else None)
        else:
            o, _ = attention_over_cache(q, self.k, self.v, positions, self.slot_pos)
        recent = -1 if rule.recent is None else rule.recent
        decode_block.evict(self.slot_pos, positions[:, 0], rule.key, rule.sinks, recent, rows, self.score, row_mask,
                           lse)
        self._n = min(self._n + 1, self.budget)
        return o

    def attend_packed(
        self, qkv: Tensor, positions: Tensor, n_heads: int, inv_freq: Tensor, row_mask: Tensor | None = None
    ) -> Tensor:
        """:meth:`attend` for a static ``Full`` cache from the packed, un-rotated ``qkv`` ``[B, (H + 2 H_kv) D]``
        of one token per row at ``positions`` ``[B, 1]`` (``inv_freq``: ``[D/2]`` fp32 RoPE frequencies).

        Same result as rotating q and k and calling :meth:`attend`, in fewer kernels: caches of at most
        :data:`PATCH_KERNEL_MAX_SLOTS` slots do RoPE, the write and the attention over slots ``[0, position]``
        in one kernel (which also marks the slots after ``position`` empty: a row whose position restarted
        at 0 forgets its previous tokens); larger caches, or a ``row_mask``, RoPE and the write in one
        kernel, then the split-KV attention over the filled prefix. Returns ``[B, H, 1, D]``.
        """
        from ..ops import decode_block

        assert self.k is not None and self.v is not None
        B, Hkv, S, D = self.k.shape
        pos = positions[:, 0]
        if self.budget is not None:  # bounded: write into the first empty slot, attend, evict: three kernels
            q = decode_block.rope_write(qkv, pos, row_mask, self.k, self.v, self.slot_pos, n_heads, Hkv, inv_freq,
                                        first_empty=True)
            return self._attend_and_evict(q, positions, row_mask)
        self._n += 1
        if row_mask is None and S <= PATCH_KERNEL_MAX_SLOTS:
            o = decode_block.patch_attention(qkv, pos, self.k, self.v, self.slot_pos, n_heads, Hkv, inv_freq)
            return o.view(B, n_heads, 1, D)
        q = decode_block.rope_write(qkv, pos, row_mask, self.k, self.v, self.slot_pos, n_heads, Hkv, inv_freq)
        o, _ = attention_over_cache(q, self.k, self.v, positions, self.slot_pos, n_slots=pos + 1)
        return o

    def allocate(
        self,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        max_len: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """Switch to static mode: allocate every buffer now, once, and never reallocate.

        Bounded policies get ``budget + 1`` slots; ``Full`` gets ``max_len`` slots (required), slot ``i``
        holding position ``i`` -- every decode step then attends over all ``max_len`` slots (masked), the
        price of a shape that never changes (on CUDA the split-KV kernel reads only slots ``[0, position]``
        of them, a bound it takes as a device tensor). Returns self.

        Buffers: ``k``, ``v`` ``[B, H_kv, C, D]`` in ``dtype``; ``slot_pos`` ``[B, G, C]`` int64 (``-1``:
        empty); H2O's ``score`` ``[B, G, C]``.
        """
        if self.k is not None:
            raise ValueError("allocate() must be called on an empty cache")
        if self.budget is None:
            if max_len is None or max_len < 1:
                raise ValueError(f"a static Full() cache needs max_len >= 1; got {max_len}")
            capacity = int(max_len)
        else:
            capacity = self.budget + 1
        self._allocate_buffers(batch_size, n_kv_heads, head_dim, capacity, dtype, torch.device(device or "cpu"))
        self.static = True
        return self

    def load_(self, src: KVCache, rows: slice | None = None) -> None:
        """Static mode: copy ``src``'s kept tokens into batch rows ``rows`` (default: all) of this cache.

        ``src`` is a cache under the same policy holding ``rows``' batch (typically a dynamic cache that a
        prompt was prefilled into). A bounded ``src`` holds ``budget + 1`` slots once it has reached its budget,
        copied as they are, and fewer before (in temporal order: they go first, the rest is marked empty); a
        ``Full`` one is copied into slots ``[0, n)`` (temporal order) and the rest marked empty.
        """
        self.check_load(src)
        assert self.k is not None and self.v is not None and self.slot_pos is not None
        rows = slice(None) if rows is None else rows
        # len() is host bookkeeping, exact when every row keeps as many tokens: the source's count when it fills
        # every row, else the larger of the two.
        whole = len(range(*rows.indices(self.k.shape[0]))) == self.k.shape[0]
        self._n = src._n if whole else max(self._n, src._n)
        if src.k is None:  # nothing kept yet
            self.slot_pos[rows] = -1
            if self.score is not None:
                self.score[rows] = 0
            return
        assert src.v is not None and src.slot_pos is not None
        if self.budget is None and not src.static:
            n = src._n
            self.k[rows, :, :n] = src.k[:, :, :n]
            self.v[rows, :, :n] = src.v[:, :, :n]
            self.slot_pos[rows, :, :n] = src.slot_pos[:, :, :n]
            self.slot_pos[rows, :, n:] = -1
            return
        # A dynamic bounded cache that has not evicted yet holds fewer slots, in temporal order: they go first,
        # the rest stay empty.
        cap = src.capacity
        self.k[rows, :, :cap] = src.k
        self.v[rows, :, :cap] = src.v
        self.slot_pos[rows, :, :cap] = src.slot_pos
        self.slot_pos[rows, :, cap:] = -1
        if self.score is not None:
            assert src.score is not None
            self.score[rows, :, :cap] = src.score
            self.score[rows, :, cap:] = 0

    def check_load(self, src: LayerState) -> None:
        """As :meth:`LayerState.check_load`: a cache under the same policy, with this cache's head layout and,
        for a bounded policy or a static source, its number of slots (a dynamic ``Full`` source must fit)."""
        super().check_load(src)  # so src is a KVCache like this one
        if not self.static:
            raise ValueError("load_() fills a static cache (made by allocate())")
        if src.policy != self.policy:
            raise ValueError(f"cannot load a {src.policy} cache into a {self.policy} cache")
        if src.k is None:
            return
        assert self.k is not None
        if src.k.shape[1] != self.k.shape[1] or src.k.shape[3] != self.k.shape[3]:
            raise ValueError(f"cannot load a cache of {src.k.shape[1]} kv heads of {src.k.shape[3]} into one of "
                             f"{self.k.shape[1]} heads of {self.k.shape[3]}")
        if self.budget is None and not src.static:
            if src._n > self.capacity:
                raise ValueError(f"the source cache keeps {src._n} tokens; this static cache has {self.capacity} "
                                 "slots")
        elif src.capacity > self.capacity or (src.static and src.capacity != self.capacity):
            raise ValueError(f"cannot load a cache of {src.capacity} slots into one of {self.capacity}")

    def _static_step(self, q: Tensor, k: Tensor, v: Tensor, pos: Tensor, row_mask: Tensor | None) -> Tensor:
        """Static mode, one token per row (rows may sit at different positions): fixed shapes, no host
        sync, no allocation that depends on the step -- the step a CUDA graph captures.

        q: ``[B, H, 1, D]``; k, v: ``[B, H_kv, 1, D]``; pos: ``[B, 1]``; row_mask: ``[B]`` bool or None (see
        :meth:`KVCache.attend`). Returns ``[B, H, 1, D]``.
        """
        assert self.k is not None and self.v is not None and self.slot_pos is not None
        B, Hkv, _, D = k.shape
        G = self.slot_pos.shape[1]
        out_dtype = q.dtype
        # Under autocast the activations may differ from the buffers' dtype; compute in the buffers'.
        q, k, v = q.to(self.k.dtype), k.to(self.k.dtype), v.to(self.k.dtype)
        current = pos[:, None, :]  # [B, 1, 1]
        if self.budget is None:
            slot = current.expand(B, G, 1)  # Full: slot i holds position i
        else:
            # The first empty slot (there is always one: at most `budget` of the budget + 1 are kept).
            # After an eviction it is the victim's, so the layout matches the dynamic cache's.
            slot = (self.slot_pos < 0).to(torch.int32).argmax(-1, keepdim=True)  # [B, G, 1]
        active = row_mask
        kv_index = slot[..., None].expand(B, Hkv, 1, D)
        self.k.scatter_(2, kv_index, k)
        self.v.scatter_(2, kv_index, v)
        new_pos = current.expand(B, G, 1)
        if active is not None:  # inactive rows: the slot stays empty, so the write is invisible
            new_pos = torch.where(active[:, None, None], new_pos, -1)
        self.slot_pos.scatter_(2, slot, new_pos)
        scores = None
        if self.budget is not None and self._fused_eviction(q):  # scores, choice and release in one kernel
            return self._attend_and_evict(q, pos, active).to(out_dtype)
        if self.policy.needs_attention_weights:
            o, w = attention_over_cache(q, self.k, self.v, pos, self.slot_pos, return_weights=True)
            assert w is not None
            scores = self._group_mean(w[:, :, 0])  # [B, G, C]; 0 on empty slots
            if self.score is not None:
                self.score.scatter_(2, slot, 0.0)  # the slot's previous token (if any) is gone
                if active is not None:
                    scores = torch.where(active[:, None, None], scores, 0.0)
                self.score += scores
                scores = self.score
        else:
            n_slots = None
            if self.budget is None:
                # Full: slot i holds position i (load_ copies a prompt into slots [0, n) in order, and a step
                # writes slot `position`), so the keys a query at `pos` can see sit in slots [0, pos]. A device
                # tensor derived from `pos`, not a host int: a captured graph replays it as the cache fills,
                # and the split-KV kernel then reads the filled prefix, not all max_len slots. One small add: the
                # kernel clamps to [0, capacity] and takes any integer dtype, so no clamp/cast kernels here.
                n_slots = pos[:, 0] + 1
            o, _ = attention_over_cache(q, self.k, self.v, pos, self.slot_pos, n_slots=n_slots)
        if self.budget is not None:
            # Evict only in rows (and head groups) holding budget + 1 tokens now; elsewhere the "victim"
            # keeps its position, so the scatter below is a no-op there.
            full = (self.slot_pos >= 0).all(-1, keepdim=True)  # [B, G, 1]
            victim = self.policy.select_victim(self.slot_pos, current, scores)  # [B, G, 1]
            kept = self.slot_pos.gather(2, victim)
            self.slot_pos.scatter_(2, victim, torch.where(full, -1, kept))
            self._n = min(self._n + 1, self.budget)  # host bookkeeping for len(); exact per row only if uniform
        else:
            self._n += 1
        return o.to(out_dtype)
