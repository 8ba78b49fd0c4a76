"""Fused kernels for one decode step of a Transformer block at small batch.

Why: at batch 1 a decode step of a small Transformer reads each weight once and does almost no
arithmetic, so its time is the number of kernels it launches (each costs a few microseconds even
inside a CUDA graph). The module path of one block is ~15 kernels (norm, cuBLAS GEMV, RoPE, cache
writes, split-KV attention, SiLU, adds); these ops fold it into four GEMVs with their neighbours fused,
plus attention:

* :func:`norm_linear` -- ``rms_norm(x) @ W^T`` (the qkv projection; the LM head);
* :func:`linear_residual` -- ``residual + a @ W^T`` (the output and down projections);
* :func:`norm_swiglu` -- ``silu(g) * u`` with ``[g | u] = rms_norm(x) @ W^T`` (the MLP's first half);
* :func:`patch_attention` -- RoPE, cache write and attention over a short, patch-local cache (MEGABYTE's
  local model: at most ``P`` keys, slot ``j`` = in-patch position ``j``) in one kernel;
* :func:`rope_write` -- RoPE of the query and key and the key/value write into a static ``Full`` cache
  (slot ``i`` = position ``i``) in one kernel; the split-KV attention kernel then reads the cache.

Layouts: activations ``[B, D]`` (one token per row, unit stride along D), weights as ``nn.Linear``
stores them (``[N, D]``, contiguous). Each op computes its :mod:`.reference` definition with the same
rounding points as the module path (the norm's output, each matmul's output and the SiLU's output are
rounded to the activation dtype); only the order of the fp32 sums differs. The Triton kernels run for
CUDA tensors (and any tensors under ``TRITON_INTERPRET=1``, which the tests use); otherwise the
reference runs. No autograd: these are inference ops.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .reference import (
    KEY_ACCUMULATED,
    KEY_ATTENTION,
    KEY_POSITION,
    evict_reference,
    linear_residual_reference,
    norm_linear_reference,
    norm_swiglu_reference,
    patch_attention_reference,
    rope_write_reference,
)

__all__ = [
    "KEY_ACCUMULATED",
    "KEY_ATTENTION",
    "KEY_POSITION",
    "evict",
    "evict_reference",
    "kernels_available",
    "use_kernels",
    "linear_residual",
    "norm_linear",
    "norm_swiglu",
    "patch_attention",
    "rope_write",
    "linear_residual_reference",
    "norm_linear_reference",
    "norm_swiglu_reference",
    "patch_attention_reference",
    "rope_write_reference",
]

# Read once: the tests set it before importing longseq (as Triton itself reads it at decoration time).
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_UNCHECKED = object()
_IMPORT_ERROR: object = _UNCHECKED


def kernels_available() -> bool:
    """Whether the Triton kernels import here (cached)."""
    global _IMPORT_ERROR
    if _IMPORT_ERROR is _UNCHECKED:
        try:
            from . import kernels  # noqa: F401
            _IMPORT_ERROR = None
        except ImportError as e:
            _IMPORT_ERROR = f"{type(e).__name__}: {e}"
    return _IMPORT_ERROR is None


def use_kernels(x: Tensor) -> bool:
    """Whether the ops run their Triton kernels on ``x``'s device (CUDA, or any under ``TRITON_INTERPRET=1``)."""
    return (x.is_cuda or _INTERPRET) and kernels_available()


def _check_rows(name: str, x: Tensor, width: int, what: str) -> None:
    if x.dim() != 2 or x.shape[1] != width or x.stride(1) != 1:
        raise ValueError(f"{name} must be [B, {width}] ({what}) with unit stride along it; got "
                         f"{tuple(x.shape)} with strides {x.stride()}")


def _check_weight(weight: Tensor, x: Tensor) -> None:
    if weight.dim() != 2 or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous [N, D] matrix; got {tuple(weight.shape)}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight ({weight.dtype}, {weight.device}) must match the activations "
                         f"({x.dtype}, {x.device})")


def _check_norm(norm_weight: Tensor | None, width: int) -> None:
    if norm_weight is not None and norm_weight.shape != (width,):
        raise ValueError(f"norm_weight must be [{width}]; got {tuple(norm_weight.shape)}")


def norm_linear(x: Tensor, weight: Tensor, norm_weight: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """``rms_norm(x, norm_weight) @ weight.T`` (no norm when ``norm_weight`` is None).

    x: ``[B, D]``; weight: ``[N, D]``; norm_weight: ``[D]``. Returns ``[B, N]`` in x's dtype.
    """
    _check_weight(weight, x)
    _check_rows("x", x, weight.shape[1], "the weight's input width")
    _check_norm(norm_weight, x.shape[1])
    if not use_kernels(x):
        return norm_linear_reference(x, weight, norm_weight, eps)
    from .kernels import gemv

    return gemv(x, weight, norm_weight, eps, None, swiglu=False)


def linear_residual(a: Tensor, weight: Tensor, residual: Tensor) -> Tensor:
    """``residual + a @ weight.T``. a: ``[B, N]``; weight: ``[D, N]``; residual: ``[B, D]``."""
    _check_weight(weight, a)
    _check_rows("a", a, weight.shape[1], "the weight's input width")
    if residual.shape != (a.shape[0], weight.shape[0]) or residual.dtype != a.dtype or residual.stride(1) != 1:
        raise ValueError(f"residual must be [B, {weight.shape[0]}] in {a.dtype} with unit stride along it; got "
                         f"{tuple(residual.shape)} {residual.dtype}")
    if not use_kernels(a):
        return linear_residual_reference(a, weight, residual)
    from .kernels import gemv

    return gemv(a, weight, None, 0.0, residual, swiglu=False)


def norm_swiglu(x: Tensor, norm_weight: Tensor, eps: float, gate_up: Tensor) -> Tensor:
    """``silu(g) * u`` with ``[g | u] = rms_norm(x, norm_weight) @ gate_up.T`` (SwiGLU's fused
    ``gate_up`` weight ``[2F, D]``). x: ``[B, D]``. Returns ``[B, F]``."""
    _check_weight(gate_up, x)
    _check_rows("x", x, gate_up.shape[1], "the weight's input width")
    if gate_up.shape[0] % 2:
        raise ValueError(f"gate_up must have an even number of rows [2F, D]; got {tuple(gate_up.shape)}")
    _check_norm(norm_weight, x.shape[1])
    if not use_kernels(x):
        return norm_swiglu_reference(x, norm_weight, eps, gate_up)
    from .kernels import gemv

    return gemv(x, gate_up, norm_weight, eps, None, swiglu=True)


def _check_cache(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, slot_pos: Tensor | None, n_heads: int,
                 n_kv_heads: int) -> None:
    B = qkv.shape[0]
    D, S = k_cache.shape[-1], k_cache.shape[2]
    if k_cache.shape != (B, n_kv_heads, S, D) or v_cache.shape != k_cache.shape:
        raise ValueError(f"caches must be [B={B}, H_kv={n_kv_heads}, S, D]; got {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)}")
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}")
    _check_rows("qkv", qkv, (n_heads + 2 * n_kv_heads) * D, "(H + 2 H_kv) * D")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the caches need unit stride along the head dim")
    if slot_pos is not None and slot_pos.stride(-1) != 1:
        raise ValueError("slot_pos needs unit stride along the slots")
    if D & (D - 1) or D < 2:
        raise ValueError(f"the fused attention kernels need a power-of-two head dim; got {D}")
    if slot_pos is not None and (slot_pos.shape[0] != B or slot_pos.shape[2] != S
                                 or slot_pos.shape[1] not in (1, n_kv_heads)):
        raise ValueError(f"slot_pos must be [B, 1 or H_kv, S]; got {tuple(slot_pos.shape)}")


def _check_positions(name: str, pos: Tensor, batch: int) -> None:
    if pos.shape != (batch,) or pos.is_floating_point() or pos.dtype == torch.bool:
        raise ValueError(f"{name} must be a [B={batch}] integer tensor; got {tuple(pos.shape)} {pos.dtype}")


def rope_write(
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
    """RoPE of one token per row and its key/value write into a static ``Full`` cache (or, with
    ``first_empty``, into the first empty slot of each group of a static bounded cache); returns the rotated
    query ``[B, H, 1, D]``. See :func:`.reference.rope_write_reference`. ``pos`` ``[B]`` must lie in ``[0, S)``
    for a ``Full`` cache, and a bounded one must have an empty slot (neither is checked: that would read the
    device tensor back, which a captured step cannot do)."""
    _check_cache(qkv, k_cache, v_cache, slot_pos, n_heads, n_kv_heads)
    _check_positions("pos", pos, qkv.shape[0])
    if first_empty and slot_pos is None:
        raise ValueError("first_empty needs slot_pos (it says which slots are empty)")
    if row_mask is not None and (row_mask.shape != (qkv.shape[0],) or row_mask.dtype != torch.bool):
        raise ValueError(f"row_mask must be a [B={qkv.shape[0]}] bool tensor; got {tuple(row_mask.shape)} "
                         f"{row_mask.dtype}")
    if not use_kernels(qkv):
        return rope_write_reference(qkv, pos, row_mask, k_cache, v_cache, slot_pos, n_heads, n_kv_heads, inv_freq,
                                    first_empty)
    from .kernels import rope_write as kernel

    return kernel(qkv, pos, row_mask, k_cache, v_cache, slot_pos, n_heads, n_kv_heads, inv_freq, first_empty)


def patch_attention(
    qkv: Tensor,
    p: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_pos: Tensor | None,
    n_heads: int,
    n_kv_heads: int,
    inv_freq: Tensor,
) -> Tensor:
    """RoPE + cache write + attention of one token per row over a patch-local cache.

    See :func:`.reference.patch_attention_reference` for the definition and layouts
    (``qkv`` ``[B, (H + 2 H_kv) D]``, ``p`` ``[B]``, caches ``[B, H_kv, S, D]``, ``slot_pos`` ``[B, G, S]``).
    The head dim must be a power of two (the kernel's tile); ``p`` must lie in ``[0, S)`` (not checked: that
    would read the device tensor back, which a captured step cannot do).
    """
    _check_cache(qkv, k_cache, v_cache, slot_pos, n_heads, n_kv_heads)
    _check_positions("p", p, qkv.shape[0])
    if not use_kernels(qkv):
        return patch_attention_reference(qkv, p, k_cache, v_cache, slot_pos, n_heads, n_kv_heads, inv_freq)
    from .kernels import patch_attention as kernel

    return kernel(qkv, p, k_cache, v_cache, slot_pos, n_heads, n_kv_heads, inv_freq)


#: The largest bounded cache (slots) :func:`evict` takes: its kernel holds a row of slots in one tile.
EVICT_MAX_SLOTS = 16384


def evict(
    slot_pos: Tensor, pos: Tensor, key: int, sinks: int = 0, recent: int = 0, weights: Tensor | None = None,
    score: Tensor | None = None, row_mask: Tensor | None = None, lse: Tensor | None = None,
) -> None:
    """The eviction of one decode step of a static bounded cache, in place: one kernel for the key, the
    choice among the candidates and the slot's release. See :func:`.reference.evict_reference` for the
    definition and layouts (``slot_pos`` ``[B, G, C]``, ``weights`` ``[B, H, C]`` fp32, ``score`` ``[B, G, C]``).
    With ``lse`` ``[B, H]`` fp32, ``weights`` holds the attention logits in log2 units and the kernel reads
    ``exp2(weights - lse)`` (:func:`~longseq.ops.attention.attention_for_eviction`'s rows)."""
    B, G, C = slot_pos.shape
    if slot_pos.dtype != torch.int64 or slot_pos.stride(-1) != 1:
        raise ValueError(f"slot_pos must be int64 with unit stride along the slots; got {slot_pos.dtype}")
    _check_positions("pos", pos, B)
    if key not in (KEY_POSITION, KEY_ATTENTION, KEY_ACCUMULATED):
        raise ValueError(f"unknown eviction key {key}")
    if key != KEY_POSITION and (weights is None or weights.dim() != 3 or weights.shape[0] != B
                                or weights.shape[2] != C or weights.shape[1] % G or weights.stride(-1) != 1):
        raise ValueError(f"weights must be [B={B}, H (a multiple of G={G}), C={C}] with unit stride; got "
                         f"{None if weights is None else tuple(weights.shape)}")
    if lse is not None and (weights is None or lse.shape != weights.shape[:2] or lse.dtype != torch.float32):
        raise ValueError(f"lse must be fp32 [B, H] = {None if weights is None else tuple(weights.shape[:2])}, "
                         f"one per row of weights; got {tuple(lse.shape)} {lse.dtype}")
    if key == KEY_ACCUMULATED and (score is None or score.shape != slot_pos.shape or score.stride(-1) != 1):
        raise ValueError(f"score must be [B, G, C] = {tuple(slot_pos.shape)} with unit stride")
    if C > EVICT_MAX_SLOTS:
        raise ValueError(f"evict takes caches of at most {EVICT_MAX_SLOTS} slots; got {C}")
    if not use_kernels(slot_pos):
        if lse is not None:
            weights = torch.exp2(weights - lse[..., None])
        return evict_reference(slot_pos, pos, key, sinks, recent, weights, score, row_mask)
    from .kernels import evict as kernel

    kernel(slot_pos, pos, key, sinks, recent, weights, score, row_mask, lse)
