"""Forward kernels of chunkwise GLA: in-chunk gate cumsums, chunk-boundary states, intra-chunk
attention, outputs.

Layouts (packed, see :mod:`.common`): ``q, k, g`` ``[TT, H, K]``, ``v`` ``[TT, H, V]`` with
``TT = B * T`` (or the packed length), contiguous; ``b`` ``[TT, H, K]`` fp32 (inclusive cumsum of the
clamped gates from the start of each chunk); ``h`` ``[NT + N, H, K, V]`` in ``KernelDtypes.states`` (bf16 on
the bf16 path, else fp32); ``A`` ``[TT, H, 64]`` fp32 (row ``t``, column ``j`` = key ``j`` of ``t``'s chunk,
scaled, zero above the diagonal).

:func:`prepare_chunks` also stores the *decayed operands* of the state products, ``kd = k e^{b_C - b}`` and
(for the backward) ``qd = q e^{b}`` ``[TT, H, K]`` in the products' dtype, and each chunk's decay
``e^{b_C}`` ``[NT, H, K]`` fp32, when the state passes re-read the key side for several V tiles or are cut
into segments (:func:`plan_state_passes`): they then read one operand per key element (2 bytes on the bf16
path) instead of an input and a 4-byte cumsum (once per V tile), and spend no exp on their critical path.

Every exponent passed to exp is ``<= 0``, masked to ``-inf``, or bounded by ``MAX_DECAY`` (see
:mod:`.common`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import common
from .common import CHUNK, G_FLOOR, SUB_CHUNK, KernelDtypes, SeqInfo, block_size


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
def state_operands(x_ptr, y_ptr, b_ptr, decay_ptr, n, t0, eos, o_k, m_k, o_v, i_h, H: tl.constexpr, K: tl.constexpr,
                   V: tl.constexpr, BT: tl.constexpr, PREPARED: tl.constexpr, TO_END: tl.constexpr, DT: tl.constexpr):
    """What a state recurrence needs of global chunk ``n`` (tokens from ``t0``): its decay ``e^{b_C}`` ``[BK]``
    fp32, the decayed key-side tile ``[BT, BK]`` in ``DT`` (``k e^{b_C - b}`` if ``TO_END``, else
    ``q e^{b}``) and the value-side tile ``[BT, BV]`` of ``y`` (v, or do), zero past the sequence's end.

    ``PREPARED``: ``x`` holds the decayed tile already and ``decay_ptr`` the decays (:func:`prepare_kernel`);
    otherwise ``x`` is k or q and both are formed here from the cumsums ``b``.
    """
    _, t, m_t, last = chunk_rows(t0, eos, BT)
    x_off = (t[:, None] * H + i_h) * K + o_k[None, :]
    m_tk = m_t[:, None] & m_k[None, :]
    y_off = (t[:, None] * H + i_h) * V + o_v[None, :]
    m_tv = m_t[:, None] & (o_v[None, :] < V)
    if PREPARED:  # (this order is the one the GPU tests and the A/B of session 23 ran)
        x = tl.load(x_ptr + x_off, mask=m_tk, other=0.0)
        y = tl.load(y_ptr + y_off, mask=m_tv, other=0.0)
        decay = tl.load(decay_ptr + (n * H + i_h) * K + o_k, mask=m_k, other=0.0)
    else:  # the loads in the order of the kernels before the prepared operands (259dde4)
        b, b_last = load_cumsum(b_ptr, t, m_t, last, o_k, m_k, i_h, H, K)
        x = tl.load(x_ptr + x_off, mask=m_tk, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + y_off, mask=m_tv, other=0.0)
        decay = tl.exp(b_last)
        if TO_END:
            x = (x * tl.exp(b_last[None, :] - b)).to(DT)
        else:
            x = (x * tl.exp(b)).to(DT)
    return decay, x, y


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
def prepare_kernel(
    g_ptr,
    q_ptr,
    k_ptr,
    b_ptr,
    qd_ptr,
    kd_ptr,
    decay_ptr,
    chunk_idx_ptr,
    cu_ptr,
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    FLOOR: tl.constexpr,
    STORE_DECAYED: tl.constexpr,
    STORE_QD: tl.constexpr,
    FROM_CUMSUM: tl.constexpr,
):
    """Per (K tile, chunk, head): ``b = cumsum(max(g, FLOOR))`` inside the chunk (fp32) and, if
    ``STORE_DECAYED``, the decay ``e^{b_C}``, the decayed keys ``kd = k e^{b_C - b}`` and (if ``STORE_QD``)
    queries ``qd = q e^{b}`` in ``kd``'s dtype. ``FROM_CUMSUM``: ``b`` is read (the forward's, kept for the
    backward), not formed from ``g``."""
    i_k, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    _, t0, eos = chunk_span(chunk_idx_ptr, cu_ptr, i_n, BT)
    o_t, t, m_t, last = chunk_rows(t0, eos, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    m = m_t[:, None] & m_k[None, :]
    off = (t[:, None] * H + i_h) * K + o_k[None, :]
    if FROM_CUMSUM:
        b = tl.load(b_ptr + off, mask=m, other=0.0)
    else:
        gg = tl.load(g_ptr + off, mask=m, other=0.0).to(tl.float32)
        b = tl.cumsum(tl.maximum(gg, FLOOR), axis=0)
        tl.store(b_ptr + off, b, mask=m)
    if STORE_DECAYED:
        b_last = row_of(b, o_t, last - t0)  # the stored value of the last valid row, as the other kernels read it
        if STORE_QD:
            qq = tl.load(q_ptr + off, mask=m, other=0.0).to(tl.float32)
            tl.store(qd_ptr + off, (qq * tl.exp(b)).to(qd_ptr.dtype.element_ty), mask=m)
        kk = tl.load(k_ptr + off, mask=m, other=0.0).to(tl.float32)
        tl.store(kd_ptr + off, (kk * tl.exp(b_last[None, :] - b)).to(kd_ptr.dtype.element_ty), mask=m)
        tl.store(decay_ptr + (i_n.to(tl.int64) * H + i_h) * K + o_k, tl.exp(b_last), mask=m_k)


@triton.jit
def as_block(cond, o):
    """A scalar condition as a block shaped like ``o``: masks combine blocks only (the interpreter rejects a
    scalar ANDed into a block mask)."""
    return (tl.zeros_like(o) + cond.to(tl.int32)) != 0


@triton.jit
def carried_state(state, seg_end_ptr, seg_decay_ptr, j0, step, count, i_h, o_k, m_k, kv_off, m_kv, H: tl.constexpr,
                  K: tl.constexpr, V: tl.constexpr):
    """``state`` carried through ``count`` segments from segment ``j0`` by ``step`` (+1 forwards, -1 backwards):
    ``state = D_j state + E_j`` each, where ``E_j`` ``[K, V]`` is segment ``j``'s result from a zero start and
    ``D_j`` ``[K]`` its total decay (the product of its chunks' ``e^{b_C}``)."""
    for r in range(0, count):
        j = j0 + r * step
        d = tl.load(seg_decay_ptr + (j * H + i_h) * K + o_k, mask=m_k, other=0.0)
        e = tl.load(seg_end_ptr + (j * H + i_h) * K * V + kv_off, mask=m_kv, other=0.0)
        state = state * d[:, None] + e
    return state


@triton.jit
def store_segment(state, seg_dec, seg_end_ptr, seg_decay_ptr, j, live, i_v, i_h, o_k, m_k, kv_off, m_kv,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr):
    """Store segment ``j``'s zero-start result ``[BK, BV]`` and (once per K tile) its total decay ``[BK]``."""
    tl.store(seg_end_ptr + (j * H + i_h) * K * V + kv_off, state, mask=m_kv & as_block(live, o_k)[:, None])
    tl.store(seg_decay_ptr + (j * H + i_h) * K + o_k, seg_dec, mask=m_k & as_block(live & (i_v == 0), o_k))


@triton.jit
def chunk_states_kernel(
    k_ptr,
    v_ptr,
    b_ptr,
    decay_ptr,
    h0_ptr,
    h_ptr,
    ht_ptr,
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
    HAS_H0: tl.constexpr,
    STORE_HT: tl.constexpr,
    DT: tl.constexpr,
    PREC: tl.constexpr,
):
    """State before every chunk and after the last; one program per (K tile, V tile, sequence x head x segment).

    ``H_{c+1} = diag(e^{b_C}) H_c + kd^T v``, sequential over chunks, the running state in fp32 registers;
    ``kd`` read prepared (``PREPARED``: ``k_ptr`` holds it) or formed from k and ``b`` (:func:`state_operands`).
    With ``nseg`` segments of ``seg_chunks`` chunks per sequence (:func:`.common.state_segments`; runtime
    values, so a new longest sequence does not recompile; ``SEGMENTED`` says whether ``nseg > 1``) it runs
    twice: ``LOCAL`` walks each segment from a zero start (``h0`` for the first) and stores its result and
    total decay; the second launch starts each segment from the earlier segments' results carried through
    their decays, and stores the states. ``h`` gets every state (storage dtype), ``ht`` the final one in fp32.
    """
    i_k, i_v, i_p = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_sh, i_seg = i_p // nseg, i_p % nseg
    i_s, i_h = (i_sh // H).to(tl.int64), i_sh % H  # int64: state offsets reach N * H * K * V
    bos = tl.load(cu_ptr + i_s).to(tl.int64)
    eos = tl.load(cu_ptr + i_s + 1).to(tl.int64)
    n_chunks = tl.cdiv(eos - bos, BT)
    n0 = tl.load(chunk_off_ptr + i_s).to(tl.int64)
    slot0 = n0 + i_s
    if not SEGMENTED:
        c0, c1 = 0, n_chunks
    else:
        c0 = i_seg * seg_chunks
        c1 = tl.minimum(c0 + seg_chunks, n_chunks)
    live = c0 < n_chunks  # the segment holds chunks

    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_kv = m_k[:, None] & (o_v[None, :] < V)
    kv_off = o_k[:, None] * V + o_v[None, :]

    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        h0_off = (i_s * H + i_h) * K * V + kv_off
        state = tl.load(h0_ptr + h0_off, mask=m_kv & as_block(i_seg == 0, o_k)[:, None],
                        other=0.0).to(tl.float32)
    if SEGMENTED and not LOCAL:
        state = carried_state(state, seg_end_ptr, seg_decay_ptr, i_s * nseg, 1, tl.where(live, i_seg, 0), i_h,
                              o_k, m_k, kv_off, m_kv, H, K, V)
    seg_dec = tl.full([BK], 1.0, dtype=tl.float32)
    for c in range(c0, c1):
        if not LOCAL:
            tl.store(h_ptr + ((slot0 + c) * H + i_h) * K * V + kv_off, state.to(h_ptr.dtype.element_ty), mask=m_kv)
        decay, kd, vv = state_operands(k_ptr, v_ptr, b_ptr, decay_ptr, n0 + c, bos + c * BT, eos, o_k, m_k, o_v, i_h,
                                       H, K, V, BT, PREPARED, True, DT)
        state = state * decay[:, None] + tl.dot(tl.trans(kd), vv.to(DT), input_precision=PREC)
        if LOCAL:
            seg_dec = seg_dec * decay
    if LOCAL:
        store_segment(state, seg_dec, seg_end_ptr, seg_decay_ptr, i_s * nseg + i_seg, live, i_v, i_h, o_k, m_k,
                      kv_off, m_kv, H, K, V)
    else:
        # An empty sequence's segment 0 stores h0 as its final state.
        is_last = as_block((c1 == n_chunks) & (live | (i_seg == 0)), o_k)[:, None]
        out = (slot0 + n_chunks) * H + i_h
        tl.store(h_ptr + out * K * V + kv_off, state.to(h_ptr.dtype.element_ty), mask=m_kv & is_last)
        if STORE_HT:
            tl.store(ht_ptr + (i_s * H + i_h) * K * V + kv_off, state, mask=m_kv & is_last)


@triton.jit
def decay_bounded(b_ptr, chunk_idx_ptr, cu_ptr, i_n, i_h, k_start, k_tiles, H: tl.constexpr, K: tl.constexpr,
                  BT: tl.constexpr, BK: tl.constexpr, MAX_DECAY: tl.constexpr):
    """Whether chunk ``i_n`` of head ``i_h`` decays by at most ``MAX_DECAY`` in each of the ``k_tiles`` K tiles from
    column ``k_start``: its last row of gate cumsums stays ``>= -MAX_DECAY`` there."""
    _, t0, eos = chunk_span(chunk_idx_ptr, cu_ptr, i_n, BT)
    last = tl.minimum(t0 + BT, eos) - 1
    lowest = tl.zeros([BK], dtype=tl.float32)
    for i_k in range(0, k_tiles):
        o_k = k_start + i_k * BK + tl.arange(0, BK)
        lowest = tl.minimum(lowest, tl.load(b_ptr + (last * H + i_h) * K + o_k, mask=o_k < K, other=0.0))
    return tl.min(lowest, axis=0) >= -MAX_DECAY


@triton.jit
def queue_tile(queue_ptr, tile):
    """Append ``tile`` (an int id) to a queue: ``queue[0]`` counts the entries (zeroed before the launch),
    ``queue[1:]`` holds them, in no fixed order."""
    slot = tl.atomic_add(queue_ptr, 1)
    tl.store(queue_ptr + 1 + slot, tile)


@triton.jit
def bounded_attention(qq, kk, b, o_t, DT: tl.constexpr, PREC: tl.constexpr):
    """One K tile's causal ``(q e^{b}) (k e^{-b})^T`` ``[BT, BT]`` fp32, the decay split at the chunk start (valid
    where the tile's decay across the chunk is bounded, see :func:`intra_attention_tile`)."""
    qk = tl.dot((qq * tl.exp(b)).to(DT), tl.trans((kk * tl.exp(-b)).to(DT)), input_precision=PREC)
    return tl.where(o_t[:, None] >= o_t[None, :], qk, 0.0)


@triton.jit
def intra_attention_tile(q_ptr, k_ptr, b_ptr, a_ptr, chunk_idx_ptr, cu_ptr, scale, i_n, i_h, H: tl.constexpr,
                         K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, DT: tl.constexpr,
                         PREC: tl.constexpr, MAX_DECAY: tl.constexpr, STRONG: tl.constexpr):
    """Chunk ``i_n``'s whole scaled attention matrix ``A`` ``[BT, BT]`` for head ``i_h``, looping over K tiles.

    Where every gate cumsum of the tile stays above ``-MAX_DECAY`` (so ``exp(-b)`` cannot overflow
    and ``exp(b)`` cannot underflow), its part of ``A`` is one product ``(q e^{b}) (k e^{-b})^T``: each term is a
    product of two correctly rounded factors, as exact as the split below. ``STRONG=False`` assumes that of
    every tile. Otherwise (strong gates, resets) the secondary split in log space:

    Off-diagonal sub-chunk blocks (query sub-chunk ``I``, keys before ``I``): the decay is split at
    ``r_I``, the cumsum at the last row before ``I``: ``(q_i e^{b_i - r_I}) . (k_j e^{r_I - b_j})``,
    one ``tl.dot`` per ``I`` with the rows of other sub-chunks masked out. Diagonal 16 x 16 blocks:
    pairwise in log space, all four blocks at once, one key offset ``jj`` per iteration.
    """
    # torch.compile (inductor) passes a float argument as fp64, which would turn the fp32 tiles it scales into fp64
    scale = tl.cast(scale, tl.float32)
    NC: tl.constexpr = BT // BC
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
        if not STRONG:
            acc += bounded_attention(qq, kk, b, o_t, DT, PREC)
        elif tl.min(b_last, axis=0) >= -MAX_DECAY:  # a bounded tile of a chunk decaying strongly elsewhere
            acc += bounded_attention(qq, kk, b, o_t, DT, PREC)
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
def intra_attention_kernel(q_ptr, k_ptr, b_ptr, a_ptr, chunk_idx_ptr, cu_ptr, queue_ptr, scale, H: tl.constexpr,
                           K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, DT: tl.constexpr,
                           PREC: tl.constexpr, MAX_DECAY: tl.constexpr):
    """:func:`intra_attention_tile` of this program's chunk, grid (NT, H), where every K tile's decay is bounded;
    any other chunk is queued for :func:`intra_attention_strong_kernel`.

    Two kernels because one holding both paths is sized by the longer one. Compiled by Triton 3.6 for an H100,
    this kernel takes 92 registers (K = 128) and 103 (K = 256), so two programs share an SM; session 25's kernel
    holding both paths took 216 and 215 (``benchmarks/results/2026-12-08_sm90_gla_kernel_resources_s29.log`` and
    ``2026-12-07_sm90_gla_kernel_resources_s25.log``). The strong path's kernel walks the queue with a grid of a
    few programs per SM. Its predecessor, a second launch of one program per chunk exiting at once for bounded
    chunks, was 1.5-2.4% slower fwd+bwd than one kernel with both paths at H16 K128 and 1.0-1.3% faster at
    H4 K256 V512 (RESULTS, "session 26"); the queue beat that launch by 2.4-4.3% fwd+bwd (RESULTS, "session 29").
    """
    i_n, i_h = tl.program_id(0), tl.program_id(1)
    if decay_bounded(b_ptr, chunk_idx_ptr, cu_ptr, i_n, i_h, 0, tl.cdiv(K, BK), H, K, BT, BK, MAX_DECAY):
        intra_attention_tile(q_ptr, k_ptr, b_ptr, a_ptr, chunk_idx_ptr, cu_ptr, scale, i_n, i_h, H, K, BT, BC, BK, DT,
                             PREC, MAX_DECAY, False)
    else:
        queue_tile(queue_ptr, i_n + tl.num_programs(0) * i_h)


@triton.jit
def intra_attention_strong_kernel(q_ptr, k_ptr, b_ptr, a_ptr, chunk_idx_ptr, cu_ptr, queue_ptr, n_chunks, scale,
                                  H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                                  BK: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, MAX_DECAY: tl.constexpr):
    """:func:`intra_attention_tile` with the sub-chunk split where needed, for the chunks
    :func:`intra_attention_kernel` queued; a small grid walks the queue."""
    for w in range(tl.program_id(0), tl.load(queue_ptr), tl.num_programs(0)):
        chunk = tl.load(queue_ptr + 1 + w)
        intra_attention_tile(q_ptr, k_ptr, b_ptr, a_ptr, chunk_idx_ptr, cu_ptr, scale, chunk % n_chunks,
                             chunk // n_chunks, H, K, BT, BC, BK, DT, PREC, MAX_DECAY, True)


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
    """``o = scale * (q * exp(b)) @ H_chunk + A @ v`` for one (V tile, chunk, head).

    ``q * exp(b)`` is formed here, not read from :func:`prepare_chunks`' ``qd``: a ``tl.dot`` whose first
    operand comes straight from a load gave wrong outputs on an H100 (Triton 3.6) at some small tiles
    (e.g. K = 64, V = 32 in one K tile), where this form was right; the same holds in ``value_grad_kernel``.
    """
    # torch.compile (inductor) passes a float argument as fp64, which would turn the fp32 tiles it scales into fp64
    scale = tl.cast(scale, tl.float32)
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


@dataclass(frozen=True)
class Prepared:
    """What :func:`prepare_chunks` stores (layouts in the module docstring)."""

    b: Tensor  # [TT, H, K] fp32 gate cumsums inside each chunk
    kd: Tensor | None  # [TT, H, K] k e^{b_C - b}, in the products' dtype (prepared state passes only)
    qd: Tensor | None  # [TT, H, K] q e^{b}, likewise (for the backward state pass)
    decay: Tensor | None  # [NT, H, K] fp32 e^{b_C}


def prepare_chunks(
    q: Tensor,
    k: Tensor,
    g: Tensor | None,
    info: SeqInfo,
    kd: KernelDtypes,
    plan: StatePlan,
    want_qd: bool,
    b: Tensor | None = None,
) -> Prepared:
    """Launch :func:`prepare_kernel`: the gate cumsums and, for prepared state passes (``plan.prepared``),
    the decayed keys (and queries, if ``want_qd``) and the chunk decays. Given the cumsums ``b`` (the backward,
    from the forward's), only the decayed operands are made, and nothing is launched when none are needed."""
    TT, H, K = q.shape
    BK = block_size(K, common.PREPARE_BK)
    store = plan.prepared
    if b is not None and not store:
        return Prepared(b, None, None, None)
    from_cumsum = b is not None
    if b is None:
        b = q.new_empty(TT, H, K, dtype=torch.float32)
    kd_ = q.new_empty(TT, H, K, dtype=kd.dot_torch) if store else None
    qd = q.new_empty(TT, H, K, dtype=kd.dot_torch) if store and want_qd else None
    decay = q.new_empty(info.num_chunks, H, K, dtype=torch.float32) if store else None
    prepare_kernel[(triton.cdiv(K, BK), info.num_chunks, H)](
        b if from_cumsum else g, q, k, b, qd if qd is not None else b, kd_ if store else b, decay if store else b,
        info.chunk_indices, info.cu_seqlens, H=H, K=K, BT=CHUNK, BK=BK, FLOOR=G_FLOOR, STORE_DECAYED=store,
        STORE_QD=qd is not None, FROM_CUMSUM=from_cumsum, num_warps=common.PREPARE_WARPS,
    )
    return Prepared(b, kd_, qd, decay)


def state_block_sizes(K: int, V: int, programs_per_tile: int, kd: KernelDtypes) -> tuple[int, int]:
    """(BK, BV) of the sequential state kernels: a narrower V tile when few (sequence, head) pairs
    would leave most SMs idle, since each program walks its sequence's chunks one after another."""
    BK, BV = block_size(K, common.STATE_BK), common.v_block_size(V, common.STATE_BV, kd)
    if BV > 32 and programs_per_tile * triton.cdiv(K, BK) * triton.cdiv(V, BV) < 256:
        BV = 32
    return BK, BV


@dataclass(frozen=True)
class StatePlan:
    """How both sequential state passes (forward states, backward state gradients) run for one call."""

    BK: int
    BV: int
    grid: tuple[int, int, int]  # (K tiles, V tiles, sequences x heads x segments)
    segments: int  # per sequence (1: not cut)
    seg_chunks: int  # chunks per segment
    prepared: bool  # read the decayed operands from prepare_chunks instead of forming them per V tile


def plan_state_passes(K: int, V: int, H: int, info: SeqInfo, kd: KernelDtypes, device: torch.device) -> StatePlan:
    """Tiles, segments (:func:`.common.state_segments`) and operand source of the state passes. The decayed
    operands are stored once when the passes are cut into segments or re-read each key tile for several V
    tiles (``common.PREPARED_FROM_V_TILES``): then one 2-byte read replaces a 2-byte input, a 4-byte cumsum
    and an exp per V tile."""
    BK, BV = state_block_sizes(K, V, info.num_seqs * H, kd)
    tiles = (triton.cdiv(K, BK), triton.cdiv(V, BV))
    segments, seg_chunks = common.state_segments(info.max_seq_chunks, tiles[0] * tiles[1] * info.num_seqs * H, device)
    prepared = segments > 1 or tiles[1] >= common.PREPARED_FROM_V_TILES
    return StatePlan(BK, BV, (*tiles, info.num_seqs * H * segments), segments, seg_chunks, prepared)


def chunk_states(
    p: Prepared,
    k: Tensor,
    v: Tensor,
    h0: Tensor | None,
    info: SeqInfo,
    kd: KernelDtypes,
    plan: StatePlan,
    want_final: bool,
) -> tuple[Tensor, Tensor | None]:
    """Launch :func:`chunk_states_kernel` (twice, when the sequences are cut into segments); returns ``h``
    ``[NT + N, H, K, V]`` in ``kd.states`` (see :mod:`.common`) and, if ``want_final``, the final states
    ``[N, H, K, V]`` fp32."""
    _, H, K = k.shape
    V = v.shape[-1]
    h = k.new_empty(info.num_chunks + info.num_seqs, H, K, V, dtype=kd.states)
    ht = k.new_empty(info.num_seqs, H, K, V, dtype=torch.float32) if want_final else None
    launch_state_pass(
        chunk_states_kernel,
        (p.kd if plan.prepared else k, v, p.b, p.decay if plan.prepared else p.b, h0 if h0 is not None else h, h,
         ht if ht is not None else h),
        plan, info, H, K, V, kd, HAS_H0=h0 is not None, STORE_HT=want_final,
    )
    return h, ht


def launch_state_pass(
    kernel, leading: tuple, plan: StatePlan, info: SeqInfo, H: int, K: int, V: int, kd: KernelDtypes, **flags
) -> None:
    """Launch a sequential state-pass kernel (:func:`chunk_states_kernel` or ``state_grads_kernel``) as
    ``plan`` says: once, or twice when its sequences are cut into segments (zero-start segment results,
    then the walk from carried-in states). ``leading``: the kernel's arguments before its segment buffers;
    ``flags``: its own constexprs."""
    segmented = plan.segments > 1
    seg_end, seg_decay = segment_buffers(info.num_seqs * plan.segments, H, K, V, info.cu_seqlens)
    for local in (True, False) if segmented else (False,):
        kernel[plan.grid](
            *leading,
            seg_end,
            seg_decay,
            info.cu_seqlens,
            info.chunk_offsets,
            plan.segments,
            plan.seg_chunks if segmented else 1,  # 1 when unused: one specialization for every length
            H=H,
            K=K,
            V=V,
            BT=CHUNK,
            BK=plan.BK,
            BV=plan.BV,
            SEGMENTED=segmented,
            LOCAL=local,
            PREPARED=plan.prepared,
            DT=kd.dot,
            PREC=kd.prec,
            num_warps=common.STATE_WARPS,
            num_stages=common.STATE_STAGES,
            **flags,
        )


def segment_buffers(segments: int, H: int, K: int, V: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """Scratch of a segmented state pass on ``like``'s device: each segment's zero-start result ``[S, H, K, V]``
    and total decay ``[S, H, K]``, fp32 (``S`` = sequences x segments; one element each when not segmented)."""
    shapes = ((1,), (1,)) if segments <= 1 else ((segments, H, K, V), (segments, H, K))
    return tuple(like.new_empty(shape, dtype=torch.float32) for shape in shapes)


def strong_programs(tiles: int, device: torch.device) -> int:
    """Grid of a strong-decay kernel walking the queue of at most ``tiles`` tiles: a few programs per SM (the
    queue is usually empty; off CUDA, one)."""
    return max(1, min(tiles, common.STRONG_PROGRAMS_PER_SM * (common.cuda_sm_count(device) or 1)))


def intra_warps(BK: int) -> int:
    """Warps of an intra-chunk program with ``BK``-wide K tiles: 4 up to 32-wide ones, else ``INTRA_WARPS``."""
    return 4 if BK <= 32 else common.INTRA_WARPS


def intra_block_size(K: int, kd: KernelDtypes) -> int:
    """K tile of :func:`intra_attention_kernel`: all of K in one tile on the bf16 path up to
    ``INTRA_WHOLE_K_MAX``, else ``INTRA_BK``-wide tiles (see :mod:`.common`)."""
    whole_k = kd.dot_torch == torch.bfloat16 and K <= common.INTRA_WHOLE_K_MAX
    return block_size(K, common.INTRA_WHOLE_K_MAX if whole_k else common.INTRA_BK)


def intra_attention(q: Tensor, k: Tensor, b: Tensor, scale: float, info: SeqInfo, kd: KernelDtypes) -> Tensor:
    """Launch :func:`intra_attention_kernel` and :func:`intra_attention_strong_kernel`; returns ``A``
    ``[TT, H, 64]`` fp32."""
    TT, H, K = q.shape
    BK = intra_block_size(K, kd)
    a = q.new_empty(TT, H, CHUNK, dtype=torch.float32)
    queue = torch.zeros(info.num_chunks * H + 1, dtype=torch.int32, device=q.device)
    args = (q, k, b, a, info.chunk_indices, info.cu_seqlens, queue)
    meta = dict(H=H, K=K, BT=CHUNK, BC=SUB_CHUNK, DT=kd.dot, PREC=kd.prec, MAX_DECAY=common.MAX_DECAY, num_stages=1)
    intra_attention_kernel[(info.num_chunks, H)](*args, scale, BK=BK, num_warps=intra_warps(BK), **meta)
    # The whole-K tile was timed on the bounded path only; the strong one keeps INTRA_BK-wide tiles.
    strong_bk = block_size(K, common.INTRA_BK)
    intra_attention_strong_kernel[(strong_programs(info.num_chunks * H, q.device),)](
        *args, info.num_chunks, scale, BK=strong_bk, num_warps=intra_warps(strong_bk), **meta
    )
    return a


def chunk_output(
    q: Tensor, v: Tensor, b: Tensor, h: Tensor, a: Tensor, scale: float, info: SeqInfo, kd: KernelDtypes
) -> Tensor:
    """Launch :func:`output_kernel`; returns ``o`` ``[TT, H, V]`` in ``v``'s dtype."""
    TT, H, K = q.shape
    V = v.shape[-1]
    BK, BV = block_size(K, common.OUTPUT_BK), block_size(V, common.OUTPUT_BV)
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
        num_warps=common.OUTPUT_WARPS,
        num_stages=common.OUTPUT_STAGES,
    )
    return o
