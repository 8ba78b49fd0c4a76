"""Fused recurrent GLA for decoding: a few new tokens against the fp32 state, forward only.

One program per (V tile, sequence x head) holds its ``[K, BV]`` slice of the state in registers and
loops over the sequence's new tokens: ``S = diag(exp(g_t)) S + k_t^T v_t``, ``o_t = scale q_t S``.
``exp(-inf) = 0`` is exact here (no cumulative sums), so gates need no clamp.

Layouts (packed, see :mod:`.common`): ``q, k, g`` ``[TT, H, K]``, ``v`` ``[TT, H, V]``; states
``[N, H, K, V]`` fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import triton_next_power_of_2

# One program per (V tile, sequence x head) holds a [K, BV] fp32 slice of the state, at most DECODE_TILE
# elements. With many programs (large batches) two warps a program (128 state elements a thread) keep
# more programs resident per SM than four or eight, which is what a pure read-modify-write of the state
# needs: at B = 64 on an H200, 0.046 ms (K = V = 128) and 0.080 ms (K = 256, V = 512) against
# 0.059 / 0.090 ms with 8 warps. A small grid (batch 1: a few dozen programs) is latency bound instead
# and wants the most threads per program.
DECODE_TILE = 8192
DECODE_MAX_BV = 64
DECODE_WARPS = 2
DECODE_MANY_PROGRAMS = 512  # grids at least this large take DECODE_WARPS; smaller ones 4 or 8 warps


@triton.jit
def recurrent_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    o_ptr,
    h0_ptr,
    ht_ptr,
    cu_ptr,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_H0: tl.constexpr,
):
    # torch.compile (inductor) passes a float argument as fp64, which would turn the fp32 tiles it scales into fp64
    scale = tl.cast(scale, tl.float32)
    i_v, i_sh = tl.program_id(0), tl.program_id(1)
    i_s, i_h = i_sh // H, i_sh % H
    bos = tl.load(cu_ptr + i_s).to(tl.int64)
    eos = tl.load(cu_ptr + i_s + 1).to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    kv_off = (i_s * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        state = tl.load(h0_ptr + kv_off, mask=m_kv, other=0.0).to(tl.float32)
    for t in range(bos, eos):
        qq = tl.load(q_ptr + (t * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        kk = tl.load(k_ptr + (t * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        gg = tl.load(g_ptr + (t * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        vv = tl.load(v_ptr + (t * H + i_h) * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        state = state * tl.exp(gg)[:, None] + kk[:, None] * vv[None, :]
        oo = tl.sum(state * qq[:, None], axis=0) * scale
        tl.store(o_ptr + (t * H + i_h) * V + o_v, oo.to(o_ptr.dtype.element_ty), mask=m_v)
    # The state is read once above and written once here, by the program owning this tile, so
    # ht may alias h0 (an in-place update).
    tl.store(ht_ptr + kv_off, state, mask=m_kv)


def fused_recurrent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float,
    cu_seqlens: Tensor,
    h0: Tensor | None,
    out_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Launch :func:`recurrent_kernel` on packed inputs (``[TT, H, *]``) with int32 ``cu_seqlens``.

    Returns ``o`` ``[TT, H, V]`` in v's dtype and the final state ``[N, H, K, V]`` fp32, written to
    ``out_state`` when given (which may be ``h0`` itself for an in-place update).
    """
    _, H, K = q.shape
    V = v.shape[-1]
    N = cu_seqlens.numel() - 1
    BK = max(16, triton_next_power_of_2(K))
    BV = max(16, min(DECODE_MAX_BV, triton_next_power_of_2(V), DECODE_TILE // BK))
    o = torch.empty_like(v)
    ht = out_state if out_state is not None else q.new_empty(N, H, K, V, dtype=torch.float32)
    grid = (triton.cdiv(V, BV), N * H)
    many = grid[0] * grid[1] >= DECODE_MANY_PROGRAMS
    recurrent_kernel[grid](
        q,
        k,
        v,
        g,
        o,
        h0 if h0 is not None else ht,
        ht,
        cu_seqlens,
        scale,
        H=H,
        K=K,
        V=V,
        BK=BK,
        BV=BV,
        HAS_H0=h0 is not None,
        num_warps=DECODE_WARPS if many else (4 if BK * BV <= 4096 else 8),
    )
    return o, ht
