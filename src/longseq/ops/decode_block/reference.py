"""Plain-PyTorch definitions of the fused one-token block kernels (:mod:`.kernels`).

They compute exactly what the module path of a :class:`~longseq.models.transformer.TransformerBlock`
computes for one token, with its rounding points: the RMSNorm output is rounded to the activation dtype
before its matmul, every matmul output is rounded before the residual add or the SiLU, and the
SiLU output is rounded before the product with ``up``. Layouts as in :mod:`longseq.ops.decode_block`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..rope import rotate_half


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    dtype = torch.promote_types(x.dtype, torch.float32)
    return F.rms_norm(x.to(dtype), (x.shape[-1],), weight.to(dtype), eps).to(x.dtype)


def norm_linear_reference(x: Tensor, weight: Tensor, norm_weight: Tensor | None, eps: float) -> Tensor:
    """``rms_norm(x) @ weight.T`` (no norm when ``norm_weight`` is None): ``[B, D] -> [B, N]``."""
    if norm_weight is not None:
        x = _rms_norm(x, norm_weight, eps)
    return F.linear(x, weight)


def linear_residual_reference(a: Tensor, weight: Tensor, residual: Tensor) -> Tensor:
    """``residual + a @ weight.T``: ``[B, N]``, ``[D, N]``, ``[B, D] -> [B, D]``."""
    return residual + F.linear(a, weight)


def norm_swiglu_reference(x: Tensor, norm_weight: Tensor, eps: float, gate_up: Tensor) -> Tensor:
    """``silu(g) * u`` with ``[g | u] = rms_norm(x) @ gate_up.T``: ``[B, D]``, ``[2F, D] -> [B, F]``."""
    gate, up = F.linear(_rms_norm(x, norm_weight, eps), gate_up).chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_rotate(x: Tensor, positions: Tensor, inv_freq: Tensor) -> Tensor:
    """"Rotate half" RoPE of ``x`` ``[B, H, D]`` at ``positions`` ``[B]``, in fp32, cast back."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return rotate_half(x, positions.to(dtype)[:, None, None] * inv_freq.to(dtype))


def _write_rotated(qkv: Tensor, pos: Tensor, k_cache: Tensor, v_cache: Tensor, n_heads: int, n_kv_heads: int,
                   inv_freq: Tensor, slot: Tensor | None = None) -> Tensor:
    """Rotate one token per row at ``pos`` ``[B]``, write its key and value to slot ``pos`` of the caches
    (or, with ``slot`` ``[B, G]``, to slot ``slot[b, g]`` of each kv head of group ``g``); returns the rotated
    query ``[B, H, D]``."""
    B = qkv.shape[0]
    H, Hkv, D = n_heads, n_kv_heads, k_cache.shape[-1]
    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
    rows = torch.arange(B, device=qkv.device)[:, None]
    where = pos[:, None].expand(B, Hkv) if slot is None else slot.expand(B, Hkv)  # [B, H_kv]
    heads = torch.arange(Hkv, device=qkv.device)[None, :]
    k_cache[rows, heads, where] = rope_rotate(k.view(B, Hkv, D), pos, inv_freq).to(k_cache.dtype)
    v_cache[rows, heads, where] = v.view(B, Hkv, D).to(v_cache.dtype)
    return rope_rotate(q.view(B, H, D), pos, inv_freq)


def write_slots(slot_pos: Tensor, pos: Tensor, row_mask: Tensor | None = None) -> Tensor:
    """``[B, G]`` the slot a bounded cache writes position ``pos`` ``[B]`` to: the first that is empty (``< 0``)
    or already holds the value written (``pos``; ``-1`` for rows outside ``row_mask``, whose write stays
    invisible). Before the write that is the first empty slot; after it, the same slot, which is why a kernel
    may compute it while another program of the same launch writes there. 0 if there is none."""
    value = pos if row_mask is None else torch.where(row_mask, pos, -1)
    hit = (slot_pos < 0) | (slot_pos == value[:, None, None])
    return hit.to(torch.int32).argmax(-1)


def patch_attention_reference(
    qkv: Tensor,
    p: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_pos: Tensor | None,
    n_heads: int,
    n_kv_heads: int,
    inv_freq: Tensor,
) -> Tensor:
    """One token per row at in-patch position ``p`` against a patch-local cache; updates the cache.

    ``qkv`` ``[B, (H + 2 H_kv) D]`` (the qkv projection's output), ``p`` ``[B]`` integer in ``[0, S)``,
    ``k_cache``/``v_cache`` ``[B, H_kv, S, D]`` (slot ``j`` holds in-patch position ``j``), ``slot_pos``
    ``[B, G, S]`` or None, ``inv_freq`` ``[D/2]`` fp32 RoPE frequencies. The rotated key and the value are
    written to slot ``p``; ``slot_pos`` becomes ``j`` for slots ``j <= p`` and ``-1`` after (a new patch
    forgets the previous one); the query attends to slots ``0..p`` (softmax in fp32, scale ``D**-0.5``).
    Returns ``[B, H * D]`` in ``qkv``'s dtype.
    """
    B = qkv.shape[0]
    H, Hkv = n_heads, n_kv_heads
    D, S = k_cache.shape[-1], k_cache.shape[2]
    q = _write_rotated(qkv, p, k_cache, v_cache, H, Hkv, inv_freq)
    slots = torch.arange(S, device=qkv.device)
    if slot_pos is not None:
        slot_pos.copy_(torch.where(slots[None, None, :] <= p[:, None, None], slots, -1).expand_as(slot_pos))
    dtype = torch.promote_types(qkv.dtype, torch.float32)
    kk = k_cache.to(dtype).repeat_interleave(H // Hkv, dim=1)  # [B, H, S, D]
    vv = v_cache.to(dtype).repeat_interleave(H // Hkv, dim=1)
    scores = torch.einsum("bhd,bhsd->bhs", q.to(dtype), kk) * D**-0.5
    scores = scores.masked_fill(slots[None, None, :] > p[:, None, None], float("-inf"))
    o = torch.einsum("bhs,bhsd->bhd", scores.softmax(-1), vv)
    return o.reshape(B, H * D).to(qkv.dtype)


def rope_write_reference(
    qkv: Tensor,
    pos: Tensor,
    row_mask: Tensor | None,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_pos: Tensor | None,
    n_heads: int,
    n_kv_heads: int,
    inv_freq: Tensor,
    first_empty: bool = False,
) -> Tensor:
    """One token per row at position ``pos`` ``[B]`` into a cache where slot ``i`` holds position ``i``
    (a static ``Full`` cache): writes the rotated key and the value to slot ``pos``, and ``pos`` to
    ``slot_pos`` ``[B, G, S]`` (``-1`` for rows where ``row_mask`` ``[B]`` is False, so the write stays
    invisible); returns the rotated query ``[B, H, 1, D]``. ``qkv`` ``[B, (H + 2 H_kv) D]``.

    ``first_empty`` (a static bounded cache): write instead to :func:`write_slots` -- the first empty slot
    of each row and group (group ``g`` holds kv head ``g`` when ``G = H_kv``, every kv head when ``G = 1``)."""
    slot = write_slots(slot_pos, pos, row_mask) if first_empty else None
    q = _write_rotated(qkv, pos, k_cache, v_cache, n_heads, n_kv_heads, inv_freq, slot)
    if slot_pos is not None:
        B, G = slot_pos.shape[:2]
        new = pos if row_mask is None else torch.where(row_mask, pos, -1)
        where = pos[:, None].expand(B, G) if slot is None else slot
        rows, groups = torch.arange(B, device=qkv.device)[:, None], torch.arange(G, device=qkv.device)[None, :]
        slot_pos[rows, groups, where] = new[:, None].expand(B, G).to(slot_pos.dtype)
    return q[:, :, None]


#: What a bounded policy evicts the lowest of (``longseq.cache.policies.EvictionRule``, :func:`evict_reference`).
KEY_POSITION, KEY_ATTENTION, KEY_ACCUMULATED = 0, 1, 2


def evict_reference(
    slot_pos: Tensor, pos: Tensor, key: int, sinks: int = 0, recent: int = 0, weights: Tensor | None = None,
    score: Tensor | None = None, row_mask: Tensor | None = None,
) -> None:
    """The eviction of one decode step of a static bounded cache, after the new token's write and attention;
    updates ``slot_pos`` (and ``score``) in place.

    Args:
        slot_pos: ``[B, G, C]`` int64 positions per slot (``-1``: empty), the new token already written.
        pos: ``[B]`` the new token's position.
        key: what the lowest value of is evicted: :data:`KEY_POSITION` (the oldest: Window, Sink),
            :data:`KEY_ATTENTION` (the new query's attention averaged over the query heads of each group:
            TOVA) or :data:`KEY_ACCUMULATED` (``score`` after adding that average: H2O).
        sinks, recent: candidates are the slots with ``sinks <= position <= pos - recent`` (no upper bound
            when ``recent < 0``); ties go to the oldest position, then the first slot.
        weights: ``[B, H, C]`` fp32 attention of the new query (for the attention keys).
        score: ``[B, G, C]`` accumulated attention (:data:`KEY_ACCUMULATED`): the written slot's restarts at
            0, then every slot adds the average (rows outside ``row_mask`` add 0).
    Only rows (and groups) holding ``C`` tokens evict: their victim's slot becomes empty.
    """
    from ...cache.policies import EvictionRule, select_by_rule

    B, G, C = slot_pos.shape
    keys = slot_pos
    if key != KEY_POSITION:
        assert weights is not None
        mean = weights.reshape(B, G, weights.shape[1] // G, C).mean(2)
        keys = mean
        if key == KEY_ACCUMULATED:
            assert score is not None
            score.scatter_(2, write_slots(slot_pos, pos, row_mask)[..., None].to(torch.int64), 0.0)
            score += mean if row_mask is None else torch.where(row_mask[:, None, None], mean, 0.0)
            keys = score
    rule = EvictionRule(key, sinks, None if recent < 0 else recent)
    victim = select_by_rule(rule, slot_pos, pos[:, None, None], keys)
    full = (slot_pos >= 0).all(-1, keepdim=True)
    slot_pos.scatter_(2, victim, torch.where(full, -1, slot_pos.gather(2, victim)))
