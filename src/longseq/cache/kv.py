"""Per-layer KV cache: keys after RoPE, values, and the original position of every kept token.

Buffer layout
-------------
``k``, ``v``: ``[B, H_kv, C, D]`` preallocated slots; ``slot_pos``: ``[B, G, C]`` original position held by
each slot (``-1``: empty), with ``G = H_kv`` for per-head policies and ``G = 1`` otherwise (one layout
shared by the kv heads). Bounded policies allocate ``C = budget + 1`` slots once, at the first token: the
kept ``budget`` tokens plus one free slot for the token being added. Slots are *unordered*: a new token
is written into the slot its predecessor's eviction freed (``_free``, ``[B, G]``), so the steady-state
decode step is a fixed-shape scatter + attention + argmin with no host sync and no reallocation.
:meth:`KVCache.kept_positions` sorts by position when asked.

``Full()`` grows its buffers geometrically (amortised O(1) appends; :meth:`KVCache.reserve` preallocates),
and its slots stay in temporal order.

Static mode (:meth:`KVCache.allocate`, used by ``model.init_state(..., max_len=N)``)
----------------------------------------------------------------------------------------
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

import warnings

import torch
from torch import Tensor

from ..ops.attention import attention_over_cache, causal_attention
from ..ops.eviction_replay import MAX_ENTRIES, replay_evictions, replay_evictions_reference
from .policies import CachePolicy, Full

_LONG_MAX = torch.iinfo(torch.long).max
# Bound on the fp32 scores one _evict_chunk call holds (B x H x sub-chunk x (capacity + sub-chunk)).
EVICT_CHUNK_SCORES = 1 << 26
_replay_kernel_error: str | None = None  # set once if the Triton replay kernel fails on this machine


class KVCache:
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
    """

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
        # Static mode only: [B] bool, rows whose next token is real. Rows outside the mask leave the cache
        # unchanged (MEGABYTE's global model advances only the rows that complete a patch in this step).
        self.row_mask: Tensor | None = None

    # -- bookkeeping -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._n

    def can_attend_packed(self, qkv: Tensor, positions: Tensor) -> bool:
        """Whether :meth:`attend_packed` applies: a static ``Full`` cache in ``qkv``'s dtype with a power-of-two
        head dim, one token per row (``positions`` ``[B, 1]``)."""
        if not (self.static and self.budget is None and self.k is not None and self.k.dtype == qkv.dtype):
            return False
        D = self.k.shape[3]
        return D & (D - 1) == 0 and positions.shape == (qkv.shape[0], 1)

    def attend_packed(self, qkv: Tensor, positions: Tensor, n_heads: int, inv_freq: Tensor) -> Tensor:
        """:meth:`attend` for a static ``Full`` cache from the packed, un-rotated ``qkv`` ``[B, (H + 2 H_kv) D]``
        of one token per row at ``positions`` ``[B, 1]``: RoPE (``inv_freq`` ``[D/2]`` fp32) and the cache
        write are one fused kernel, then the split-KV attention reads slots ``[0, position]``. Same result
        as rotating q and k and calling :meth:`attend`. Returns ``[B, H, 1, D]``."""
        from ..ops import decode_block

        assert self.k is not None and self.v is not None
        pos = positions[:, 0]
        q = decode_block.rope_write(qkv, pos, self.row_mask, self.k, self.v, self.slot_pos, n_heads,
                                    self.k.shape[1], inv_freq)
        self._n += 1
        o, _ = attention_over_cache(q, self.k, self.v, positions, self.slot_pos, n_slots=pos + 1)
        return o

    def count_written(self, n_tokens: int = 1) -> None:
        """Host bookkeeping (``len``) for a static ``Full`` cache whose slots a fused kernel wrote directly
        instead of :meth:`attend` (MEGABYTE's patch-local caches)."""
        self._n += n_tokens

    @property
    def capacity(self) -> int:
        """Allocated slots per row and head (``budget + 1`` for bounded policies)."""
        return 0 if self.k is None else self.k.shape[2]

    def reserve(self, n_tokens: int) -> None:
        """Allocate room for ``n_tokens`` at the first write (``Full`` only: no regrowth).

        Bounded policies always allocate ``budget + 1`` slots, so this is a no-op for them.
        """
        if self.budget is None:
            self._reserve = max(self._reserve, int(n_tokens))
            if self.k is not None and n_tokens > self.capacity:
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
        prompt was prefilled into). A bounded ``src`` has the same ``budget + 1`` slots, copied as they
        are; a ``Full`` one is copied into slots ``[0, n)`` (temporal order) and the rest marked empty.
        """
        if not self.static:
            raise ValueError("load_() fills a static cache (made by allocate())")
        if src.policy != self.policy:
            raise ValueError(f"cannot load a {src.policy} cache into a {self.policy} cache")
        assert self.k is not None and self.v is not None and self.slot_pos is not None
        rows = slice(None) if rows is None else rows
        if src.k is None:  # nothing kept yet
            self.slot_pos[rows] = -1
            if self.score is not None:
                self.score[rows] = 0
            return
        assert src.v is not None and src.slot_pos is not None
        if self.budget is None and not src.static:
            n = src._n
            if n > self.capacity:
                raise ValueError(f"the source cache keeps {n} tokens; this static cache has {self.capacity} slots")
            self.k[rows, :, :n] = src.k[:, :, :n]
            self.v[rows, :, :n] = src.v[:, :, :n]
            self.slot_pos[rows, :, :n] = src.slot_pos[:, :, :n]
            self.slot_pos[rows, :, n:] = -1
            return
        if src.capacity != self.capacity:
            raise ValueError(f"cannot load a cache of {src.capacity} slots into one of {self.capacity}")
        self.k[rows] = src.k
        self.v[rows] = src.v
        self.slot_pos[rows] = src.slot_pos
        if self.score is not None:
            assert src.score is not None
            self.score[rows] = src.score

    def _grow(self, capacity: int) -> None:
        """Full only: move the kept tokens into larger buffers (slots stay in temporal order)."""
        assert self.k is not None and self.v is not None and self.slot_pos is not None
        old_k, old_v, old_pos, n = self.k, self.v, self.slot_pos, self._n
        self._allocate(old_k, capacity)
        self.k[:, :, :n] = old_k[:, :, :n]
        self.v[:, :, :n] = old_v[:, :, :n]
        self.slot_pos[:, :, :n] = old_pos[:, :, :n]

    # -- attention -----------------------------------------------------------------------------------
    def attend(self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """Store the new keys/values, attend the new queries over everything kept, apply the policy.

        Args:
            q: ``[B, H, T, D]``; k, v: ``[B, H_kv, T, D]`` (after RoPE); positions: ``[T]`` (or ``[B, T]``)
                original positions of the new tokens.
        Returns:
            ``[B, H, T, D]``.
        """
        B, _, T, _ = q.shape
        pos = positions.to(device=q.device, dtype=torch.long)
        pos = pos.expand(B, T) if pos.dim() == 1 else pos
        if self.static:
            if T == 1:
                return self._static_step(q, k, v, pos)
            # Token by token through the same fixed-shape step: exact for every policy, and only taken by
            # callers that feed chunks to a static state (generate prefills a dynamic state instead).
            return torch.cat(
                [
                    self._static_step(q[:, :, j : j + 1], k[:, :, j : j + 1], v[:, :, j : j + 1], pos[:, j : j + 1])
                    for j in range(T)
                ],
                dim=2,
            )
        if self.budget is None:
            return self._attend_full(q, k, v, pos)
        if self.k is None:
            self._allocate(k, self.budget + 1)
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

    def _evict_step(self, q: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> Tensor:
        """One token into a full cache: write it into the free slot, attend over all ``budget + 1`` slots
        (all valid, all in the past: no mask), evict one, and remember the freed slot.

        Fixed shapes and no host sync, so this is the part a CUDA graph can capture.
        q: ``[B, H, 1, D]``; k, v: ``[B, H_kv, 1, D]``; pos: ``[B, 1]``.
        """
        assert (
            self.k is not None and self.v is not None and self.slot_pos is not None and self._free is not None
        )
        B, Hkv, _, D = k.shape
        G = self.slot_pos.shape[1]
        slot = self._free[:, :, None]  # [B, G, 1]
        kv_index = slot[..., None].expand(B, Hkv, 1, D)
        self.k.scatter_(2, kv_index, k)
        self.v.scatter_(2, kv_index, v)
        current = pos[:, None, :]  # [B, 1, 1]
        self.slot_pos.scatter_(2, slot, current.expand(B, G, 1))
        scores = None
        if self.policy.needs_attention_weights:
            o, w = attention_over_cache(q, self.k, self.v, pos, None, return_weights=True)
            assert w is not None
            scores = self._group_mean(w[:, :, 0])  # [B, G, C]
            if self.score is not None:
                self.score.scatter_(2, slot, 0.0)  # the slot's previous token is gone
                self.score += scores
                scores = self.score
        else:
            o, _ = attention_over_cache(q, self.k, self.v, pos, None)
        victim = self.policy.select_victim(self.slot_pos, current, scores)  # [B, G, 1]
        self.slot_pos.scatter_(2, victim, -1)
        self._free.copy_(victim[:, :, 0])  # in place: a captured graph keeps reading the same buffer
        return o

    def _evict_chunk_size(self, batch: int, n_heads: int) -> int:
        """Tokens per :meth:`_evict_chunk` call: at most 256, few enough that the scores of the sub-chunk
        against the cache plus itself stay within EVICT_CHUNK_SCORES elements, and (on CUDA) that the
        replay kernel can hold all ``capacity + sub-chunk`` entries of a row. 1 means token by token."""
        C = self.capacity
        per_token = batch * n_heads * (C + 256)
        step = min(256, EVICT_CHUNK_SCORES // per_token)
        if self.k is not None and self.k.is_cuda and C < MAX_ENTRIES:
            step = min(step, MAX_ENTRIES - C)
        return max(1, step)

    def _evict_chunk(self, q: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> Tensor:
        """Score-based eviction (TOVA, H2O) for ``c`` tokens arriving at a full cache, as ``c`` calls of
        :meth:`_evict_step` would do it (bit for bit in float64; in lower precision the batched products
        round differently, so a near-tie can be decided the other way).

        The cache's ``C`` slots and the ``c`` new tokens form ``S = C + c`` candidate entries. Two products
        give every new query's scores against all of them; a loop over the tokens then replays the
        policy (:mod:`longseq.ops.eviction_replay`): token ``t`` joins the alive set, its attention over
        the alive entries (softmax, then the mean over the query heads of each group) scores them, and
        the policy's victim leaves. The alive set each query saw is recorded, so the outputs are one
        masked attention. The surviving new tokens then move into the cache slots that died (slot order
        carries no meaning), and the one dead slot left over becomes the free slot; the cache is never
        copied.

        q: ``[B, H, c, D]``; k, v: ``[B, H_kv, c, D]``; pos: ``[B, c]``. Returns ``[B, H, c, D]``.
        """
        assert self.k is not None and self.v is not None and self.slot_pos is not None and self._free is not None
        assert self.budget is not None
        B, H, c, D = q.shape
        Hkv, G, C = k.shape[1], self.slot_pos.shape[1], self.capacity
        S, heads = C + c, H // G
        key_pos = torch.cat([self.slot_pos, pos[:, None].expand(B, G, c)], dim=2)  # [B, G, S]
        # The arithmetic of attention_over_cache's weights path, for all c queries at once.
        qg = q.reshape(B, Hkv, H // Hkv * c, D)
        sdt = torch.promote_types(q.dtype, torch.float32)
        scores = torch.cat([qg @ self.k.transpose(-1, -2), qg @ k.transpose(-1, -2)], dim=-1).to(sdt) * D**-0.5
        scores = scores.view(B, H, c, S)
        alive = key_pos >= 0  # the cache's kept tokens (the free slot holds position -1)
        alive[..., C:] = False
        acc = None
        if self.score is not None:  # H2O: accumulated attention; a new token starts from 0
            acc = torch.cat([self.score, self.score.new_zeros(B, G, c)], dim=2)
        seen, alive, acc = self._replay(scores, key_pos, pos, alive, acc)
        visible = seen.repeat_interleave(heads, dim=1) if G > 1 else seen.expand(B, H, c, S)
        w = scores.masked_fill(~visible, float("-inf")).softmax(-1).to(self.v.dtype)
        w = w.view(B, Hkv, H // Hkv * c, S)
        o = (w[..., :C] @ self.v + w[..., C:] @ v).view(B, H, c, D)

        # Survivor j of the new tokens (in order) takes the j-th dead cache slot (in slot order); the
        # next dead slot is the free one, and the evicted new tokens are written there (it is unused).
        dead = ~alive[..., :C]  # [B, G, C]; exactly (surviving new tokens + 1) per row and group
        dead_slots = (~dead).to(torch.int8).argsort(dim=-1, stable=True)  # dead slots first, in order
        survive = alive[..., C:]  # [B, G, c]
        n_survive = survive.sum(-1, keepdim=True)  # [B, G, 1]
        rank = torch.where(survive, survive.cumsum(-1) - 1, n_survive)
        dest = dead_slots.gather(-1, rank)  # [B, G, c]
        free = dead_slots.gather(-1, n_survive)  # [B, G, 1]
        kv_dest = (dest.expand(B, Hkv, c) if G == 1 else dest)[..., None].expand(B, Hkv, c, D)
        self.k.scatter_(2, kv_dest, k)
        self.v.scatter_(2, kv_dest, v)
        self.slot_pos.masked_fill_(dead, -1)
        self.slot_pos.scatter_(2, dest, torch.where(survive, key_pos[..., C:], -1))
        if acc is not None:
            assert self.score is not None
            self.score.copy_(acc[..., :C].masked_fill(dead, 0.0))
            self.score.scatter_(2, dest, torch.where(survive, acc[..., C:], 0.0))
        self._free.copy_(free[..., 0])
        return o

    def _replay(
        self, scores: Tensor, key_pos: Tensor, pos: Tensor, alive: Tensor, acc: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The per-token decisions of :meth:`_evict_chunk` (see :mod:`longseq.ops.eviction_replay`): one
        Triton launch on CUDA for policies with the kernel's rule (``replay_recent``), the PyTorch loop
        otherwise (or if the kernel cannot be compiled here, said once)."""
        global _replay_kernel_error
        policy = self.policy
        recent = policy.replay_recent
        if scores.is_cuda and recent is not None and _replay_kernel_error is None and scores.shape[-1] <= MAX_ENTRIES:
            try:
                return replay_evictions(scores, key_pos, pos, alive, acc, recent)
            except torch.OutOfMemoryError:
                raise  # not the kernel's fault: the loop would need the memory too
            except Exception as e:  # a Triton build problem on this machine: fall back, say why once
                _replay_kernel_error = f"{type(e).__name__}: {e}"
                warnings.warn(f"eviction replay kernel unavailable, using the PyTorch loop: {_replay_kernel_error}",
                              stacklevel=2)
        return replay_evictions_reference(scores, key_pos, pos, alive, acc, policy.select_victim)

    def _static_step(self, q: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> Tensor:
        """Static mode, one token per row (rows may sit at different positions): fixed shapes, no host
        sync, no allocation that depends on the step -- the step a CUDA graph captures.

        q: ``[B, H, 1, D]``; k, v: ``[B, H_kv, 1, D]``; pos: ``[B, 1]``. Returns ``[B, H, 1, D]``.
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
        active = self.row_mask
        kv_index = slot[..., None].expand(B, Hkv, 1, D)
        self.k.scatter_(2, kv_index, k)
        self.v.scatter_(2, kv_index, v)
        new_pos = current.expand(B, G, 1)
        if active is not None:  # inactive rows: the slot stays empty, so the write is invisible
            new_pos = torch.where(active[:, None, None], new_pos, -1)
        self.slot_pos.scatter_(2, slot, new_pos)
        scores = None
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

    def _banded(self, q: Tensor, k: Tensor, v: Tensor, pos: Tensor, window: int, sinks: int) -> Tensor:
        """Window/Sink: a chunk of ``T > 1`` tokens into a full cache at once.

        Token ``p`` sees ``[0, sinks)`` and ``[p - window, p]`` -- exactly what it would see token by token,
        since the kept set of these policies depends on positions only. The kept tokens are gathered into
        temporal order and the chunk appended: ``[sinks | run of consecutive positions]``; query ``j`` of the
        chunk then needs the sinks and run entries ``[j, j + window]``, so each query block attends over
        ``sinks + window + block`` keys, never the whole chunk. Afterwards the buffer holds the new kept set
        compacted into slots ``[0, budget)``, with the spare slot last.
        """
        assert (
            self.k is not None
            and self.v is not None
            and self.slot_pos is not None
            and self.budget is not None
        )
        budget, T = self.budget, q.shape[2]
        B, Hkv, _, D = k.shape
        order = self.slot_pos.masked_fill(self.slot_pos < 0, _LONG_MAX).argsort(-1)[
            :, :, :budget
        ]  # [B, 1, budget]
        idx = order[..., None].expand(B, Hkv, budget, D)
        keys = torch.cat([self.k.gather(2, idx), k], dim=2)  # [B, H_kv, budget + T, D], temporal order
        values = torch.cat([self.v.gather(2, idx), v], dim=2)
        key_pos = torch.cat([self.slot_pos.gather(2, order), pos[:, None]], dim=2)  # [B, 1, budget + T]
        outs = []
        block = 1024
        for a in range(0, T, block):
            b = min(T, a + block)
            lo, hi = sinks + a, budget + b  # run entries for queries [a, b): [a, b + window) after the sinks
            if sinks:
                kb = torch.cat([keys[:, :, :sinks], keys[:, :, lo:hi]], dim=2)
                vb = torch.cat([values[:, :, :sinks], values[:, :, lo:hi]], dim=2)
                pb = torch.cat([key_pos[..., :sinks], key_pos[..., lo:hi]], dim=-1)
            else:
                kb, vb, pb = keys[:, :, lo:hi], values[:, :, lo:hi], key_pos[..., lo:hi]
            o, _ = attention_over_cache(
                q[:, :, a:b], kb, vb, pos[:, a:b], pb, window=window, sinks=sinks, block_size=block
            )
            outs.append(o)
        # New kept set: the sinks and the last `window` tokens, in temporal order.
        self.k[:, :, :sinks] = keys[:, :, :sinks]
        self.k[:, :, sinks:budget] = keys[:, :, -window:]
        self.v[:, :, :sinks] = values[:, :, :sinks]
        self.v[:, :, sinks:budget] = values[:, :, -window:]
        self.slot_pos[..., :sinks] = key_pos[..., :sinks]
        self.slot_pos[..., sinks:budget] = key_pos[..., -window:]
        self.slot_pos[..., budget] = -1
        assert self._free is not None
        self._free.fill_(budget)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    # -- inspection ----------------------------------------------------------------------------------
    def kept_positions(self) -> Tensor:
        """Original positions of the kept tokens in temporal order: ``[B, n]``, or ``[B, H_kv, n]`` for
        per-head policies (each kv head keeps its own set)."""
        if self.slot_pos is None:
            return torch.empty(0, 0, dtype=torch.long)
        if self.static:
            # Rows may keep different numbers of tokens: sorted, padded with -1 at the end (reads back n).
            ordered = self.slot_pos.masked_fill(self.slot_pos < 0, _LONG_MAX).sort(-1).values
            n = int((self.slot_pos >= 0).sum(-1).max())
            kept = ordered[..., :n].masked_fill(ordered[..., :n] == _LONG_MAX, -1)
            return kept if self.policy.per_head else kept[:, 0]
        n = self._n
        if self.budget is None:
            kept = self.slot_pos[..., :n]
        else:
            kept = self.slot_pos.masked_fill(self.slot_pos < 0, _LONG_MAX).sort(-1).values[..., :n]
        return kept if self.policy.per_head else kept[:, 0]

    def nbytes(self) -> int:
        """Bytes of the state: the kept tokens' keys, values, positions (and H2O scores).

        For bounded policies this stops growing at ``budget`` tokens; the buffers actually allocated
        (``budget + 1`` slots, or Full's spare capacity) are :meth:`allocated_nbytes`.
        """
        if self.k is None or self.capacity == 0:
            return 0
        if self.static:  # the buffers are the state: they are held whether or not the slots are in use
            return self.allocated_nbytes()
        return self.allocated_nbytes(exclude_free=True) * self._n // self.capacity

    def allocated_nbytes(self, exclude_free: bool = False) -> int:
        """Bytes of every buffer this cache holds (fixed from the first token for bounded policies)."""
        tensors = [self.k, self.v, self.slot_pos, self.score]
        if not exclude_free:
            tensors.append(self._free)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)
