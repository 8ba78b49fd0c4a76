"""Forward kernels of chunkwise GLA: chunk-boundary states, intra-chunk attention, outputs.

Layouts (packed, see :mod:`.common`): ``q, k, g`` ``[TT, H, K]``, ``v`` ``[TT, H, V]`` with
``TT = B * T`` (or the packed length), contiguous; ``h`` ``[NT + N, H, K, V]`` fp32;
``A`` ``[TT, H, 64]`` fp32 (row ``t``, column ``j`` = key ``j`` of ``t``'s chunk, already scaled).

All tl.dot operands are fp32 (``PREC`` = "tf32" for 16-bit inputs, "ieee" for fp32 inputs); every
exponent passed to exp is ``<= 0`` (see the package docstring for the decomposition).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import CHUNK, G_FLOOR, SUB_CHUNK, SeqInfo, block_size, num_warps_for


@triton.jit
def chunk_span(chunk_idx_ptr, cu_ptr, i_n):
    """Global chunk ``i_n`` -> (its sequence, its index there, the sequence's first token, its end), int64."""
    i_s = tl.load(chunk_idx_ptr + 2 * i_n).to(tl.int64)
    i_c = tl.load(chunk_idx_ptr + 2 * i_n + 1).to(tl.int64)
    bos = tl.load(cu_ptr + i_s).to(tl.int64)
    eos = tl.load(cu_ptr + i_s + 1).to(tl.int64)
    return i_s, i_c, bos, eos


@triton.jit
def chunk_states_kernel(
    k_ptr,
    v_ptr,
    g_ptr,
    h0_ptr,
    h_ptr,
    cu_ptr,
    chunk_off_ptr,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_H0: tl.constexpr,
    PREC: tl.constexpr,
    FLOOR: tl.constexpr,
):
    """State before every chunk and after the last, one program per (K tile, V tile, sequence x head).

    ``H_{c+1} = diag(exp(b_last)) H_c + (k * exp(b_last - b))^T v``, ``b`` = inclusive cumsum of g in
    the chunk, ``b_last`` its total; sequential over the sequence's chunks.
    """
    i_k, i_v, i_sh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_s, i_h = i_sh // H, i_sh % H
    bos = tl.load(cu_ptr + i_s).to(tl.int64)
    eos = tl.load(cu_ptr + i_s + 1).to(tl.int64)
    n_chunks = tl.cdiv(eos - bos, BT)
    slot0 = tl.load(chunk_off_ptr + i_s).to(tl.int64) + i_s

    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_t = tl.arange(0, BT)
    m_kv = (o_k[:, None] < K) & (o_v[None, :] < V)
    kv_off = o_k[:, None] * V + o_v[None, :]

    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        state = tl.load(h0_ptr + (i_s * H + i_h) * K * V + kv_off, mask=m_kv, other=0.0).to(tl.float32)
    for c in range(0, n_chunks):
        tl.store(h_ptr + ((slot0 + c) * H + i_h) * K * V + kv_off, state, mask=m_kv)
        t = bos + c * BT + o_t
        m_tk = (t[:, None] < eos) & (o_k[None, :] < K)
        m_tv = (t[:, None] < eos) & (o_v[None, :] < V)
        kk = tl.load(k_ptr + (t[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        gg = tl.load(g_ptr + (t[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        vv = tl.load(v_ptr + (t[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        gg = tl.maximum(gg, FLOOR)
        b = tl.cumsum(gg, axis=0)
        b_last = tl.sum(gg, axis=0)
        kd = kk * tl.exp(b_last[None, :] - b)
        state = state * tl.exp(b_last)[:, None] + tl.dot(tl.trans(kd), vv, input_precision=PREC)
    tl.store(h_ptr + ((slot0 + n_chunks) * H + i_h) * K * V + kv_off, state, mask=m_kv)


@triton.jit
def intra_attention_kernel(
    q_ptr,
    k_ptr,
    g_ptr,
    a_ptr,
    chunk_idx_ptr,
    cu_ptr,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    PREC: tl.constexpr,
    FLOOR: tl.constexpr,
):
    """One 16 x 16 block (query sub-chunk I, key sub-chunk J) of a chunk's scaled attention matrix.

    Grid (NT, NC * NC, H). ``J > I``: zeros. ``J < I``: one tl.dot, decay factored about the end of
    sub-chunk ``I - 1``. ``J == I``: pairwise in log space, one key column at a time.
    """
    NC: tl.constexpr = BT // BC
    i_n, i_ij, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_i, i_j = i_ij // NC, i_ij % NC
    i_s, i_c, bos, eos = chunk_span(chunk_idx_ptr, cu_ptr, i_n)
    t0 = bos + i_c * BT
    o_c = tl.arange(0, BC)
    tq = t0 + i_i * BC + o_c
    tk = t0 + i_j * BC + o_c
    m_q = tq < eos
    m_kt = tk < eos
    p_a = a_ptr + (tq[:, None] * H + i_h) * BT + i_j * BC + o_c[None, :]

    acc = tl.zeros([BC, BC], dtype=tl.float32)
    if i_j < i_i:
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            m_qk = m_q[:, None] & m_k[None, :]
            m_kk = m_kt[:, None] & m_k[None, :]
            qq = tl.load(q_ptr + (tq[:, None] * H + i_h) * K + o_k[None, :], mask=m_qk, other=0.0).to(
                tl.float32
            )
            gq = tl.load(g_ptr + (tq[:, None] * H + i_h) * K + o_k[None, :], mask=m_qk, other=0.0).to(
                tl.float32
            )
            kk = tl.load(k_ptr + (tk[:, None] * H + i_h) * K + o_k[None, :], mask=m_kk, other=0.0).to(
                tl.float32
            )
            gk = tl.load(g_ptr + (tk[:, None] * H + i_h) * K + o_k[None, :], mask=m_kk, other=0.0).to(
                tl.float32
            )
            gq = tl.maximum(gq, FLOOR)
            gk = tl.maximum(gk, FLOOR)
            # Gates of the whole sub-chunks strictly between J and I.
            mid = tl.zeros([BK], dtype=tl.float32)
            for i_l in range(i_j + 1, i_i):
                t_l = t0 + i_l * BC + o_c
                m_l = (t_l[:, None] < eos) & m_k[None, :]
                gl = tl.load(g_ptr + (t_l[:, None] * H + i_h) * K + o_k[None, :], mask=m_l, other=0.0)
                mid += tl.sum(tl.maximum(gl.to(tl.float32), FLOOR), axis=0)
            after_j = tl.sum(gk, axis=0)[None, :] - tl.cumsum(gk, axis=0)  # gates after key j in J
            qd = qq * tl.exp(tl.cumsum(gq, axis=0))  # decay from the end of sub-chunk I-1 to query i
            kd = kk * tl.exp(after_j + mid[None, :])  # decay from key j to the end of sub-chunk I-1
            acc += tl.dot(qd, tl.trans(kd), input_precision=PREC)
    elif i_j == i_i:
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            m_qk = m_q[:, None] & m_k[None, :]
            qq = tl.load(q_ptr + (tq[:, None] * H + i_h) * K + o_k[None, :], mask=m_qk, other=0.0).to(
                tl.float32
            )
            gq = tl.load(g_ptr + (tq[:, None] * H + i_h) * K + o_k[None, :], mask=m_qk, other=0.0).to(
                tl.float32
            )
            bq = tl.cumsum(tl.maximum(gq, FLOOR), axis=0)
            for j in range(0, BC):
                tj = t0 + i_i * BC + j + tl.zeros([BK], dtype=tl.int64)  # token j, as a vector for the mask
                kj = tl.load(k_ptr + (tj * H + i_h) * K + o_k, mask=(tj < eos) & m_k, other=0.0).to(
                    tl.float32
                )
                bj = tl.sum(tl.where(o_c[:, None] == j, bq, 0.0), axis=0)
                causal = o_c[:, None] >= j
                # Segment sum over (j, i]; zeroed above the diagonal before exp so nothing overflows.
                seg = tl.where(causal, bq - bj[None, :], 0.0)
                col = tl.sum(tl.where(causal, qq * kj[None, :] * tl.exp(seg), 0.0), axis=1)
                acc += tl.where(o_c[None, :] == j, col[:, None], 0.0)
    tl.store(p_a, acc * scale, mask=m_q[:, None])


@triton.jit
def output_kernel(
    q_ptr,
    v_ptr,
    g_ptr,
    h_ptr,
    a_ptr,
    o_ptr,
    chunk_idx_ptr,
    cu_ptr,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
    FLOOR: tl.constexpr,
):
    """``o = scale * (q * exp(b)) @ H_chunk + A @ v`` for one (V tile, chunk, head)."""
    i_v, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_s, i_c, bos, eos = chunk_span(chunk_idx_ptr, cu_ptr, i_n)
    o_t = tl.arange(0, BT)
    t = bos + i_c * BT + o_t
    m_t = t < eos
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    slot = i_n + i_s

    acc = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        qq = tl.load(q_ptr + (t[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        gg = tl.load(g_ptr + (t[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        b = tl.cumsum(tl.maximum(gg, FLOOR), axis=0)
        hs = tl.load(
            h_ptr + (slot * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :],
            mask=m_k[:, None] & m_v[None, :],
            other=0.0,
        )
        acc += tl.dot(qq * tl.exp(b), hs, input_precision=PREC)
    aa = tl.load(a_ptr + (t[:, None] * H + i_h) * BT + o_t[None, :], mask=m_t[:, None], other=0.0)
    vv = tl.load(
        v_ptr + (t[:, None] * H + i_h) * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0
    )
    acc = acc * scale + tl.dot(aa, vv.to(tl.float32), input_precision=PREC)
    tl.store(
        o_ptr + (t[:, None] * H + i_h) * V + o_v[None, :],
        acc.to(o_ptr.dtype.element_ty),
        mask=m_t[:, None] & m_v[None, :],
    )


def chunk_states(k: Tensor, v: Tensor, g: Tensor, h0: Tensor | None, info: SeqInfo, prec: str) -> Tensor:
    """Launch :func:`chunk_states_kernel`; returns ``h`` ``[NT + N, H, K, V]`` fp32 (see :mod:`.common`)."""
    _, H, K = k.shape
    V = v.shape[-1]
    BK, BV = block_size(K), block_size(V)
    h = k.new_empty(info.num_chunks + info.num_seqs, H, K, V, dtype=torch.float32)
    grid = (triton.cdiv(K, BK), triton.cdiv(V, BV), info.num_seqs * H)
    chunk_states_kernel[grid](
        k,
        v,
        g,
        h0 if h0 is not None else h,
        h,
        info.cu_seqlens,
        info.chunk_offsets,
        H=H,
        K=K,
        V=V,
        BT=CHUNK,
        BK=BK,
        BV=BV,
        HAS_H0=h0 is not None,
        PREC=prec,
        FLOOR=G_FLOOR,
        num_warps=num_warps_for(BK, BV),
        num_stages=2,
    )
    return h


def intra_attention(q: Tensor, k: Tensor, g: Tensor, scale: float, info: SeqInfo, prec: str) -> Tensor:
    """Launch :func:`intra_attention_kernel`; returns ``A`` ``[TT, H, 64]`` fp32."""
    TT, H, K = q.shape
    BK = block_size(K)
    a = q.new_empty(TT, H, CHUNK, dtype=torch.float32)
    nc = CHUNK // SUB_CHUNK
    intra_attention_kernel[(info.num_chunks, nc * nc, H)](
        q,
        k,
        g,
        a,
        info.chunk_indices,
        info.cu_seqlens,
        scale,
        H=H,
        K=K,
        BT=CHUNK,
        BC=SUB_CHUNK,
        BK=BK,
        PREC=prec,
        FLOOR=G_FLOOR,
        num_warps=2 if BK <= 32 else 4,
        num_stages=2,
    )
    return a


def chunk_output(
    q: Tensor, v: Tensor, g: Tensor, h: Tensor, a: Tensor, scale: float, info: SeqInfo, prec: str
) -> Tensor:
    """Launch :func:`output_kernel`; returns ``o`` ``[TT, H, V]`` in ``v``'s dtype."""
    TT, H, K = q.shape
    V = v.shape[-1]
    BK, BV = block_size(K), block_size(V)
    o = torch.empty_like(v)
    output_kernel[(triton.cdiv(V, BV), info.num_chunks, H)](
        q,
        v,
        g,
        h,
        a,
        o,
        info.chunk_indices,
        info.cu_seqlens,
        scale,
        H=H,
        K=K,
        V=V,
        BT=CHUNK,
        BK=BK,
        BV=BV,
        PREC=prec,
        FLOOR=G_FLOOR,
        num_warps=num_warps_for(CHUNK, BV),
        num_stages=2,
    )
    return o
