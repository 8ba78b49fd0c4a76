"""Backward kernels of chunkwise GLA (the math is in the package docstring).

Inputs are the forward's (packed, see :mod:`.common`) plus ``do`` ``[TT, H, V]`` and the gradient of the
final state ``dht`` ``[N, H, K, V]`` (or None). The intra-chunk attention ``A`` ``[TT, H, 64]`` is saved
by the forward, and so are the gate cumsums ``b`` of an fp32 ``g`` (other ``g`` get theirs recomputed); the decayed
operands ``qd``, ``kd`` and decays (:class:`.Prepared`)
and the chunk states ``h`` ``[NT + N, H, K, V]`` are recomputed.
Intermediate: ``dh`` ``[NT, H, K, V]`` in ``KernelDtypes.dstates``, the gradient w.r.t. the state at the *end*
of chunk ``n``.

Three kernels: the reverse state recurrence (``state_grads_kernel``; two launches when segmented), ``dv``
(``value_grad_kernel``)
and one kernel for ``dq``, ``dk`` and ``dg`` together (``qkg_grad_kernel``, with ``qkg_grad_strong_kernel`` for the
tiles of strong decay it queues), which also forms ``dA = do v^T`` itself from the ``do`` and ``v`` tiles it already
loads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import common
from .chunk_fwd import (
    Prepared,
    StatePlan,
    as_block,
    carried_state,
    chunk_rows,
    chunk_span,
    decay_bounded,
    diagonal_pairs,
    launch_state_pass,
    load_cumsum,
    queue_tile,
    row_of,
    state_operands,
    store_segment,
    strong_programs,
)
from .common import CHUNK, G_FLOOR, SUB_CHUNK, KernelDtypes, SeqInfo, block_size


@triton.jit
def state_grads_kernel(
    q_ptr,
    do_ptr,
    b_ptr,
    decay_ptr,
    dht_ptr,
    dh_ptr,
    dh0_ptr,
    scale,
    seg_end_ptr,
    seg_decay_ptr,
    cu_ptr,
    chunk_off_ptr,
    nseg,
    seg_chunks,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    SEGMENTED: tl.constexpr,
    LOCAL: tl.constexpr,
    PREPARED: tl.constexpr,
    HAS_DHT: tl.constexpr,
    HAS_DH0: tl.constexpr,
    DT: tl.constexpr,
    PREC: tl.constexpr,
):
    """Backward state recurrence, last chunk first; one program per (K tile, V tile, sequence x head x segment).

    ``dH_c = diag(e^{b_C}) dH_{c+1} + scale qd^T do`` (``qd = q e^{b}`` read prepared or formed here, as in
    :func:`.chunk_states_kernel`); stores ``dh[n] = dH_{c+1}`` (the gradient w.r.t. the
    state after chunk ``n``) and ``dh0 = dH_0`` (w.r.t. the initial state, fp32). Segments as in
    :func:`.chunk_states_kernel`, mirrored: ``LOCAL`` walks each segment back from a zero start (``dht`` for
    the last), the second launch carries the later segments' results in.
    """
    # torch.compile (inductor) passes a float argument as fp64, which would turn the fp32 tiles it scales into fp64
    scale = tl.cast(scale, tl.float32)
    i_k, i_v, i_p = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_sh, i_seg = i_p // nseg, i_p % nseg
    i_s, i_h = (i_sh // H).to(tl.int64), i_sh % H  # int64: state offsets reach N * H * K * V
    bos = tl.load(cu_ptr + i_s).to(tl.int64)
    eos = tl.load(cu_ptr + i_s + 1).to(tl.int64)
    n_chunks = tl.cdiv(eos - bos, BT)
    n0 = tl.load(chunk_off_ptr + i_s).to(tl.int64)
    if not SEGMENTED:
        c0, c1 = 0, n_chunks
    else:
        c0 = i_seg * seg_chunks
        c1 = tl.minimum(c0 + seg_chunks, n_chunks)
    live = c0 < n_chunks

    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_kv = m_k[:, None] & (o_v[None, :] < V)
    kv_off = o_k[:, None] * V + o_v[None, :]

    dstate = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:  # into the last segment (segment 0 of an empty sequence)
        first_in = (c1 == n_chunks) & (live | (i_seg == 0))
        dht = tl.load(dht_ptr + (i_s * H + i_h) * K * V + kv_off, mask=m_kv & as_block(first_in, o_k)[:, None],
                      other=0.0)
        dstate = dht.to(tl.float32)
    if SEGMENTED and not LOCAL:
        n_seg = tl.cdiv(n_chunks, seg_chunks)
        dstate = carried_state(dstate, seg_end_ptr, seg_decay_ptr, i_s * nseg + n_seg - 1, -1,
                               tl.where(live, n_seg - 1 - i_seg, 0), i_h, o_k, m_k, kv_off, m_kv, H, K, V)
    seg_dec = tl.full([BK], 1.0, dtype=tl.float32)
    for r in range(0, c1 - c0):
        c = c1 - 1 - r
        if not LOCAL:
            tl.store(dh_ptr + ((n0 + c) * H + i_h) * K * V + kv_off, dstate.to(dh_ptr.dtype.element_ty), mask=m_kv)
        decay, qd, do = state_operands(q_ptr, do_ptr, b_ptr, decay_ptr, n0 + c, bos + c * BT, eos, o_k, m_k, o_v, i_h,
                                       H, K, V, BT, PREPARED, False, DT)
        dstate = dstate * decay[:, None] + scale * tl.dot(tl.trans(qd), do.to(DT), input_precision=PREC)
        if LOCAL:
            seg_dec = seg_dec * decay
    if LOCAL:
        store_segment(dstate, seg_dec, seg_end_ptr, seg_decay_ptr, i_s * nseg + i_seg, live, i_v, i_h, o_k, m_k,
                      kv_off, m_kv, H, K, V)
    elif HAS_DH0:
        tl.store(dh0_ptr + (i_s * H + i_h) * K * V + kv_off, dstate, mask=m_kv & as_block(i_seg == 0, o_k)[:, None])


@triton.jit
def value_grad_kernel(
    k_ptr,
    b_ptr,
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
    DT: tl.constexpr,
    PREC: tl.constexpr,
):
    """``dv = A^T do + (k * exp(b_last - b)) dh[n]``; one program per (V tile, chunk, head). The decayed keys
    are formed here, not read from ``kd`` (see :func:`.output_kernel`)."""
    i_v, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    _, t0, eos = chunk_span(chunk_idx_ptr, cu_ptr, i_n, BT)
    o_t, t, m_t, last = chunk_rows(t0, eos, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_tv = m_t[:, None] & (o_v[None, :] < V)
    aa = tl.load(a_ptr + (t[:, None] * H + i_h) * BT + o_t[None, :], mask=m_t[:, None], other=0.0)
    do = tl.load(do_ptr + (t[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.0)
    acc = tl.dot(tl.trans(aa.to(DT)), do.to(DT), input_precision=PREC)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        kk = tl.load(k_ptr + (t[:, None] * H + i_h) * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b, b_last = load_cumsum(b_ptr, t, m_t, last, o_k, m_k, i_h, H, K)
        kd = (kk.to(tl.float32) * tl.exp(b_last[None, :] - b)).to(DT)
        dhs = tl.load(
            dh_ptr + (i_n.to(tl.int64) * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :],
            mask=m_k[:, None] & (o_v[None, :] < V),
            other=0.0,
        )
        acc += tl.dot(kd, dhs.to(DT), input_precision=PREC)
    tl.store(dv_ptr + (t[:, None] * H + i_h) * V + o_v[None, :], acc.to(dv_ptr.dtype.element_ty), mask=m_tv)


@triton.jit
def inter_chunk_grads(v_ptr, h_ptr, do_ptr, dh_ptr, t, m_t, o_t, slot, i_n, i_h, o_k, m_k, scale, H: tl.constexpr,
                      K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      DT: tl.constexpr, PREC: tl.constexpr):
    """What :func:`qkg_tile` sums over the V tiles for one (K tile, chunk, head): ``do H_c^T`` and
    ``v dH_{c+1}^T`` ``[BT, BK]`` (before their decay factors), the causal ``dA = scale do v^T`` ``[BT, BT]``
    and ``sum_v H_c dH_{c+1}`` ``[BK]``, all fp32."""
    dq = tl.zeros([BT, BK], dtype=tl.float32)
    dk = tl.zeros([BT, BK], dtype=tl.float32)
    da = tl.zeros([BT, BT], dtype=tl.float32)
    cross = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        do = tl.load(do_ptr + (t[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.0).to(DT)
        vv = tl.load(v_ptr + (t[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.0).to(DT)
        kv_off = o_k[:, None] * V + o_v[None, :]
        m_kv = m_k[:, None] & m_v[None, :]
        h_c = tl.load(h_ptr + (slot * H + i_h) * K * V + kv_off, mask=m_kv, other=0.0)
        dh = tl.load(dh_ptr + (i_n.to(tl.int64) * H + i_h) * K * V + kv_off, mask=m_kv, other=0.0)
        da += tl.dot(do, tl.trans(vv), input_precision=PREC)
        dq += tl.dot(do, tl.trans(h_c.to(DT)), input_precision=PREC)
        dk += tl.dot(vv, tl.trans(dh.to(DT)), input_precision=PREC)
        cross += tl.sum(h_c.to(tl.float32) * dh.to(tl.float32), axis=1)
    return dq, dk, tl.where(o_t[:, None] >= o_t[None, :], da, 0.0) * scale, cross


@triton.jit
def qkg_tile(q_ptr, k_ptr, v_ptr, g_ptr, b_ptr, h_ptr, do_ptr, dh_ptr, dq_ptr, dk_ptr, dg_ptr, chunk_idx_ptr, cu_ptr,
             scale, i_k, i_n, i_h, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
             BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
             FLOOR: tl.constexpr, STRONG: tl.constexpr, G_IS_CUMSUM: tl.constexpr):
    """``dq``, ``dk`` and ``dg`` of one (K tile, chunk, head).

    Over the V tiles (:func:`inter_chunk_grads`): ``dA = do v^T``, the inter-chunk parts ``do H_c^T`` and
    ``v dH_{c+1}^T``, and ``sum_v H_c dH_{c+1}``. Then the intra-chunk parts from ``dA``, split as the
    forward's ``A``: one product each where the decay is bounded (``STRONG=False``); otherwise queries of
    sub-chunk ``I`` against earlier keys split at ``r_I``, keys of sub-chunk ``J`` against later queries split
    at ``r_{J+1}`` (the cumsum at ``J``'s last row), and the diagonal blocks pairwise, all four at once.
    Finally ``dg`` from the cancellation-free split in the package docstring, 0 where the gate was clamped.
    """
    # torch.compile (inductor) passes a float argument as fp64, which would turn the fp32 tiles it scales into fp64
    scale = tl.cast(scale, tl.float32)
    NC: tl.constexpr = BT // BC
    i_s, t0, eos = chunk_span(chunk_idx_ptr, cu_ptr, i_n, BT)
    o_t, t, m_t, last = chunk_rows(t0, eos, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    qk_off = (t[:, None] * H + i_h) * K + o_k[None, :]
    dq, dk, da, cross = inter_chunk_grads(v_ptr, h_ptr, do_ptr, dh_ptr, t, m_t, o_t, i_n + i_s, i_n, i_h, o_k,
                                          m_k, scale, H, K, V, BT, BK, BV, DT, PREC)
    qq = tl.load(q_ptr + qk_off, mask=m_tk, other=0.0).to(tl.float32)
    kk = tl.load(k_ptr + qk_off, mask=m_tk, other=0.0).to(tl.float32)
    b, b_last = load_cumsum(b_ptr, t, m_t, last, o_k, m_k, i_h, H, K)
    dq = dq * (scale * tl.exp(b))
    dk = dk * tl.exp(b_last[None, :] - b)
    # dg terms (package docstring): x_rev is reverse-cumsummed over the chunk, x_fwd cumsummed before m.
    x_rev = qq * dq
    x_fwd = kk * dk
    if not STRONG:
        # Bounded decay (see intra_attention_tile): the whole intra-chunk part in two products.
        kd = (kk * tl.exp(-b)).to(DT)
        qd = (qq * tl.exp(b)).to(DT)
        dq_raw = tl.dot(da.to(DT), kd, input_precision=PREC)
        dk_raw = tl.dot(tl.trans(da.to(DT)), qd, input_precision=PREC)
        dq += dq_raw * tl.exp(b)
        dk += dk_raw * tl.exp(-b)
        # q dq - k dk from the rounded factors the products used: then each pair (i, j) enters as the
        # same qd_i dA_ij kd_j with both signs, and pairs inside the reverse cumsum cancel up to the
        # fp32 rounding of the two accumulations (which sum in different orders).
        x_rev += qd.to(tl.float32) * dq_raw - kd.to(tl.float32) * dk_raw
    else:
        sub = o_t // BC
        pos = o_t % BC
        dq_in = tl.zeros([BT, BK], dtype=tl.float32)
        dk_in = tl.zeros([BT, BK], dtype=tl.float32)
        # Off-diagonal sub-chunk blocks; r = cumsum at the last row of sub-chunk i_i - 1.
        for i_i in tl.static_range(1, NC):
            r = row_of(b, o_t, i_i * BC - 1)
            # Queries of sub-chunk i_i against the keys before it.
            kd = kk * tl.exp(tl.where(sub[:, None] < i_i, r[None, :] - b, float("-inf")))
            da_q = tl.where((sub[:, None] == i_i) & (o_t[None, :] < i_i * BC), da, 0.0)
            dq_in += tl.dot(da_q.to(DT), kd.to(DT), input_precision=PREC) * tl.exp(
                tl.where(sub[:, None] == i_i, b - r[None, :], float("-inf"))
            )
            # Keys of sub-chunk i_i - 1 against the queries from sub-chunk i_i on.
            qd = qq * tl.exp(tl.where(sub[:, None] >= i_i, b - r[None, :], float("-inf")))
            da_k = tl.where((o_t[:, None] >= i_i * BC) & (sub[None, :] == i_i - 1), da, 0.0)
            dk_in += tl.dot(tl.trans(da_k.to(DT)), qd.to(DT), input_precision=PREC) * tl.exp(
                tl.where(sub[:, None] == i_i - 1, r[None, :] - b, float("-inf"))
            )

        # Diagonal 16 x 16 blocks: row i pairs with key j = (its sub-chunk start) + jj.
        for jj in range(0, BC):
            j, kj, e = diagonal_pairs(k_ptr, b_ptr, b, b_last, t0, eos, sub, pos, jj, o_k, m_k, i_h, H, K, BC)
            da_ij = tl.sum(tl.where(o_t[None, :] == j[:, None], da, 0.0), axis=1)  # dA[i, j(i)]
            dq_in += da_ij[:, None] * kj * e
            # dk[j] = sum over the rows i of j's sub-chunk of dA[i, j] q_i e_ij: reduce each sub-chunk's
            # 16 rows, then write the sums to rows pos == jj.
            part = tl.sum(tl.reshape(da_ij[:, None] * qq * e, [NC, BC, BK]), axis=1)
            spread = tl.reshape(tl.broadcast_to(part[:, None, :], [NC, BC, BK]), [BT, BK])
            dk_in += tl.where((pos == jj)[:, None], spread, 0.0)
        dq += dq_in
        dk += dk_in
        x_rev += qq * dq_in - kk * dk_in

    tl.store(dq_ptr + qk_off, dq.to(dq_ptr.dtype.element_ty), mask=m_tk)
    tl.store(dk_ptr + qk_off, dk.to(dk_ptr.dtype.element_ty), mask=m_tk)
    dg = tl.sum(x_rev, axis=0)[None, :] - tl.cumsum(x_rev, axis=0) + x_rev
    dg += tl.cumsum(x_fwd, axis=0) - x_fwd + (tl.exp(b_last) * cross)[None, :]
    if G_IS_CUMSUM:
        # Only the cumsums were kept: a clamped gate shows as a step of FLOOR between rows (up to the
        # rounding of the cumsum, far below 0.01 for |b| <= 64 * 100); a gate within 0.01 above the floor
        # also gets 0, instead of a gradient of order e^{-100}.
        b_prev = tl.load(b_ptr + qk_off - H * K, mask=m_tk & (o_t > 0)[:, None], other=0.0)
        dg = tl.where(b - b_prev > FLOOR + 0.01, dg, 0.0)
    else:
        gg = tl.load(g_ptr + qk_off, mask=m_tk, other=0.0).to(tl.float32)
        dg = tl.where(gg >= FLOOR, dg, 0.0)
    tl.store(dg_ptr + qk_off, dg.to(dg_ptr.dtype.element_ty), mask=m_tk)


@triton.jit
def qkg_grad_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    b_ptr,
    h_ptr,
    do_ptr,
    dh_ptr,
    dq_ptr,
    dk_ptr,
    dg_ptr,
    chunk_idx_ptr,
    cu_ptr,
    queue_ptr,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    DT: tl.constexpr,
    PREC: tl.constexpr,
    FLOOR: tl.constexpr,
    MAX_DECAY: tl.constexpr,
    G_IS_CUMSUM: tl.constexpr,
):
    """:func:`qkg_tile` for the tile of this program, grid (K tiles, chunks, heads), where its decay across the
    chunk is bounded (every tile, for gates like the benchmarks' and trained models'); any other tile is queued
    for :func:`qkg_grad_strong_kernel`. As for :func:`.chunk_fwd.intra_attention_kernel`: one kernel holding both
    paths spilled ~690 B per thread at 255 registers and 64-wide K tiles; this kernel spills nothing at K = 128 and
    4 B at K = 256 (Triton 3.6, H100: ``benchmarks/results/2026-12-08_sm90_gla_kernel_resources_s29.log``)."""
    i_k, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if decay_bounded(b_ptr, chunk_idx_ptr, cu_ptr, i_n, i_h, i_k * BK, 1, H, K, BT, BK, MAX_DECAY):
        qkg_tile(q_ptr, k_ptr, v_ptr, g_ptr, b_ptr, h_ptr, do_ptr, dh_ptr, dq_ptr, dk_ptr, dg_ptr, chunk_idx_ptr,
                 cu_ptr, scale, i_k, i_n, i_h, H, K, V, BT, BC, BK, BV, DT, PREC, FLOOR, False, G_IS_CUMSUM)
    else:
        queue_tile(queue_ptr, i_k + tl.num_programs(0) * (i_n + tl.num_programs(1) * i_h))


@triton.jit
def qkg_grad_strong_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    b_ptr,
    h_ptr,
    do_ptr,
    dh_ptr,
    dq_ptr,
    dk_ptr,
    dg_ptr,
    chunk_idx_ptr,
    cu_ptr,
    queue_ptr,
    n_chunks,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    DT: tl.constexpr,
    PREC: tl.constexpr,
    FLOOR: tl.constexpr,
    G_IS_CUMSUM: tl.constexpr,
):
    """:func:`qkg_tile` with the sub-chunk split for the tiles :func:`qkg_grad_kernel` queued; a small grid
    walks the queue."""
    KT: tl.constexpr = (K + BK - 1) // BK
    for w in range(tl.program_id(0), tl.load(queue_ptr), tl.num_programs(0)):
        tile = tl.load(queue_ptr + 1 + w)
        i_k, i_n, i_h = tile % KT, (tile // KT) % n_chunks, tile // KT // n_chunks
        qkg_tile(q_ptr, k_ptr, v_ptr, g_ptr, b_ptr, h_ptr, do_ptr, dh_ptr, dq_ptr, dk_ptr, dg_ptr, chunk_idx_ptr,
                 cu_ptr, scale, i_k, i_n, i_h, H, K, V, BT, BC, BK, BV, DT, PREC, FLOOR, True, G_IS_CUMSUM)


def chunk_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None,
    p: Prepared,
    h: Tensor,
    a: Tensor,
    do: Tensor,
    dht: Tensor | None,
    scale: float,
    info: SeqInfo,
    kd: KernelDtypes,
    plan: StatePlan,
    need_dh0: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """All gradients: ``dq, dk`` (q's/k's dtype), ``dv`` (v's), ``dg`` (g's; fp32 when ``g`` is None, for an fp32
    ``g`` of which only the cumsums ``p.b`` were kept), ``dh0`` fp32 or None.

    Packed layouts (see :mod:`.common`): q, k, g ``[TT, H, K]``; v, do ``[TT, H, V]``; h ``[NT + N, H, K, V]``;
    a ``[TT, H, 64]``; dht ``[N, H, K, V]`` or None; ``p`` from :func:`.prepare_chunks`.
    """
    dh, dh0 = state_grads(p, q, do, dht, scale, info, kd, plan, need_dh0)
    dv = value_grads(k, v, p.b, a, do, dh, info, kd)
    dq, dk, dg = qkg_grads(q, k, v, g, p.b, h, do, dh, scale, info, kd)
    return dq, dk, dv, dg, dh0


def state_grads(
    p: Prepared,
    q: Tensor,
    do: Tensor,
    dht: Tensor | None,
    scale: float,
    info: SeqInfo,
    kd: KernelDtypes,
    plan: StatePlan,
    need_dh0: bool,
) -> tuple[Tensor, Tensor | None]:
    """Launch :func:`state_grads_kernel` (twice, when the sequences are cut into segments); returns ``dh``
    ``[NT, H, K, V]`` in ``kd.dstates`` and, if ``need_dh0``, ``dh0`` ``[N, H, K, V]`` fp32."""
    _, H, K = q.shape
    V = do.shape[-1]
    N, NT = info.num_seqs, info.num_chunks
    dh = q.new_empty(NT, H, K, V, dtype=kd.dstates)
    dh0 = q.new_empty(N, H, K, V, dtype=torch.float32) if need_dh0 else None
    launch_state_pass(
        state_grads_kernel,
        (p.qd if plan.prepared else q, do, p.b, p.decay if plan.prepared else p.b,
         dht if dht is not None else dh, dh, dh0 if dh0 is not None else dh, scale),
        plan, info, H, K, V, kd, HAS_DHT=dht is not None, HAS_DH0=need_dh0,
    )
    return dh, dh0


def value_grads(
    k: Tensor, v: Tensor, b: Tensor, a: Tensor, do: Tensor, dh: Tensor, info: SeqInfo, kd: KernelDtypes
) -> Tensor:
    """Launch :func:`value_grad_kernel`; returns ``dv`` ``[TT, H, V]`` in ``v``'s dtype."""
    _, H, K = k.shape
    V = v.shape[-1]
    BK, BV = block_size(K, common.VALUE_GRAD_BK), common.v_block_size(V, common.VALUE_GRAD_BV, kd)
    dv = torch.empty_like(v)
    value_grad_kernel[(triton.cdiv(V, BV), info.num_chunks, H)](
        k,
        b,
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
        DT=kd.dot,
        PREC=kd.prec,
        num_warps=common.VALUE_GRAD_WARPS,
        num_stages=common.VALUE_GRAD_STAGES,
    )
    return dv


def qkg_grads(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None,
    b: Tensor,
    h: Tensor,
    do: Tensor,
    dh: Tensor,
    scale: float,
    info: SeqInfo,
    kd: KernelDtypes,
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch :func:`qkg_grad_kernel` and :func:`qkg_grad_strong_kernel`; returns ``dq``, ``dk``, ``dg``
    ``[TT, H, K]`` in q's, k's, g's dtypes (``g`` None: only the cumsums ``b`` were kept, of an fp32 ``g``)."""
    _, H, K = q.shape
    V = v.shape[-1]
    BK, BV = block_size(K, common.QKG_BK), block_size(V, common.QKG_BV)
    dq, dk, dg = torch.empty_like(q), torch.empty_like(k), torch.empty_like(g if g is not None else b)
    grid = (triton.cdiv(K, BK), info.num_chunks, H)
    queue = torch.zeros(grid[0] * grid[1] * grid[2] + 1, dtype=torch.int32, device=q.device)
    args = (q, k, v, g if g is not None else b, b, h, do, dh, dq, dk, dg, info.chunk_indices, info.cu_seqlens, queue)
    meta = dict(H=H, K=K, V=V, BT=CHUNK, BC=SUB_CHUNK, BK=BK, BV=BV, DT=kd.dot, PREC=kd.prec, FLOOR=G_FLOOR,
                G_IS_CUMSUM=g is None, num_warps=common.QKG_WARPS, num_stages=common.QKG_STAGES)
    qkg_grad_kernel[grid](*args, scale, MAX_DECAY=common.MAX_DECAY, **meta)
    qkg_grad_strong_kernel[(strong_programs(queue.numel() - 1, q.device),)](*args, info.num_chunks, scale, **meta)
    return dq, dk, dg
