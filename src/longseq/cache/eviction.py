"""Eviction in a full bounded cache: the part of :class:`~longseq.cache.KVCache` that decides which token
leaves as new ones arrive.

* one token (:meth:`_Eviction._evict_step`): the fixed-shape scatter + attention + victim selection of the
  steady-state decode step;
* a chunk under a score-based policy (TOVA, H2O; :meth:`_Eviction._evict_chunk`): every query's scores
  from one product, the per-token decisions replayed on them (:mod:`longseq.ops.eviction_replay`), one
  masked attention for the outputs -- exactly what token-by-token eviction gives;
* a chunk under a positional policy (Window, Sink; :meth:`_Eviction._banded`): a banded mask, since their
  decisions depend on positions only.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..ops.attention import attention_over_cache
from ..ops.eviction_replay import MAX_ENTRIES, replay_evictions, replay_evictions_host, replay_evictions_reference
from .buffers import CacheBuffers

LONG_MAX = torch.iinfo(torch.long).max
# Bound on the scores one _evict_chunk call holds (B x H x sub-chunk x (capacity + sub-chunk) elements). The
# CPU replay also holds their exponentials, in float64 when a row's scores span widely: up to 3x the fp32
# bytes of this many scores at the peak.
EVICT_CHUNK_SCORES = 1 << 26
# Most tokens per _evict_chunk call. Every call scores its tokens against the cache plus the whole sub-chunk,
# so a longer one does more arithmetic per token; a shorter one pays its fixed cost (a few dozen operator
# calls) more often. On 2 CPU cores 128 and 256 time alike (SmolLM2, 2K tokens, budget 256); the GPU figures
# in benchmarks/RESULTS.md were measured with 128.
EVICT_CHUNK_TOKENS = 128
_replay_kernel_error: str | None = None  # set once if the Triton replay kernel fails on this machine


class _Eviction(CacheBuffers):
    """Mixin of :class:`~longseq.cache.KVCache` (its buffers are described there)."""

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
        """Tokens per :meth:`_evict_chunk` call: at most :data:`EVICT_CHUNK_TOKENS`, few
        enough that the scores of the sub-chunk against the cache plus itself stay within EVICT_CHUNK_SCORES
        elements, and (on CUDA) that the replay kernel can hold all ``capacity + sub-chunk`` entries of a row.
        1 means token by token."""
        C, most = self.capacity, EVICT_CHUNK_TOKENS
        step = min(most, EVICT_CHUNK_SCORES // (batch * n_heads * (C + most)))
        if self.k is not None and self.k.is_cuda and C < MAX_ENTRIES:
            step = min(step, MAX_ENTRIES - C)
        return max(1, step)

    def _evict_chunk(self, q: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> Tensor:
        """Score-based eviction (TOVA, H2O) for ``c`` tokens arriving at a full cache, as ``c`` calls of
        :meth:`_evict_step` would do it (bit for bit in float64; in lower precision the batched products
        round differently, so a near-tie can be decided the other way).

        The cache's ``C`` slots and the ``c`` new tokens form ``S = C + c`` candidate entries. One product
        give every new query's scores against all of them; a loop over the tokens then replays the
        policy (:mod:`longseq.ops.eviction_replay`): token ``t`` joins the alive set, its attention over
        the alive entries (softmax, then the mean over the query heads of each group) scores them, and
        the policy's victim leaves. The alive set each query saw is recorded, so the outputs are one
        masked attention. The kept entries are then written back in position order, the free slot last.

        q: ``[B, H, c, D]``; k, v: ``[B, H_kv, c, D]``; pos: ``[B, c]``. Returns ``[B, H, c, D]``.
        """
        assert self.k is not None and self.v is not None and self.slot_pos is not None and self._free is not None
        assert self.budget is not None
        B, H, c, D = q.shape
        Hkv, G, C = k.shape[1], self.slot_pos.shape[1], self.capacity
        S, heads = C + c, H // G
        key_pos = torch.cat([self.slot_pos, pos[:, None].expand(B, G, c)], dim=2)  # [B, G, S]
        # The arithmetic of attention_over_cache's weights path, for all c queries at once; the cache and the
        # chunk side by side (a copy of the cache's keys is far smaller than the c x S scores), and the
        # elementwise steps in place: on the CPU a fresh c x S buffer costs page faults.
        qg = q.reshape(B, Hkv, H // Hkv * c, D)
        sdt = torch.promote_types(q.dtype, torch.float32)
        keys, values = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)  # [B, H_kv, S, D]
        scores = (qg @ keys.transpose(-1, -2)).to(sdt).mul_(D**-0.5)
        scores = scores.view(B, H, c, S)
        alive = key_pos >= 0  # the cache's kept tokens (the free slot holds position -1)
        alive[..., C:] = False
        acc = None
        if self.score is not None:  # H2O: accumulated attention; a new token starts from 0
            acc = torch.cat([self.score, self.score.new_zeros(B, G, c)], dim=2)
        seen, alive, acc = self._replay(scores, key_pos, pos, alive, acc)
        visible = seen.repeat_interleave(heads, dim=1) if G > 1 else seen.expand(B, H, c, S)
        w = scores.masked_fill_(~visible, float("-inf")).softmax(-1).to(self.v.dtype)
        w = w.view(B, Hkv, H // Hkv * c, S)
        o = (w @ values).view(B, H, c, D)

        # The kept set goes into slots [0, budget) in position order, the spare slot last (as _banded leaves
        # it): the next chunk's replay then finds its entries sorted (ties go to the oldest, so sorted
        # entries spare the CPU replay a pass over the scores).
        budget = self.budget
        keep = key_pos.masked_fill(~alive, LONG_MAX).argsort(dim=-1)[..., :budget]  # [B, G, budget]
        idx = (keep.expand(B, Hkv, budget) if G == 1 else keep)[..., None].expand(B, Hkv, budget, D)
        self.k[:, :, :budget] = keys.gather(2, idx)
        self.v[:, :, :budget] = values.gather(2, idx)
        self.slot_pos[..., :budget] = key_pos.gather(-1, keep)
        self.slot_pos[..., budget:] = -1
        if acc is not None:
            assert self.score is not None
            self.score[..., :budget] = acc.gather(-1, keep)
            self.score[..., budget:] = 0.0
        self._free.fill_(budget)
        return o

    def _replay(
        self, scores: Tensor, key_pos: Tensor, pos: Tensor, alive: Tensor, acc: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The per-token decisions of :meth:`_evict_chunk` (see :mod:`longseq.ops.eviction_replay`) for policies
        with the kernels' rule (``replay_recent``): one Triton launch on CUDA, the NumPy loop on the CPU; the
        PyTorch loop for other rules (or if the Triton kernel cannot be compiled here, said once, or if the
        scores' range is too wide for the NumPy loop's exponentials)."""
        global _replay_kernel_error
        policy = self.policy
        recent = policy.replay_recent
        if recent is not None and scores.device.type == "cpu":
            done = replay_evictions_host(scores, key_pos, pos, alive, acc, recent)
            if done is not None:
                return done
        elif scores.is_cuda and recent is not None and _replay_kernel_error is None and scores.shape[-1] <= MAX_ENTRIES:
            try:
                return replay_evictions(scores, key_pos, pos, alive, acc, recent)
            except torch.OutOfMemoryError:
                raise  # not the kernel's fault: the loop would need the memory too
            except Exception as e:  # a Triton build problem on this machine: fall back, say why once
                _replay_kernel_error = f"{type(e).__name__}: {e}"
                warnings.warn(f"eviction replay kernel unavailable, using the PyTorch loop: {_replay_kernel_error}",
                              stacklevel=2)
        return replay_evictions_reference(scores, key_pos, pos, alive, acc, policy.select_victim)

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
        order = self.slot_pos.masked_fill(self.slot_pos < 0, LONG_MAX).argsort(-1)[
            :, :, :budget
        ]  # [B, 1, budget]
        idx = order[..., None].expand(B, Hkv, budget, D)
        keys = torch.cat([self.k.gather(2, idx), k], dim=2)  # [B, H_kv, budget + T, D], temporal order
        values = torch.cat([self.v.gather(2, idx), v], dim=2)
        key_pos = torch.cat([self.slot_pos.gather(2, order), pos[:, None]], dim=2)  # [B, 1, budget + T]
        outs = []
        # Queries per block: each block attends over sinks + window + block keys, so smaller blocks waste
        # less of the band on masked keys (window + block vs the window each query needs); half the window
        # balances that against the number of calls.
        block = min(1024, max(64, window // 2))
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
