"""Forward kernels of chunkwise GLA: in-chunk gate cumsums, chunk-boundary states, intra-chunk
attention, outputs.

Layouts (packed, see :mod:`.common`): ``q, k, g`` ``[TT, H, K]``, ``v`` ``[TT, H, V]`` with
``TT = B * T`` (or the packed length), contiguous; ``b`` ``[TT, H, K]`` fp32 (inclusive cumsum of the
clamped gates from the start of each chunk); ``h`` ``[NT + N, H, K, V]`` fp32; ``A`` ``[TT, H, 64]``
fp32 (row ``t``, column ``j`` = key ``j`` of ``t``'s chunk, scaled, zero above the diagonal).

Every exponent passed to exp is ``<= 0``, masked to ``-inf``, or bounded by ``MAX_DECAY`` (see
:mod:`.common`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import common
from .common import CHUNK, G_FLOOR, SUB_CHUNK, KernelDtypes, SeqInfo, block_size

# V tile of the output kernel: wider than the other kernels' (MAX_BLOCK) so that q, its gate factors and
# the chunk's A are read (and exp(b) computed) fewer times per chunk: 8% faster forward at V=512 (H200).
OUTPUT_MAX_BV = 128


@triton.jit
def chunk_span(chunk_idx_ptr, cu_ptr, i_n, BT: tl.constexpr):
    """Global chunk ``i_n`` -> (its sequence, its first token, the sequence's end), int64."""
    i_s = tl.load(chunk_idx_ptr + 2 * i_n).to(tl.int64)
    i_c = tl.load(chunk_idx_ptr + 2 * i_n + 1).to(tl.int64)
    bos = tl.load(cu_ptr + i_s).to(tl.int64)
    eos = tl.load(cu_ptr + i_s + 1).to(tl.int64)
    return i_s, bos + i_c * BT, eos


@triton.jit
def chunk_rows(t0, eos, BT: tl.constexpr):
    """The rows of the chunk starting at token ``t0``: offsets ``o_t`` and tokens ``t`` ``[BT]``, which of
    them exist (``t < eos``), and the last one that does."""
    o_t = tl.arange(0, BT)
    t = t0 + o_t
    return o_t, t, t < eos, tl.minimum(t0 + BT, eos) - 1


@triton.jit
def load_cumsum(b_ptr, t, m_t, last, o_k, m_k, i_h, H: tl.constexpr, K: tl.constexpr):
    """The chunk's gate cumsums ``[BT, BK]`` and their last valid row ``[BK]``.

    Rows past the sequence's end are set to that last row, as if their gates were 0: every
    ``b_x - b_y`` with ``x`` at or after ``y`` then stays ``<= 0`` there too, so no exp overflows
    into ``inf * 0 = NaN`` on a padded row.
    """
    b_last = tl.load(b_ptr + (last * H + i_h) * K + o_k, mask=m_k, other=0.0)
    b = tl.load(b_ptr + (t[:, None] * H + i_h) * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
    return tl.where(m_t[:, None], b, b_last[None, :]), b_last


@triton.jit
def chunk_tiles(x_ptr, y_ptr, b_ptr, c, bos, eos, o_k, m_k, o_v, i_h, H: tl.constexpr, K: tl.constexpr,
                V: tl.constexpr, BT: tl.constexpr):
    """What a state recurrence needs of chunk ``c`` of a sequence: the gate cumsums ``b`` ``[BT, BK]`` and
    their last row ``[BK]``, an fp32 key-side tile ``[BT, BK]`` of ``x`` (k, or q going backwards) and a
    value-side tile ``[BT, BV]`` of ``y`` (v, or do), zero past the sequence's end."""
    _, t, m_t, last = chunk_rows(bos + c * BT, eos, BT)
    b, b_last = load_cumsum(b_ptr, t, m_t, last, o_k, m_k, i_h, H, K)
    x = tl.load(x_ptr + (t[:, None] * H + i_h) * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
    y = tl.load(y_ptr + (t[:, None] * H + i_h) * V + o_v[None, :], mask=m_t[:, None] & (o_v[None, :] < V), other=0.0)
    return b, b_last, x.to(tl.float32), y


@triton.jit
def diagonal_pairs(k_ptr, b_ptr, b, b_last, t0, eos, sub, pos, jj, o_k, m_k, i_h, H: tl.constexpr, K: tl.constexpr,
                   BC: tl.constexpr):
    """Step ``jj`` of the pairwise diagonal blocks: each row ``i`` of the chunk meets key ``j(i)``, the
    ``jj``-th of its own sub-chunk. Returns ``j`` ``[BT]``, the keys ``k_j`` ``[BT, BK]`` fp32 and
    ``e = exp(b_i - b_j)`` for ``j <= i``, else 0."""
    j = sub * BC + jj
    tj = t0 + j
    m_j = (tj < eos)[:, None] & m_k[None, :]
    kj = tl.load(k_ptr + (tj[:, None] * H + i_h) * K + o_k[None, :], mask=m_j, other=0.0).to(tl.float32)
    bj = tl.load(b_ptr + (tj[:, None] * H + i_h) * K + o_k[None, :], mask=m_j, other=0.0)
    bj = tl.where((tj < eos)[:, None], bj, b_last[None, :])
    return j, kj, tl.exp(tl.where((pos >= jj)[:, None], b - bj, float("-inf")))


@triton.jit
def row_of(x, o_t, row):
    """Row ``row`` of a register tile ``x`` ``[BT, BK]`` as ``[BK]`` (Triton tiles cannot be indexed)."""
    return tl.sum(tl.where(o_t[:, None] == row, x, 0.0), axis=0)


@triton.jit
def cumsum_kernel(
    g_ptr,
    b_ptr,
    chunk_idx_ptr,
    cu_ptr,
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    FLOOR: tl.constexpr,
):
    """``b = cumsum(max(g, FLOOR))`` inside each chunk, fp32; grid (K tiles, NT, H)."""
    i_k, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    _, t0, eos = chunk_span(chunk_idx_ptr, cu_ptr, i_n, BT)
    _, t, _, _ = chunk_rows(t0, eos, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m = (t[:, None] < eos) & (o_k[None, :] < K)
    off = (t[:, None] * H + i_h) * K + o_k[None, :]
    gg = tl.load(g_ptr + off, mask=m, other=0.0).to(tl.float32)
    tl.store(b_ptr + off, tl.cumsum(tl.maximum(gg, FLOOR), axis=0), mask=m)


@triton.jit
def chunk_states_kernel(
    k_ptr,
    v_ptr,
    b_ptr,
    h0_ptr,
    h_ptr,
    ht_ptr,
    cu_ptr,
    chunk_off_ptr,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_HT: tl.constexpr,
    DT: tl.constexpr,
    PREC: tl.constexpr,
):
    """State before every chunk and after the last, one program per (K tile, V tile, sequence x head).

    ``H_{c+1} = diag(exp(b_last)) H_c + (k * exp(b_last - b))^T v``; sequential over the sequence's
    chunks, the running state in fp32 registers. ``h`` gets every state (storage dtype), ``ht`` the
    final one in fp32.
    """
    i_k, i_v, i_sh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_s, i_h = (i_sh // H).to(tl.int64), i_sh % H  # int64: state offsets reach N * H * K * V
    bos = tl.load(cu_ptr + i_s).to(tl.int64)
    eos = tl.load(cu_ptr + i_s + 1).to(tl.int64)
    n_chunks = tl.cdiv(eos - bos, BT)
    slot0 = tl.load(chunk_off_ptr + i_s).to(tl.int64) + i_s

    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_kv = m_k[:, None] & (o_v[None, :] < V)
    kv_off = o_k[:, None] * V + o_v[None, :]

    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        state = tl.load(h0_ptr + (i_s * H + i_h) * K * V + kv_off, mask=m_kv, other=0.0).to(tl.float32)
    for c in range(0, n_chunks):
        tl.store(h_ptr + ((slot0 + c) * H + i_h) * K * V + kv_off, state.to(h_ptr.dtype.element_ty), mask=m_kv)
        b, b_last, kk, vv = chunk_tiles(k_ptr, v_ptr, b_ptr, c, bos, eos, o_k, m_k, o_v, i_h, H, K, V, BT)
        kd = (kk * tl.exp(b_last[None, :] - b)).to(DT)
        state = state * tl.exp(b_last)[:, None] + tl.dot(tl.trans(kd), vv.to(DT), input_precision=PREC)
    tl.store(h_ptr + ((slot0 + n_chunks) * H + i_h) * K * V + kv_off, state.to(h_ptr.dtype.element_ty), mask=m_kv)
    if STORE_HT:
        tl.store(ht_ptr + (i_s * H + i_h) * K * V + kv_off, state, mask=m_kv)


@triton.jit
def intra_attention_kernel(
    q_ptr,
    k_ptr,
    b_ptr,
    a_ptr,
    chunk_idx_ptr,
    cu_ptr,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    DT: tl.constexpr,
    PREC: tl.constexpr,
    MAX_DECAY: tl.constexpr,
):
    """A chunk's whole scaled attention matrix ``A`` ``[BT, BT]``; grid (NT, H), loop over K tiles.

    Where every gate cumsum of the tile stays above ``-MAX_DECAY`` (so ``exp(-b)`` cannot overflow
    and ``exp(b)`` cannot underflow), ``A`` is one product ``(q e^{b}) (k e^{-b})^T``: each term is a
    product of two correctly rounded factors, as exact as the split below. Otherwise (strong gates,
    resets) the secondary split in log space:

    Off-diagonal sub-chunk blocks (query sub-chunk ``I``, keys before ``I``): the decay is split at
    ``r_I``, the cumsum at the last row before ``I``: ``(q_i e^{b_i - r_I}) . (k_j e^{r_I - b_j})``,
    one ``tl.dot`` per ``I`` with the rows of other sub-chunks masked out. Diagonal 16 x 16 blocks:
    pairwise in log space, all four blocks at once, one key offset ``jj`` per iteration.
    """
    NC: tl.constexpr = BT // BC
    i_n, i_h = tl.program_id(0), tl.program_id(1)
    _, t0, eos = chunk_span(chunk_idx_ptr, cu_ptr, i_n, BT)
    o_t, t, m_t, last = chunk_rows(t0, eos, BT)
    sub = o_t // BC  # sub-chunk of each row
    pos = o_t % BC  # row within its sub-chunk

    acc = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        qk_off = (t[:, None] * H + i_h) * K + o_k[None, :]
        qq = tl.load(q_ptr + qk_off, mask=m_tk, other=0.0).to(tl.float32)
        kk = tl.load(k_ptr + qk_off, mask=m_tk, other=0.0).to(tl.float32)
        b, b_last = load_cumsum(b_ptr, t, m_t, last, o_k, m_k, i_h, H, K)
        if tl.min(b_last, axis=0) >= -MAX_DECAY:
            # Bounded decay over the whole chunk: one product with the decay split at the chunk start.
            qd = qq * tl.exp(b)
            kd = kk * tl.exp(-b)
            qk = tl.dot(qd.to(DT), tl.trans(kd.to(DT)), input_precision=PREC)
            acc += tl.where(o_t[:, None] >= o_t[None, :], qk, 0.0)
        else:
            for i_i in tl.static_range(1, NC):
                r = row_of(b, o_t, i_i * BC - 1)
                qd = qq * tl.exp(tl.where(sub[:, None] == i_i, b - r[None, :], float("-inf")))
                kd = kk * tl.exp(tl.where(sub[:, None] < i_i, r[None, :] - b, float("-inf")))
                acc += tl.dot(qd.to(DT), tl.trans(kd.to(DT)), input_precision=PREC)
            for jj in range(0, BC):
                j, kj, e = diagonal_pairs(k_ptr, b_ptr, b, b_last, t0, eos, sub, pos, jj, o_k, m_k, i_h, H, K, BC)
                col = tl.sum(qq * kj * e, axis=1)
                acc += tl.where(o_t[None, :] == j[:, None], col[:, None], 0.0)
    tl.store(a_ptr + (t[:, None] * H + i_h) * BT + o_t[None, :], acc * scale, mask=m_t[:, None])


@triton.jit
def output_kernel(
    q_ptr,
    v_ptr,
    b_ptr,
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
    DT: tl.constexpr,
    PREC: tl.constexpr,
):
    """``o = scale * (q * exp(b)) @ H_chunk + A @ v`` for one (V tile, chunk, head)."""
    i_v, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_s, t0, eos = chunk_span(chunk_idx_ptr, cu_ptr, i_n, BT)
    o_t, t, m_t, last = chunk_rows(t0, eos, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    slot = i_n + i_s

    acc = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        qq = tl.load(q_ptr + (t[:, None] * H + i_h) * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b, _ = load_cumsum(b_ptr, t, m_t, last, o_k, m_k, i_h, H, K)
        hs = tl.load(
            h_ptr + (slot * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :],
            mask=m_k[:, None] & m_v[None, :],
            other=0.0,
        )
        acc += tl.dot((qq.to(tl.float32) * tl.exp(b)).to(DT), hs.to(DT), input_precision=PREC)
    aa = tl.load(a_ptr + (t[:, None] * H + i_h) * BT + o_t[None, :], mask=m_t[:, None], other=0.0)
    vv = tl.load(v_ptr + (t[:, None] * H + i_h) * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
    acc = acc * scale + tl.dot(aa.to(DT), vv.to(DT), input_precision=PREC)
    tl.store(
        o_ptr + (t[:, None] * H + i_h) * V + o_v[None, :],
        acc.to(o_ptr.dtype.element_ty),
        mask=m_t[:, None] & m_v[None, :],
    )


def chunk_cumsum(g: Tensor, info: SeqInfo) -> Tensor:
    """Launch :func:`cumsum_kernel`; returns ``b`` ``[TT, H, K]`` fp32."""
    TT, H, K = g.shape
    BK = block_size(K)
    b = torch.empty(TT, H, K, device=g.device, dtype=torch.float32)
    cumsum_kernel[(triton.cdiv(K, BK), info.num_chunks, H)](
        g, b, info.chunk_indices, info.cu_seqlens, H=H, K=K, BT=CHUNK, BK=BK, FLOOR=G_FLOOR, num_warps=4
    )
    return b


def state_block_sizes(K: int, V: int, programs_per_tile: int) -> tuple[int, int]:
    """(BK, BV) of the sequential state kernels: a narrower V tile when few (sequence, head) pairs
    would leave most SMs idle, since each program walks its sequence's chunks one after another."""
    BK, BV = block_size(K), block_size(V)
    if BV > 32 and programs_per_tile * triton.cdiv(K, BK) * triton.cdiv(V, BV) < 256:
        BV = 32
    return BK, BV


def chunk_states(
    k: Tensor, v: Tensor, b: Tensor, h0: Tensor | None, info: SeqInfo, kd: KernelDtypes, want_final: bool
) -> tuple[Tensor, Tensor | None]:
    """Launch :func:`chunk_states_kernel`; returns ``h`` ``[NT + N, H, K, V]`` in ``kd.states`` (see
    :mod:`.common`) and, if ``want_final``, the final states ``[N, H, K, V]`` fp32."""
    _, H, K = k.shape
    V = v.shape[-1]
    BK, BV = state_block_sizes(K, V, info.num_seqs * H)
    h = k.new_empty(info.num_chunks + info.num_seqs, H, K, V, dtype=kd.states)
    ht = k.new_empty(info.num_seqs, H, K, V, dtype=torch.float32) if want_final else None
    grid = (triton.cdiv(K, BK), triton.cdiv(V, BV), info.num_seqs * H)
    chunk_states_kernel[grid](
        k,
        v,
        b,
        h0 if h0 is not None else h,
        h,
        ht if ht is not None else h,
        info.cu_seqlens,
        info.chunk_offsets,
        H=H,
        K=K,
        V=V,
        BT=CHUNK,
        BK=BK,
        BV=BV,
        HAS_H0=h0 is not None,
        STORE_HT=want_final,
        DT=kd.dot,
        PREC=kd.prec,
        num_warps=4,
        num_stages=2,
    )
    return h, ht


def intra_attention(q: Tensor, k: Tensor, b: Tensor, scale: float, info: SeqInfo, kd: KernelDtypes) -> Tensor:
    """Launch :func:`intra_attention_kernel`; returns ``A`` ``[TT, H, 64]`` fp32."""
    TT, H, K = q.shape
    BK = block_size(K)
    a = q.new_empty(TT, H, CHUNK, dtype=torch.float32)
    intra_attention_kernel[(info.num_chunks, H)](
        q,
        k,
        b,
        a,
        info.chunk_indices,
        info.cu_seqlens,
        scale,
        H=H,
        K=K,
        BT=CHUNK,
        BC=SUB_CHUNK,
        BK=BK,
        DT=kd.dot,
        PREC=kd.prec,
        MAX_DECAY=common.MAX_DECAY,
        num_warps=4 if BK <= 32 else 8,
        num_stages=1,
    )
    return a


def chunk_output(
    q: Tensor, v: Tensor, b: Tensor, h: Tensor, a: Tensor, scale: float, info: SeqInfo, kd: KernelDtypes
) -> Tensor:
    """Launch :func:`output_kernel`; returns ``o`` ``[TT, H, V]`` in ``v``'s dtype."""
    TT, H, K = q.shape
    V = v.shape[-1]
    BK, BV = block_size(K), max(16, min(OUTPUT_MAX_BV, triton.next_power_of_2(V)))
    o = torch.empty_like(v)
    output_kernel[(triton.cdiv(V, BV), info.num_chunks, H)](
        q,
        v,
        b,
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
        DT=kd.dot,
        PREC=kd.prec,
        num_warps=4,
        num_stages=2,
    )
    return o
