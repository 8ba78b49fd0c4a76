"""Backward kernels of chunkwise GLA (the math is in the package docstring).

Inputs are the forward's (packed, see :mod:`.common`) plus ``do`` ``[TT, H, V]`` and the gradient of the
final state ``dht`` ``[N, H, K, V]`` (or None). The chunk states ``h`` ``[NT + N, H, K, V]`` and the
intra-chunk attention ``A`` ``[TT, H, 64]`` are recomputed by the forward kernels, not saved.
Intermediates: ``dh`` ``[NT, H, K, V]`` fp32 (gradient w.r.t. the state at the *end* of chunk ``n``),
``dA`` ``[TT, H, 64]`` fp32 (``do_i . v_j``, causal), ``dq``/``dk`` intra-chunk parts ``[TT, H, K]`` fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .chunk_fwd import chunk_span
from .common import CHUNK, G_FLOOR, SUB_CHUNK, SeqInfo, block_size, num_warps_for


@triton.jit
def state_grads_kernel(
    q_ptr,
    g_ptr,
    do_ptr,
    dht_ptr,
    dh_ptr,
    dh0_ptr,
    cu_ptr,
    chunk_off_ptr,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_DHT: tl.constexpr,
    HAS_DH0: tl.constexpr,
    PREC: tl.constexpr,
    FLOOR: tl.constexpr,
):
    """Backward state recurrence, last chunk first, one program per (K tile, V tile, sequence x head).

    ``dH_c = diag(exp(b_last)) dH_{c+1} + scale (q * exp(b))^T do``; stores ``dh[n] = dH_{c+1}`` (the
    gradient w.r.t. the state after chunk ``n``) and ``dh0 = dH_0`` (w.r.t. the initial state).
    """
    i_k, i_v, i_sh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_s, i_h = i_sh // H, i_sh % H
    bos = tl.load(cu_ptr + i_s).to(tl.int64)
    eos = tl.load(cu_ptr + i_s + 1).to(tl.int64)
    n_chunks = tl.cdiv(eos - bos, BT)
    n0 = tl.load(chunk_off_ptr + i_s).to(tl.int64)

    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_t = tl.arange(0, BT)
    m_kv = (o_k[:, None] < K) & (o_v[None, :] < V)
    kv_off = o_k[:, None] * V + o_v[None, :]

    dstate = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        dstate = tl.load(dht_ptr + (i_s * H + i_h) * K * V + kv_off, mask=m_kv, other=0.0).to(tl.float32)
    for r in range(0, n_chunks):
        c = n_chunks - 1 - r
        tl.store(dh_ptr + ((n0 + c) * H + i_h) * K * V + kv_off, dstate, mask=m_kv)
        t = bos + c * BT + o_t
        m_tk = (t[:, None] < eos) & (o_k[None, :] < K)
        m_tv = (t[:, None] < eos) & (o_v[None, :] < V)
        qq = tl.load(q_ptr + (t[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        gg = tl.load(g_ptr + (t[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + (t[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        gg = tl.maximum(gg, FLOOR)
        qd = qq * tl.exp(tl.cumsum(gg, axis=0))
        dstate = dstate * tl.exp(tl.sum(gg, axis=0))[:, None] + scale * tl.dot(
            tl.trans(qd), do, input_precision=PREC
        )
    if HAS_DH0:
        tl.store(dh0_ptr + (i_s * H + i_h) * K * V + kv_off, dstate, mask=m_kv)


@triton.jit
def attention_grad_kernel(
    do_ptr,
    v_ptr,
    da_ptr,
    chunk_idx_ptr,
    cu_ptr,
    H: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
):
    """``dA[i, j] = do_i . v_j`` for ``j <= i`` in the chunk, else 0; one program per (chunk, head)."""
    i_n, i_h = tl.program_id(0), tl.program_id(1)
    i_s, i_c, bos, eos = chunk_span(chunk_idx_ptr, cu_ptr, i_n)
    o_t = tl.arange(0, BT)
    t = bos + i_c * BT + o_t
    m_t = t < eos
    acc = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v[None, :] < V)
        do = tl.load(do_ptr + (t[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        vv = tl.load(v_ptr + (t[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        acc += tl.dot(do, tl.trans(vv), input_precision=PREC)
    acc = tl.where(o_t[:, None] >= o_t[None, :], acc, 0.0)
    tl.store(da_ptr + (t[:, None] * H + i_h) * BT + o_t[None, :], acc, mask=m_t[:, None])


@triton.jit
def value_grad_kernel(
    k_ptr,
    g_ptr,
    a_ptr,
    do_ptr,
    dh_ptr,
    dv_ptr,
    chunk_idx_ptr,
    cu_ptr,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
    FLOOR: tl.constexpr,
):
    """``dv = A^T do + (k * exp(b_last - b)) dh[n]``; one program per (V tile, chunk, head)."""
    i_v, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_s, i_c, bos, eos = chunk_span(chunk_idx_ptr, cu_ptr, i_n)
    o_t = tl.arange(0, BT)
    t = bos + i_c * BT + o_t
    m_t = t < eos
    o_v = i_v * BV + tl.arange(0, BV)
    m_tv = m_t[:, None] & (o_v[None, :] < V)

    aa = tl.load(a_ptr + (t[:, None] * H + i_h) * BT + o_t[None, :], mask=m_t[:, None], other=0.0)
    do = tl.load(do_ptr + (t[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
    acc = tl.dot(tl.trans(aa), do, input_precision=PREC)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        kk = tl.load(k_ptr + (t[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        gg = tl.load(g_ptr + (t[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        gg = tl.maximum(gg, FLOOR)
        kd = kk * tl.exp(tl.sum(gg, axis=0)[None, :] - tl.cumsum(gg, axis=0))
        dhs = tl.load(
            dh_ptr + (i_n.to(tl.int64) * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :],
            mask=m_k[:, None] & (o_v[None, :] < V),
            other=0.0,
        )
        acc += tl.dot(kd, dhs, input_precision=PREC)
    tl.store(dv_ptr + (t[:, None] * H + i_h) * V + o_v[None, :], acc.to(dv_ptr.dtype.element_ty), mask=m_tv)


@triton.jit
def intra_qk_grad_kernel(
    q_ptr,
    k_ptr,
    g_ptr,
    da_ptr,
    dq_ptr,
    dk_ptr,
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
    """Intra-chunk parts of dq and dk for one sub-chunk ``I``; grid (K tiles, NT * NC, H).

    ``dq_i = scale sum_{j <= i} dA_ij k_j exp(b_i - b_j)``, ``dk_j = scale sum_{i >= j} dA_ij q_i
    exp(b_i - b_j)``. Other sub-chunks: tl.dot with the decay split at a sub-chunk boundary (both
    factors exp(<= 0)); the diagonal block pairwise in log space, one row/column at a time.
    """
    NC: tl.constexpr = BT // BC
    i_k, i_ni, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_i = i_ni // NC, i_ni % NC
    i_s, i_c, bos, eos = chunk_span(chunk_idx_ptr, cu_ptr, i_n)
    t0 = bos + i_c * BT
    n_sub = tl.minimum(tl.cdiv(eos - t0, BC), NC)  # sub-chunks holding at least one token
    o_c = tl.arange(0, BC)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    ti = t0 + i_i * BC + o_c
    m_i = ti < eos
    m_ik = m_i[:, None] & m_k[None, :]
    gi = tl.load(g_ptr + (ti[:, None] * H + i_h) * K + o_k[None, :], mask=m_ik, other=0.0).to(tl.float32)
    gi = tl.maximum(gi, FLOOR)
    b_i = tl.cumsum(gi, axis=0)  # gates from the start of sub-chunk I to row i, inclusive
    tot_i = tl.sum(gi, axis=0)
    after_i = tot_i[None, :] - b_i  # gates after row i within sub-chunk I

    dq = tl.zeros([BC, BK], dtype=tl.float32)
    dk = tl.zeros([BC, BK], dtype=tl.float32)
    # Earlier key sub-chunks J = I-1, ..., 0; mid = gates of the whole sub-chunks between J and I.
    mid = tl.zeros([BK], dtype=tl.float32)
    for r in range(0, i_i):
        i_j = i_i - 1 - r
        tj = t0 + i_j * BC + o_c
        m_jk = (tj[:, None] < eos) & m_k[None, :]
        kj = tl.load(k_ptr + (tj[:, None] * H + i_h) * K + o_k[None, :], mask=m_jk, other=0.0).to(tl.float32)
        gj = tl.load(g_ptr + (tj[:, None] * H + i_h) * K + o_k[None, :], mask=m_jk, other=0.0).to(tl.float32)
        gj = tl.maximum(gj, FLOOR)
        tot_j = tl.sum(gj, axis=0)
        kd = kj * tl.exp(tot_j[None, :] - tl.cumsum(gj, axis=0) + mid[None, :])
        da = tl.load(
            da_ptr + (ti[:, None] * H + i_h) * BT + i_j * BC + o_c[None, :], mask=m_i[:, None], other=0.0
        )
        dq += tl.dot(da, kd, input_precision=PREC)
        mid += tot_j
    dq = dq * tl.exp(b_i)
    # Later query sub-chunks L = I+1, ..., n_sub-1; mid = gates of the whole sub-chunks between I and L.
    mid = tl.zeros([BK], dtype=tl.float32)
    for i_l in range(i_i + 1, n_sub):
        t_l = t0 + i_l * BC + o_c
        m_l = t_l < eos
        m_lk = m_l[:, None] & m_k[None, :]
        ql = tl.load(q_ptr + (t_l[:, None] * H + i_h) * K + o_k[None, :], mask=m_lk, other=0.0).to(tl.float32)
        gl = tl.load(g_ptr + (t_l[:, None] * H + i_h) * K + o_k[None, :], mask=m_lk, other=0.0).to(tl.float32)
        gl = tl.maximum(gl, FLOOR)
        qd = ql * tl.exp(tl.cumsum(gl, axis=0) + mid[None, :])
        da = tl.load(
            da_ptr + (t_l[:, None] * H + i_h) * BT + i_i * BC + o_c[None, :], mask=m_l[:, None], other=0.0
        )
        dk += tl.dot(tl.trans(da), qd, input_precision=PREC)
        mid += tl.sum(gl, axis=0)
    dk = dk * tl.exp(after_i)
    # Diagonal block: row/column j of it per step, decays as segment sums over (j, i] of sub-chunk I.
    for j in range(0, BC):
        tj = t0 + i_i * BC + j + tl.zeros([BK], dtype=tl.int64)  # token j, as a vector for the mask
        m_j = (tj < eos) & m_k
        qj = tl.load(q_ptr + (tj * H + i_h) * K + o_k, mask=m_j, other=0.0).to(tl.float32)
        kj = tl.load(k_ptr + (tj * H + i_h) * K + o_k, mask=m_j, other=0.0).to(tl.float32)
        bj = tl.sum(tl.where(o_c[:, None] == j, b_i, 0.0), axis=0)
        tjc = t0 + i_i * BC + j + tl.zeros([BC], dtype=tl.int64)
        # dA[:, j] (rows i of I) and dA[j, :] (columns of I), both masked to the causal part below.
        da_col = tl.load(da_ptr + (ti * H + i_h) * BT + i_i * BC + j, mask=m_i, other=0.0)
        da_row = tl.load(da_ptr + (tjc * H + i_h) * BT + i_i * BC + o_c, mask=tjc < eos, other=0.0)
        lower = o_c[:, None] >= j  # rows i >= j
        upper = o_c[:, None] <= j  # rows j' <= j
        dq += tl.where(
            lower, da_col[:, None] * kj[None, :] * tl.exp(tl.where(lower, b_i - bj[None, :], 0.0)), 0.0
        )
        dk += tl.where(
            upper, da_row[:, None] * qj[None, :] * tl.exp(tl.where(upper, bj[None, :] - b_i, 0.0)), 0.0
        )
    tl.store(dq_ptr + (ti[:, None] * H + i_h) * K + o_k[None, :], dq * scale, mask=m_ik)
    tl.store(dk_ptr + (ti[:, None] * H + i_h) * K + o_k[None, :], dk * scale, mask=m_ik)


@triton.jit
def qkg_grad_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    h_ptr,
    do_ptr,
    dh_ptr,
    dq_ptr,
    dk_ptr,
    dg_ptr,
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
    """Adds the inter-chunk parts to dq, dk (in place, fp32) and forms dg; grid (K tiles, NT, H).

    ``dq += scale exp(b) (do H_c^T)``, ``dk += exp(b_last - b) (v dh[n]^T)``,
    ``dg = revcumsum_chunk(q dq - k dk) + sum_v H_{c+1} * dh[n]``.
    """
    i_k, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_s, i_c, bos, eos = chunk_span(chunk_idx_ptr, cu_ptr, i_n)
    o_t = tl.arange(0, BT)
    t = bos + i_c * BT + o_t
    m_t = t < eos
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    slot = i_n + i_s

    dq_h = tl.zeros([BT, BK], dtype=tl.float32)
    dk_h = tl.zeros([BT, BK], dtype=tl.float32)
    g_end = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        m_kv = m_k[:, None] & m_v[None, :]
        kv_off = o_k[:, None] * V + o_v[None, :]
        do = tl.load(do_ptr + (t[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        vv = tl.load(v_ptr + (t[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        h_start = tl.load(h_ptr + (slot * H + i_h) * K * V + kv_off, mask=m_kv, other=0.0)
        h_end = tl.load(h_ptr + ((slot + 1) * H + i_h) * K * V + kv_off, mask=m_kv, other=0.0)
        dhs = tl.load(dh_ptr + (i_n.to(tl.int64) * H + i_h) * K * V + kv_off, mask=m_kv, other=0.0)
        dq_h += tl.dot(do, tl.trans(h_start), input_precision=PREC)
        dk_h += tl.dot(vv, tl.trans(dhs), input_precision=PREC)
        g_end += tl.sum(h_end * dhs, axis=1)
    p_qk = (t[:, None] * H + i_h) * K + o_k[None, :]
    qq = tl.load(q_ptr + p_qk, mask=m_tk, other=0.0).to(tl.float32)
    kk = tl.load(k_ptr + p_qk, mask=m_tk, other=0.0).to(tl.float32)
    g_raw = tl.load(g_ptr + p_qk, mask=m_tk, other=0.0).to(tl.float32)
    gg = tl.maximum(g_raw, FLOOR)
    b = tl.cumsum(gg, axis=0)
    dq = tl.load(dq_ptr + p_qk, mask=m_tk, other=0.0) + scale * tl.exp(b) * dq_h
    dk = tl.load(dk_ptr + p_qk, mask=m_tk, other=0.0) + tl.exp(tl.sum(gg, axis=0)[None, :] - b) * dk_h
    dg = tl.cumsum(qq * dq - kk * dk, axis=0, reverse=True) + g_end[None, :]
    dg = tl.where(g_raw >= FLOOR, dg, 0.0)  # the clamp's gradient: 0 below the floor
    tl.store(dq_ptr + p_qk, dq, mask=m_tk)
    tl.store(dk_ptr + p_qk, dk, mask=m_tk)
    tl.store(dg_ptr + p_qk, dg.to(dg_ptr.dtype.element_ty), mask=m_tk)


def chunk_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    h: Tensor,
    a: Tensor,
    do: Tensor,
    dht: Tensor | None,
    scale: float,
    info: SeqInfo,
    prec: str,
    need_dh0: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """All gradients of chunkwise GLA from the recomputed ``h`` and ``A``.

    Returns ``dq, dk`` ``[TT, H, K]`` fp32, ``dv`` ``[TT, H, V]`` in v's dtype, ``dg`` ``[TT, H, K]`` in
    g's dtype and ``dh0`` ``[N, H, K, V]`` fp32 (None unless ``need_dh0``).
    """
    TT, H, K = q.shape
    V = v.shape[-1]
    BK, BV = block_size(K), block_size(V)
    NK, NV = triton.cdiv(K, BK), triton.cdiv(V, BV)
    NT, N = info.num_chunks, info.num_seqs
    common = dict(PREC=prec, num_stages=2)

    dh = q.new_empty(NT, H, K, V, dtype=torch.float32)
    dh0 = q.new_empty(N, H, K, V, dtype=torch.float32) if need_dh0 else None
    state_grads_kernel[(NK, NV, N * H)](
        q,
        g,
        do,
        dht if dht is not None else dh,
        dh,
        dh0 if dh0 is not None else dh,
        info.cu_seqlens,
        info.chunk_offsets,
        scale,
        H=H,
        K=K,
        V=V,
        BT=CHUNK,
        BK=BK,
        BV=BV,
        HAS_DHT=dht is not None,
        HAS_DH0=need_dh0,
        FLOOR=G_FLOOR,
        num_warps=num_warps_for(BK, BV),
        **common,
    )
    da = q.new_empty(TT, H, CHUNK, dtype=torch.float32)
    attention_grad_kernel[(NT, H)](
        do,
        v,
        da,
        info.chunk_indices,
        info.cu_seqlens,
        H=H,
        V=V,
        BT=CHUNK,
        BV=BV,
        num_warps=num_warps_for(CHUNK, BV),
        **common,
    )
    dv = torch.empty_like(v)
    value_grad_kernel[(NV, NT, H)](
        k,
        g,
        a,
        do,
        dh,
        dv,
        info.chunk_indices,
        info.cu_seqlens,
        H=H,
        K=K,
        V=V,
        BT=CHUNK,
        BK=BK,
        BV=BV,
        FLOOR=G_FLOOR,
        num_warps=num_warps_for(CHUNK, BV),
        **common,
    )
    dq = q.new_empty(TT, H, K, dtype=torch.float32)
    dk = q.new_empty(TT, H, K, dtype=torch.float32)
    nc = CHUNK // SUB_CHUNK
    intra_qk_grad_kernel[(NK, NT * nc, H)](
        q,
        k,
        g,
        da,
        dq,
        dk,
        info.chunk_indices,
        info.cu_seqlens,
        scale,
        H=H,
        K=K,
        BT=CHUNK,
        BC=SUB_CHUNK,
        BK=BK,
        FLOOR=G_FLOOR,
        num_warps=2 if BK <= 32 else 4,
        **common,
    )
    dg = torch.empty_like(g)
    qkg_grad_kernel[(NK, NT, H)](
        q,
        k,
        v,
        g,
        h,
        do,
        dh,
        dq,
        dk,
        dg,
        info.chunk_indices,
        info.cu_seqlens,
        scale,
        H=H,
        K=K,
        V=V,
        BT=CHUNK,
        BK=BK,
        BV=BV,
        FLOOR=G_FLOOR,
        num_warps=num_warps_for(CHUNK, BK),
        **common,
    )
    return dq, dk, dv, dg, dh0
