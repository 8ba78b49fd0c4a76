"""Causal softmax attention of new queries over a set of cached keys, addressed by original positions.

Grouped-query attention is handled by folding the query heads of each kv group into the query axis
(``[B, H, T, D] -> [B, H_kv, G*T, D]``), so a long cache is never copied ``H / H_kv`` times.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

# Cached attention sees a new key length at (almost) every call. cuDNN's SDPA builds an execution plan
# per shape (~2.5 ms of CPU each, measured on an H100 with torch 2.11), which made every decode step pay
# it; flash / memory-efficient kernels have no per-shape setup.
_CACHE_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# A decode step has only B * H (query, head) rows: SDPA gives each row one program streaming every key
# (12 programs at batch 1 for the 85M model), so it is latency bound. The split-KV Triton kernel of
# .decode_attention spreads the keys over the SMs; it is used for up to this many new queries.
DECODE_KERNEL_MAX_T = 16
_DECODE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_decode_kernel_error: str | None = None  # set once if the Triton kernel fails to import


def expand_kv_heads(x: Tensor, n_heads: int) -> Tensor:
    """``[B, H_kv, S, D] -> [B, n_heads, S, D]`` for GQA (query head h uses kv head h // G)."""
    groups = n_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Plain causal self-attention over one sequence (training / prefill from scratch).

    q: ``[B, H, T, D]``; k, v: ``[B, H_kv, T, D]`` -> ``[B, H, T, D]``.
    """
    H = q.shape[1]
    return F.scaled_dot_product_attention(q, expand_kv_heads(k, H), expand_kv_heads(v, H), is_causal=True)


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax precision: at least fp32 (fp64 stays fp64, so float64 tests compare at 1e-9)."""
    return torch.promote_types(dtype, torch.float32)


def _decode_kernel_applies(q: Tensor, k: Tensor, v: Tensor, window: int | None) -> bool:
    """Whether :func:`attention_over_cache` takes the split-KV Triton kernel (which also gives the weights):
    CUDA, no window/sink band, ``T <= DECODE_KERNEL_MAX_T`` (and ``G * T <= 128``), one fp16/bf16/fp32 dtype, a
    power-of-two head dim in [16, 256], no autograd (the kernel has no backward), Triton importable."""
    global _decode_kernel_error
    B, H, T, D = q.shape
    if not (q.is_cuda and window is None and 1 <= T <= DECODE_KERNEL_MAX_T):
        return False
    if q.dtype not in _DECODE_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if D < 16 or D > 256 or D & (D - 1) or H % k.shape[1] or (H // k.shape[1]) * T > 128:
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    if _decode_kernel_error is not None:
        return False
    try:
        from . import decode_attention  # noqa: F401  (imports Triton: only on the first CUDA decode call)
    except ImportError as e:
        _decode_kernel_error = f"{type(e).__name__}: {e}"
        return False
    return True


def attention_over_cache(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Tensor,
    k_pos: Tensor | None,
    *,
    return_weights: bool = False,
    sum_over_queries: bool = False,
    window: int | None = None,
    sinks: int = 0,
    block_size: int = 1024,
    n_slots: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Each query attends to the cached keys whose original position is ``<=`` its own.

    Args:
        q: ``[B, H, T, D]`` new queries (after RoPE).
        k, v: ``[B, H_kv, S, D]`` cached keys (after RoPE) and values, in any slot order.
        q_pos: ``[T]`` or ``[B, T]`` original positions of the queries.
        k_pos: ``[S]``, ``[B, S]`` or ``[B, H_kv, S]`` (per-kv-head caches) original positions of the keys;
            a negative position marks an empty slot. ``None``: every key is visible to every query (the
            steady-state decode step of a full cache, where no mask is needed at all).
        return_weights: also return the softmax rows ``[B, H, T, S]`` (fp32, fp64 for fp64 inputs), computed
            in the same pass as the output (the output is ``weights @ v``), e.g. for eviction scores.
        sum_over_queries: with ``return_weights``, return the rows summed over the queries, ``[B, H, S]``,
            so a long chunk never holds more than one block of rows (accumulated attention, H2O).
        window, sinks: additionally hide keys older than ``q_pos - window`` unless their position is
            ``< sinks`` (sliding-window / attention-sink caches processing a chunk at once).
        block_size: queries per block, so memory is ``block_size x S``, never ``T x S`` for long prompts.
        n_slots: ``[B]`` (or one-element) integer device tensor: only slots ``[0, n_slots)`` may hold keys
            visible to these queries (a static cache's filled prefix). The split-KV kernel reads no slot
            beyond it; the SDPA path masks those slots out. A tensor, so a CUDA graph can replay the call
            as the cache fills.
    Returns:
        ``(o, weights)`` with ``o`` ``[B, H, T, D]`` and ``weights`` as requested or None.
    """
    B, H, T, D = q.shape
    if q_pos.dim() == 1:
        q_pos = q_pos.expand(B, T)
    if _decode_kernel_applies(q, k, v, window):
        return _kernel_attention(q, k, v, q_pos, k_pos, n_slots, return_weights, sum_over_queries)
    if n_slots is not None:
        k_pos = _hide_unfilled_slots(k_pos, q_pos, n_slots, B, k.shape[2], k.device)
    if k_pos is not None:
        k_pos = kv_head_positions(k_pos, B, k.shape[2])
    return _blocked_attention(q, k, v, q_pos, k_pos, return_weights, sum_over_queries, window, sinks, block_size)


def attention_for_eviction(
    q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`attention_over_cache` for a decode step that scores its cache (TOVA, H2O): ``(o, rows, lse)``.

    On the split-KV kernel ``rows`` ``[B, H, T, S]`` are the softmax logits in log2 units and ``lse``
    ``[B, H, T]`` their log2-sum-exp, left for the consumer to normalise as it reads them
    (``exp2(rows - lse)``, as :func:`~longseq.ops.decode_block.evict` does): two passes over the rows fewer
    than normalising here. Elsewhere ``rows`` are the weights themselves and ``lse`` is None."""
    B, _, T, _ = q.shape
    if q_pos.dim() == 1:
        q_pos = q_pos.expand(B, T)
    if _decode_kernel_applies(q, k, v, None):
        from .decode_attention import decode_attention

        return decode_attention(q, k, v, q_pos, k_pos, None, return_logits=True)
    o, w = attention_over_cache(q, k, v, q_pos, k_pos, return_weights=True)
    return o, w, None


def kv_head_positions(k_pos: Tensor, B: int, S: int) -> Tensor:
    """Key positions ``[S]``, ``[B, S]`` or ``[B, Gk, S]`` as a ``[B, Gk, S]`` view (``Gk`` = 1: one layout
    shared by all kv heads, or ``H_kv``: per-kv-head caches)."""
    if k_pos.dim() == 1:
        k_pos = k_pos.expand(B, S)
    if k_pos.dim() == 2:
        k_pos = k_pos[:, None]
    return k_pos


def _kernel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Tensor,
    k_pos: Tensor | None,
    n_slots: Tensor | None,
    return_weights: bool,
    sum_over_queries: bool,
) -> tuple[Tensor, Tensor | None]:
    """:func:`attention_over_cache` on the split-KV Triton kernel: q ``[B, H, T, D]``, k/v ``[B, H_kv, S, D]``,
    q_pos ``[B, T]``; returns ``o`` ``[B, H, T, D]`` and the weights ``[B, H, T, S]`` (or ``[B, H, S]``) or None."""
    from .decode_attention import decode_attention

    n_slots = n_slots.to(q.device) if n_slots is not None else None
    if not return_weights:
        return decode_attention(q, k, v, q_pos, k_pos, n_slots), None
    o, w = decode_attention(q, k, v, q_pos, k_pos, n_slots, return_weights=True)
    return o, (w.sum(2) if sum_over_queries else w)


def _hide_unfilled_slots(
    k_pos: Tensor | None, q_pos: Tensor, n_slots: Tensor, B: int, S: int, device: torch.device
) -> Tensor:
    """Mark the slots at or beyond ``n_slots`` (``[B]`` or one element) empty (position -1), so the SDPA path
    sees what the kernel reads. ``k_pos`` ``[S]``, ``[B, S]``, ``[B, H_kv, S]`` or None (all visible);
    q_pos ``[B, T]``. Returns ``[B, S]`` or ``[B, H_kv, S]``."""
    beyond = torch.arange(S, device=device) >= n_slots.reshape(-1, 1).to(device)  # [B or 1, S]
    if k_pos is None:
        k_pos = torch.where(beyond, -1, q_pos.new_zeros(()))  # all visible within the prefix
    else:
        kp = k_pos if k_pos.dim() > 1 else k_pos.expand(B, S)
        k_pos = kp.masked_fill(beyond if kp.dim() == 2 else beyond[:, None], -1)
    return k_pos.expand(B, S) if k_pos.dim() == 2 and k_pos.shape[0] == 1 else k_pos


def _visibility_mask(q_pos: Tensor, k_pos: Tensor, window: int | None, sinks: int, B: int, G: int) -> Tensor:
    """Which keys each query of a block may see, laid out as the folded queries of
    :func:`_blocked_attention`: q_pos ``[B, t]``, k_pos ``[B, Gk, S]`` -> ``[B, Gk, G*t, S]`` bool
    (either position tensor may have batch 1; the mask has batch ``B``)."""
    t, S = q_pos.shape[1], k_pos.shape[-1]
    qp = q_pos[:, None, :, None]  # [B, 1, t, 1]
    kp = k_pos[:, :, None, :]  # [B, Gk, 1, S]
    mask = (kp <= qp) & (kp >= 0)
    if window is not None:
        mask = mask & ((kp >= qp - window) | (kp < sinks))
    Gk = mask.shape[1]
    if G > 1:
        mask = mask[:, :, None].expand(B, Gk, G, t, S).reshape(B, Gk, G * t, S)
    return mask


def _softmax_block(qg: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """Explicit-softmax attention of one block of folded queries qg ``[B, H_kv, G*t, D]`` over k, v
    ``[B, H_kv, S, D]``; returns the output ``[B, H_kv, G*t, D]`` and the weights ``[B, H_kv, G*t, S]``
    (at least fp32)."""
    scores = (qg @ k.transpose(-1, -2)).to(_score_dtype(qg.dtype)) * scale  # [B, H_kv, G*t, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    w = scores.softmax(-1)
    if mask is not None:  # a query that sees no key: weights 0 (as the decode kernel), not NaN
        w = torch.where(mask.any(-1, keepdim=True), w, 0.0)
    return w.to(v.dtype) @ v, w


def _blocked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Tensor,
    k_pos: Tensor | None,
    return_weights: bool,
    sum_over_queries: bool,
    window: int | None,
    sinks: int,
    block_size: int,
) -> tuple[Tensor, Tensor | None]:
    """The PyTorch path of :func:`attention_over_cache`, ``block_size`` queries at a time.

    q ``[B, H, T, D]``; k, v ``[B, H_kv, S, D]``; q_pos ``[B, T]``; k_pos ``[B, Gk, S]`` (Gk = 1 or H_kv)
    or None (no mask). Returns ``o`` ``[B, H, T, D]`` and the weights as :func:`attention_over_cache` does.
    """
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    scale = D**-0.5
    outs: list[Tensor] = []
    weights: list[Tensor] = []
    weight_sum: Tensor | None = None
    for start in range(0, T, block_size):
        qb = q[:, :, start : start + block_size]
        t = qb.shape[2]
        # Fold the G query heads of each kv group into the query axis: [B, H_kv, G*t, D].
        qg = qb.reshape(B, Hkv, G * t, D)
        mask = None
        if k_pos is not None:
            mask = _visibility_mask(q_pos[:, start : start + block_size], k_pos, window, sinks, B, G)
        if not return_weights:
            with sdpa_kernel(_CACHE_SDPA_BACKENDS):
                o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask)
            outs.append(o.reshape(B, H, t, D))
            continue
        o, w = _softmax_block(qg, k, v, mask, scale)
        outs.append(o.reshape(B, H, t, D))
        w = w.view(B, H, t, S)
        if sum_over_queries:
            ws = w.sum(2)
            weight_sum = ws if weight_sum is None else weight_sum + ws
        else:
            weights.append(w)
    o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    if not return_weights:
        return o, None
    if sum_over_queries:
        return o, weight_sum
    return o, (weights[0] if len(weights) == 1 else torch.cat(weights, dim=2))
