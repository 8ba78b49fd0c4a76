"""Per-layer KV cache: keys after RoPE, values, and the original position of every kept token.

Buffer layout
-------------
``k``, ``v``: ``[B, H_kv, C, D]`` preallocated slots; ``slot_pos``: ``[B, G, C]`` original position held by
each slot (``-1``: empty), with ``G = H_kv`` for per-head policies and ``G = 1`` otherwise (one layout
shared by the kv heads). Bounded policies hold ``C = budget + 1`` slots once they hold ``budget`` tokens: the
kept ``budget`` tokens plus one free slot for the token being added (until then they grow as ``Full`` does, so a
budget above the sequence's length allocates only what arrives). Slots are *unordered*: a new token
is written into the slot its predecessor's eviction freed (``_free``, ``[B, G]``), so the steady-state
decode step is a fixed-shape scatter + attention + argmin with no host sync and no reallocation.
:meth:`KVCache.kept_positions` sorts by position when asked.

``Full()`` grows its buffers geometrically (amortised O(1) appends; :meth:`KVCache.reserve` preallocates),
and its slots stay in temporal order.

Static mode (:meth:`KVCache.allocate`, used by ``model.init_state(..., max_len=N)``): see
:mod:`longseq.cache.static`; eviction in a full cache: :mod:`longseq.cache.eviction`.

Every buffer is allocated once, up front, for a given batch size: ``budget + 1`` slots for bounded
policies (empty slots hold position ``-1``), ``max_len`` slots for ``Full`` (slot ``i`` holds position
``i``). Every new token then goes through one fixed-shape path (:meth:`KVCache._static_step`): write into
the first empty slot (bounded) or slot ``position`` (Full), attend over *all* slots with a mask that hides
empty ones (Full on CUDA: a split-KV kernel that reads only the filled prefix ``[0, position]``), and
evict only in the rows whose cache is now over budget (a ``torch.where``, not a Python branch). Positions
are per-row device tensors, so rows may sit at different positions, and nothing depends on the step
count: the step can be captured in a CUDA graph and replayed. Rows are filled from an ordinary (dynamic)
cache with :meth:`KVCache.load_`, which is how prompts are prefilled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..ops.attention import attention_over_cache, causal_attention
from .eviction import LONG_MAX, _Eviction
from .policies import CachePolicy, Full
from .state import LayerState, row_index, same_kind
from .static import _StaticMode

# Buffers whose first axis is the batch: selecting, joining and moving rows moves exactly these.
_ROW_BUFFERS = ("k", "v", "slot_pos", "score", "_free")


class KVCache(_Eviction, _StaticMode, LayerState):
    """The KV cache of one attention layer, governed by a :class:`CachePolicy`.

    The attention layer hands every new chunk of keys/values to :meth:`attend`, which stores them, applies
    the policy and returns the attention output: storage, attention and the policy's decisions live
    together here, so the layer never needs to know which policy is active.

    Eviction is exact per token, prompts included: ``attend`` over a chunk gives the same outputs and kept
    positions as calling it once per token (bit for bit in float64; in lower precision the chunked attention
    rounds differently, so a near-tie between two scores can be decided the other way). How a chunk is
    processed:

    1. while the cache has room (``kept < budget``), the tokens that fit go in at once (one attention call;
       H2O also accumulates the column sums of that chunk's attention rows);
    2. once full, positional policies (Window, Sink) process the rest of the chunk at once with a banded
       mask -- their decisions do not depend on scores -- and score-based policies (TOVA, H2O) decide token
       by token, since each decision changes what the next token sees, but over sub-chunks: every query's
       scores against the cache and the sub-chunk come from one product, the per-token loop only replays
       the decisions on those scores (a softmax, a mean and a selection per token; one Triton launch per
       sub-chunk on CUDA, :mod:`longseq.ops.eviction_replay`), and the outputs are one masked attention over
       the sub-chunk (:meth:`KVCache._evict_chunk`).

    Positions of successive calls are assumed consecutive (``0, 1, 2, ...``), as the models produce them.

    It is the :class:`~longseq.cache.LayerState` of softmax-attention layers.
    """

    keeps_tokens = True

    def __init__(self, policy: CachePolicy | None = None) -> None:
        self.policy = policy if policy is not None else Full()
        if not isinstance(self.policy, CachePolicy):
            raise TypeError(f"policy must be a CachePolicy such as Full(); got {type(self.policy).__name__}")
        self.budget: int | None = self.policy.budget
        self.k: Tensor | None = None  # [B, H_kv, C, D]
        self.v: Tensor | None = None  # [B, H_kv, C, D]
        self.slot_pos: Tensor | None = None  # [B, G, C] int64, -1 = empty
        self.score: Tensor | None = None  # [B, G, C] accumulated attention (H2O only)
        self._free: Tensor | None = None  # [B, G] slot the next token is written into, once full
        self._n = 0  # tokens kept (the same for every row and head; host-side bookkeeping only when static)
        self._reserve = 0
        self.static = False  # set by allocate(): fixed buffers, masked fixed-shape steps

    # -- bookkeeping -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        mode = "static" if self.static else "dynamic"
        return f"KVCache({self.policy.spec}, kept={self._n}, capacity={self.capacity}, {mode})"

    @property
    def bounded(self) -> bool:
        """Whether a policy bounds the cache (everything but ``Full``)."""
        return self.budget is not None

    @property
    def capacity(self) -> int:
        """Allocated slots per row and head (``budget + 1`` for a bounded policy once it holds its budget, as
        many as have arrived or were reserved before)."""
        return 0 if self.k is None else self.k.shape[2]

    def reserve(self, n_tokens: int) -> None:
        """Allocate room for ``n_tokens`` at the first write (no regrowth while they arrive); a bounded cache
        never takes more than its ``budget + 1`` slots."""
        self._reserve = max(self._reserve, int(n_tokens))
        if self.budget is None and self.k is not None and n_tokens > self.capacity:
            self._grow(int(n_tokens))

    def _allocate(self, k: Tensor, capacity: int) -> None:
        B, Hkv, _, D = k.shape
        self._allocate_buffers(B, Hkv, D, capacity, k.dtype, k.device)

    def _allocate_buffers(
        self, B: int, Hkv: int, D: int, capacity: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        G = Hkv if self.policy.per_head else 1
        self.k = torch.zeros(B, Hkv, capacity, D, dtype=dtype, device=device)
        self.v = torch.zeros(B, Hkv, capacity, D, dtype=dtype, device=device)
        self.slot_pos = torch.full((B, G, capacity), -1, dtype=torch.long, device=device)
        if self.budget is not None:
            # Until the cache first fills, the spare slot is the last one; afterwards, the last victim's.
            self._free = torch.full((B, G), self.budget, dtype=torch.long, device=device)
        if self.policy.accumulates_scores:
            self.score = torch.zeros(
                B, G, capacity, dtype=torch.promote_types(dtype, torch.float32), device=device
            )

    def _grow(self, capacity: int) -> None:
        """Move the kept tokens into larger buffers: ``Full``, or a bounded cache that has not evicted yet (its
        slots are then in temporal order too, the spare one included)."""
        assert self.k is not None and self.v is not None and self.slot_pos is not None
        old_k, old_v, old_pos, old_score, n = self.k, self.v, self.slot_pos, self.score, self._n
        self._allocate(old_k, capacity)
        self.k[:, :, :n] = old_k[:, :, :n]
        self.v[:, :, :n] = old_v[:, :, :n]
        self.slot_pos[:, :, :n] = old_pos[:, :, :n]
        if old_score is not None:
            assert self.score is not None
            self.score[..., :n] = old_score[..., :n]

    def _bounded_room(self, k: Tensor, T: int) -> None:
        """Before ``T`` tokens enter a bounded dynamic cache: all ``budget + 1`` slots once it holds ``budget``
        tokens (then every cache at its budget has the same layout, which ``concat`` needs, and the next token
        evicts), else room for them (growing geometrically, or to what :meth:`reserve` asked), never more."""
        assert self.budget is not None
        full, need = self.budget + 1, self._n + T
        need = full if need >= self.budget else need
        if self.k is not None and self.capacity >= need:
            return
        target = full if need == full else min(full, max(need, self._reserve, self.capacity * 3 // 2))
        if self.k is None:
            self._allocate(k, target)
        else:
            self._grow(target)

    # -- attention -----------------------------------------------------------------------------------
    def attend(self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, row_mask: Tensor | None = None) -> Tensor:
        """Store the new keys/values, attend the new queries over everything kept, apply the policy.

        Args:
            q: ``[B, H, T, D]``; k, v: ``[B, H_kv, T, D]`` (after RoPE); positions: ``[T]`` (or ``[B, T]``)
                original positions of the new tokens.
            row_mask: static mode only, ``[B]`` bool: rows whose new token is real. The other rows leave the
                cache unchanged (MEGABYTE's global model advances only the rows that complete a patch).
        Returns:
            ``[B, H, T, D]``.
        """
        B, _, T, _ = q.shape
        pos = positions.to(device=q.device, dtype=torch.long)
        pos = pos.expand(B, T) if pos.dim() == 1 else pos
        if row_mask is not None and not (self.static and T == 1):
            raise ValueError("row_mask applies to single-token steps on a static cache only")
        if self.static:
            if T == 1:
                return self._static_step(q, k, v, pos, row_mask)
            # Token by token through the same fixed-shape step: exact for every policy, and only taken by
            # callers that feed chunks to a static state (generate prefills a dynamic state instead).
            steps = [
                self._static_step(q[:, :, j : j + 1], k[:, :, j : j + 1], v[:, :, j : j + 1], pos[:, j : j + 1], None)
                for j in range(T)
            ]
            return torch.cat(steps, dim=2)
        if self.budget is None:
            return self._attend_full(q, k, v, pos)
        self._bounded_room(k, T)
        outs: list[Tensor] = []
        done = min(T, self.budget - self._n)
        if done > 0:
            outs.append(self._fill(q[:, :, :done], k[:, :, :done], v[:, :, :done], pos[:, :done]))
        if done < T:
            band = self.policy.band
            if band is not None and T - done > 1:
                outs.append(
                    self._banded(q[:, :, done:], k[:, :, done:], v[:, :, done:], pos[:, done:], *band)
                )
            else:
                step = 1 if T - done == 1 else self._evict_chunk_size(q.shape[0], q.shape[1])
                for a in range(done, T, step):
                    b = min(T, a + step)
                    args = (q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], pos[:, a:b])
                    outs.append(self._evict_step(*args) if b - a == 1 else self._evict_chunk(*args))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def _attend_full(self, q: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> Tensor:
        T, n = q.shape[2], self._n
        if self.k is None:
            self._allocate(k, max(T, self._reserve))
        elif n + T > self.capacity:
            self._grow(max(n + T, self.capacity * 3 // 2))
        assert self.k is not None and self.v is not None and self.slot_pos is not None
        self.k[:, :, n : n + T] = k
        self.v[:, :, n : n + T] = v
        self.slot_pos[:, :, n : n + T] = pos[:, None]
        self._n = n + T
        if n == 0:
            return causal_attention(q, k, v)
        # A single new token sees every kept key: no mask (SDPA's fastest path).
        k_pos = None if T == 1 else self.slot_pos[:, :, : n + T]
        o, _ = attention_over_cache(q, self.k[:, :, : n + T], self.v[:, :, : n + T], pos, k_pos)
        return o

    def _group_mean(self, w: Tensor) -> Tensor:
        """``[B, H, ...]`` attention -> ``[B, G, ...]``: mean over all query heads (G = 1), or over the query
        heads of each kv group (per-head policies)."""
        assert self.slot_pos is not None
        B, H = w.shape[:2]
        G = self.slot_pos.shape[1]
        return w.reshape(B, G, H // G, *w.shape[2:]).mean(2)

    def _fill(self, q: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> Tensor:
        """Tokens that fit without eviction: slots ``[n, n + T)``, one attention call."""
        assert (
            self.k is not None
            and self.v is not None
            and self.slot_pos is not None
            and self.budget is not None
        )
        T, n = q.shape[2], self._n
        end = n + T
        self.k[:, :, n:end] = k
        self.v[:, :, n:end] = v
        self.slot_pos[:, :, n:end] = pos[:, None]
        if self.score is not None:
            # H2O: every query of the chunk adds its (head-averaged) row to the scores of the keys it sees.
            o, wsum = attention_over_cache(
                q,
                self.k[:, :, :end],
                self.v[:, :, :end],
                pos,
                self.slot_pos[:, :, :end],
                return_weights=True,
                sum_over_queries=True,
            )
            assert wsum is not None
            self.score[:, :, :end] += self._group_mean(wsum)
        elif n == 0:
            o = causal_attention(q, k, v)
        else:
            o, _ = attention_over_cache(
                q, self.k[:, :, :end], self.v[:, :, :end], pos, self.slot_pos[:, :, :end]
            )
        self._n = end
        return o

    def kept_positions(self) -> Tensor:
        """Original positions of the kept tokens in temporal order: ``[B, n]``, or ``[B, H_kv, n]`` for
        per-head policies (each kv head keeps its own set). Before its first write a dynamic cache knows no
        batch size yet: ``[0, 0]``."""
        if self.slot_pos is None:
            return torch.empty(0, 0, dtype=torch.long)
        if self.static:
            # Rows may keep different numbers of tokens: sorted, padded with -1 at the end (reads back n).
            ordered = self.slot_pos.masked_fill(self.slot_pos < 0, LONG_MAX).sort(-1).values
            n = int((self.slot_pos >= 0).sum(-1).max())
            kept = ordered[..., :n].masked_fill(ordered[..., :n] == LONG_MAX, -1)
            return kept if self.policy.per_head else kept[:, 0]
        n = self._n
        if self.budget is None:
            kept = self.slot_pos[..., :n]
        else:
            kept = self.slot_pos.masked_fill(self.slot_pos < 0, LONG_MAX).sort(-1).values[..., :n]
        return kept if self.policy.per_head else kept[:, 0]

    def nbytes(self) -> int:
        """Bytes of the state: the kept tokens' keys, values, positions (and H2O scores).

        For bounded policies this stops growing at ``budget`` tokens; the buffers actually allocated
        (``budget + 1`` slots once the budget is reached, or the spare capacity of a growing cache) are
        :meth:`allocated_nbytes`.
        """
        if self.k is None or self.capacity == 0:
            return 0
        if self.static:  # the buffers are the state: they are held whether or not the slots are in use
            return self.allocated_nbytes()
        return self.allocated_nbytes(exclude_free=True) * self._n // self.capacity

    def allocated_nbytes(self, exclude_free: bool = False) -> int:
        """Bytes of every buffer this cache holds (fixed once a bounded cache first evicts)."""
        tensors = [self.k, self.v, self.slot_pos, self.score]
        if not exclude_free:
            tensors.append(self._free)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    # -- LayerState: rows, devices, graph capture ------------------------------------------------------
    def select_rows(self, index: Sequence[int] | Tensor) -> KVCache:
        """A new cache holding rows ``index`` of this one (copies; rows may repeat, e.g. beam search)."""
        out = self._like()
        for name in _ROW_BUFFERS:
            t = getattr(self, name)
            setattr(out, name, None if t is None else t.index_select(0, row_index(index, t.device)))
        return out

    @classmethod
    def concat(cls, states: Sequence[LayerState]) -> KVCache:
        """One batched cache from caches under the same policy with the same ``len`` (then their slot layouts
        agree, so rows can sit side by side). Dynamic caches that have grown to different capacities (fed in other
        chunks) are first copied into the largest: until a cache holds its budget its slots are in temporal order."""
        same_kind(states)
        caches: list[KVCache] = list(states)  # type: ignore[arg-type]
        first = caches[0]
        room = max(c.capacity for c in caches)
        for i, c in enumerate(caches):
            alike = (c.policy, len(c), c.static) == (first.policy, len(first), first.static)
            growable = not c.static and (c.budget is None or len(c) < c.budget) and c.k is not None
            if not alike or (c.capacity != room and not growable):
                raise ValueError(f"cannot concatenate {c!r} with {first!r}: policy, length and capacity must agree")
            if c.capacity != room:
                caches[i] = c.select_rows(range(c.k.shape[0]))
                caches[i]._grow(room)
        out = first._like()
        for name in _ROW_BUFFERS:
            parts = [getattr(c, name) for c in caches]
            setattr(out, name, None if parts[0] is None else torch.cat(parts))
        return out

    def _like(self) -> KVCache:
        """An empty cache with this one's policy and host bookkeeping (its buffers are set by the caller)."""
        out = KVCache(self.policy)
        out._n, out._reserve, out.static = self._n, self._reserve, self.static
        return out

    def restart_rows_(self, rows: Tensor) -> None:
        """Static mode: empty the rows where ``rows`` (``[B]`` bool) is True (their slots read as empty)."""
        if not self.static:
            raise ValueError("restart_rows_() empties rows of a static cache; a dynamic cache shares one length "
                             "across rows (start a new one instead)")
        assert self.slot_pos is not None
        self.slot_pos.masked_fill_(rows[:, None, None], -1)
        if self.score is not None:
            self.score.masked_fill_(rows[:, None, None], 0.0)

    def to(self, device: torch.device | str) -> KVCache:
        for name in _ROW_BUFFERS:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))
        return self

    def host_snapshot(self) -> Any:
        return self._n

    def restore_host(self, snapshot: Any) -> None:
        self._n = snapshot
