"""Triton kernels of the fused one-token block step (definitions in :mod:`.reference`).

* ``gemv_kernel``: ``y = x @ W^T`` for a few rows ``x`` ``[B, D]``, one program per (tile of
  ``BLOCK_N`` output features, row), with an optional RMSNorm of ``x`` in front (each program
  recomputes the row's RMS: ``x`` is a few KB, the weight tile is what costs), an optional residual
  add behind, or a SwiGLU epilogue (the program reads the matching rows of both halves of ``W``). The
  products are fp32 multiplies of the (rounded) inputs and the weight, summed in fp32; batch-1 decode
  is bound by reading ``W`` once, so no tensor cores are needed.
* ``patch_attention_kernel``: one program per (query head, row): RoPE of the query and of its kv
  head's new key, the key/value written to slot ``p`` of a patch-local cache (by the group's first
  query head), softmax attention over slots ``0..p``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..hardware import on_first_arg_device

# GEMV programs: the whole reduction dim in one block (up to MAX_BLOCK_D; wider inputs loop), so every
# load of a program is issued before any arithmetic -- at batch 1 the kernel is a few hundred programs
# each waiting on one round trip to memory. Weights of up to SMALL_WEIGHT elements get programs of
# 2 rows and 1 warp (more, smaller programs in flight), larger ones 8 rows and 4 warps; measured on an
# H200 in a CUDA graph over MEGABYTE paper95m's nine projection shapes: 1.7-2.3 us per call against
# 3.0-7.2 us for the module path's cuBLAS GEMV alone (benchmarks/RESULTS.md).
MAX_BLOCK_D = 4096
SMALL_WEIGHT = 1_600_000
GEMV_TILE = 4096  # bound on BLOCK_N * BLOCK_D
SMALL = (2, 1)  # (rows, warps) per program
LARGE = (8, 4)


@triton.jit
def _gemv_tile(x_row, nw_ptr, w_ptr, offs_n, m_n, d0, D, N, rstd, HAS_NORM: tl.constexpr, SWIGLU: tl.constexpr,
               OWN_RSTD: tl.constexpr, EPS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Partial sums over input columns ``d0 .. d0 + BLOCK_D`` of one program's rows: ``(gate/plain, up)``.

    The weight loads come first, so they are in flight while the row is normalised. ``OWN_RSTD``: the
    block is the whole row, so its RMS comes from these same registers (else ``rstd`` is given).
    """
    offs_d = d0 + tl.arange(0, BLOCK_D)
    m_d = offs_d < D
    m_w = m_n[:, None] & m_d[None, :]
    w = tl.load(w_ptr + offs_n[:, None] * D + offs_d[None, :], mask=m_w, other=0.0)
    w_up = w
    if SWIGLU:
        w_up = tl.load(w_ptr + (N + offs_n[:, None]) * D + offs_d[None, :], mask=m_w, other=0.0)
    xx = tl.load(x_row + offs_d, mask=m_d, other=0.0).to(tl.float32)
    if HAS_NORM:
        nw = tl.load(nw_ptr + offs_d, mask=m_d, other=0.0).to(tl.float32)
        if OWN_RSTD:
            rstd = 1.0 / tl.sqrt(tl.sum(xx * xx, axis=0) / D + EPS)
        xx = (xx * rstd * nw).to(x_row.dtype.element_ty).to(tl.float32)  # rounded, as the module's norm output
    acc = tl.sum(w.to(tl.float32) * xx[None, :], axis=1)
    acc_up = acc
    if SWIGLU:
        acc_up = tl.sum(w_up.to(tl.float32) * xx[None, :], axis=1)
    return acc, acc_up


@triton.jit
def _row_rstd(x_row, D, EPS: tl.constexpr, BLOCK_D: tl.constexpr):
    ss = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        xx = tl.load(x_row + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
        ss += xx * xx
    return 1.0 / tl.sqrt(tl.sum(ss, axis=0) / D + EPS)


@triton.jit
def gemv_kernel(
    x_ptr,
    nw_ptr,
    w_ptr,
    res_ptr,
    y_ptr,
    D,
    N,
    stride_x,
    stride_res,
    stride_y,
    HAS_NORM: tl.constexpr,
    HAS_RES: tl.constexpr,
    SWIGLU: tl.constexpr,
    EPS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
):
    i_n, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    offs_n = i_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: offs_n * D may pass 2^31 (LM heads)
    m_n = offs_n < N
    x_row = x_ptr + b * stride_x
    if ONE_BLOCK:
        acc, acc_up = _gemv_tile(x_row, nw_ptr, w_ptr, offs_n, m_n, 0, D, N, 1.0, HAS_NORM, SWIGLU, True, EPS, BLOCK_D)
    else:
        rstd = 1.0
        if HAS_NORM:
            rstd = _row_rstd(x_row, D, EPS, BLOCK_D)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            part, part_up = _gemv_tile(x_row, nw_ptr, w_ptr, offs_n, m_n, d0, D, N, rstd, HAS_NORM, SWIGLU, False,
                                       EPS, BLOCK_D)
            acc += part
            acc_up += part_up
    out_ty = y_ptr.dtype.element_ty
    y = acc.to(out_ty).to(tl.float32)
    if SWIGLU:
        silu = (y / (1.0 + tl.exp(-y))).to(out_ty).to(tl.float32)
        y = silu * acc_up.to(out_ty).to(tl.float32)
    if HAS_RES:
        y += tl.load(res_ptr + b * stride_res + offs_n, mask=m_n, other=0.0).to(tl.float32)
    tl.store(y_ptr + b * stride_y + offs_n, y.to(out_ty), mask=m_n)


@on_first_arg_device
def gemv(x: Tensor, weight: Tensor, norm_weight: Tensor | None, eps: float, residual: Tensor | None,
         swiglu: bool) -> Tensor:
    """Launch :func:`gemv_kernel`. ``x`` ``[B, D]`` (unit stride along D), ``weight`` ``[N, D]`` or, with
    ``swiglu``, ``[2N, D]`` (contiguous); returns ``[B, N]`` in ``x``'s dtype."""
    B, D = x.shape
    N = weight.shape[0] // 2 if swiglu else weight.shape[0]
    y = torch.empty(B, N, device=x.device, dtype=x.dtype)
    block_d = min(MAX_BLOCK_D, triton.next_power_of_2(D))
    rows, warps = SMALL if weight.numel() <= SMALL_WEIGHT else LARGE
    block_n = max(1, min(rows, GEMV_TILE // block_d, triton.next_power_of_2(N)))
    gemv_kernel[(triton.cdiv(N, block_n), B)](
        x,
        norm_weight if norm_weight is not None else x,
        weight,
        residual if residual is not None else x,
        y,
        D,
        N,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        y.stride(0),
        HAS_NORM=norm_weight is not None,
        HAS_RES=residual is not None,
        SWIGLU=swiglu,
        # Constexprs, not float arguments: under torch.compile a float argument arrives as fp64 and would
        # promote the fp32 arithmetic it touches.
        EPS=eps,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        ONE_BLOCK=D <= block_d,
        num_warps=warps,
    )
    return y


@triton.jit
def _rope_table(pos, inv_freq_ptr, D: tl.constexpr):
    """For position ``pos``: the head's channels ``[D]``, each one's "rotate half" partner and sign, and the
    cos / sin of its angle (fp32)."""
    HALF: tl.constexpr = D // 2
    offs = tl.arange(0, D)
    first = offs < HALF
    partner = tl.where(first, offs + HALF, offs - HALF)
    sign = tl.where(first, -1.0, 1.0)
    angle = pos.to(tl.float32) * tl.load(inv_freq_ptr + offs % HALF)
    return offs, partner, sign, tl.cos(angle), tl.sin(angle)


@triton.jit
def _rope(base_ptr, offs, partner, sign, cos, sin):
    """``x * cos + sign * x[partner] * sin`` for one head ``[D]`` in fp32 ("rotate half")."""
    x = tl.load(base_ptr + offs).to(tl.float32)
    xp = tl.load(base_ptr + partner).to(tl.float32)
    return x * cos + sign * xp * sin


@triton.jit
def patch_attention_kernel(
    qkv_ptr,
    p_ptr,
    k_ptr,
    v_ptr,
    sp_ptr,
    inv_freq_ptr,
    o_ptr,
    stride_qkv,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_spb,
    stride_spg,
    stride_o,
    S,
    SCALE: tl.constexpr,
    H: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    SP_GROUPS: tl.constexpr,
):
    h, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    G: tl.constexpr = H // HKV
    kvh = h // G
    p = tl.load(p_ptr + b).to(tl.int64)
    offs, partner, sign, cos, sin = _rope_table(p, inv_freq_ptr, D)
    row = qkv_ptr + b * stride_qkv
    act = qkv_ptr.dtype.element_ty
    q = _rope(row + h * D, offs, partner, sign, cos, sin).to(act).to(tl.float32)
    k_new = _rope(row + (H + kvh) * D, offs, partner, sign, cos, sin).to(k_ptr.dtype.element_ty)
    v_new = tl.load(row + (H + HKV + kvh) * D + offs).to(v_ptr.dtype.element_ty)

    # The group's first query head writes the new key/value and the slot positions; every head uses its
    # own copy of the new key/value for slot p, so no head depends on another's write.
    # (Masks are "index < limit" with a limit of 0 for non-writers: plain comparisons, which the
    # interpreter also accepts.)
    writer = (h % G) == 0
    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_vb + kvh * stride_vh
    d_lim = tl.where(writer, D, 0)
    tl.store(k_base + p * stride_ks + offs, k_new, mask=offs < d_lim)
    tl.store(v_base + p * stride_vs + offs, v_new, mask=offs < d_lim)
    offs_s = tl.arange(0, BLOCK_S)
    m_s = offs_s < S
    if SP_GROUPS > 0:
        new_pos = tl.where(offs_s <= p, offs_s, -1).to(sp_ptr.dtype.element_ty)
        if SP_GROUPS > 1:  # per-head slot positions: each kv head's writer
            tl.store(sp_ptr + b * stride_spb + kvh * stride_spg + offs_s, new_pos, mask=offs_s < tl.where(writer, S, 0))
        else:  # one row shared by the kv heads: kv head 0's writer
            tl.store(sp_ptr + b * stride_spb + offs_s, new_pos, mask=offs_s < tl.where(h == 0, S, 0))

    visible = m_s & (offs_s <= p)
    kk = tl.load(k_base + offs_s[:, None] * stride_ks + offs[None, :], mask=visible[:, None], other=0.0)
    vv = tl.load(v_base + offs_s[:, None] * stride_vs + offs[None, :], mask=visible[:, None], other=0.0)
    at_p = (offs_s == p)[:, None]
    kk = tl.where(at_p, k_new.to(tl.float32)[None, :], kk.to(tl.float32))
    vv = tl.where(at_p, v_new.to(tl.float32)[None, :], vv.to(tl.float32))
    scores = tl.where(visible, tl.sum(kk * q[None, :], axis=1) * SCALE, float("-inf"))
    w = tl.exp(scores - tl.max(scores, axis=0))
    w = w / tl.sum(w, axis=0)
    o = tl.sum(w[:, None] * vv, axis=0)
    tl.store(o_ptr + b * stride_o + h * D + offs, o.to(o_ptr.dtype.element_ty))


@on_first_arg_device
def patch_attention(qkv: Tensor, p: Tensor, k_cache: Tensor, v_cache: Tensor, slot_pos: Tensor | None,
                    n_heads: int, n_kv_heads: int, inv_freq: Tensor) -> Tensor:
    """Launch :func:`patch_attention_kernel` (arguments as :func:`.reference.patch_attention_reference`)."""
    B = qkv.shape[0]
    S, D = k_cache.shape[2], k_cache.shape[3]
    o = torch.empty(B, n_heads * D, device=qkv.device, dtype=qkv.dtype)
    p = p.contiguous()
    sp = slot_pos if slot_pos is not None else p
    patch_attention_kernel[(n_heads, B)](
        qkv,
        p,
        k_cache,
        v_cache,
        sp,
        inv_freq,
        o,
        qkv.stride(0),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        slot_pos.stride(0) if slot_pos is not None else 0,
        slot_pos.stride(1) if slot_pos is not None else 0,
        o.stride(0),
        S,
        SCALE=D**-0.5,
        H=n_heads,
        HKV=n_kv_heads,
        D=D,
        BLOCK_S=max(16, triton.next_power_of_2(S)),
        SP_GROUPS=0 if slot_pos is None else slot_pos.shape[1],
        num_warps=2,
    )
    return o


@triton.jit
def _first_slot(sp_row, value, S, BLOCK_S: tl.constexpr):
    """The first of ``S`` slots of ``sp_row`` that is empty (``< 0``) or holds ``value`` (int64; 0 if none, as
    ``argmax`` of no hit gives). Unchanged by a concurrent write of ``value`` (the new position, or ``-1`` for a
    masked row) into that very slot, so the programs of one launch agree."""
    best = value * 0 + S  # an int64 scalar whether S came as a value or (S == 1) as a constant
    for start in range(0, S, BLOCK_S):
        offs = start + tl.arange(0, BLOCK_S)
        sp = tl.load(sp_row + offs, mask=offs < S, other=0)
        hit = (offs < S) & ((sp < 0) | (sp == value))
        best = tl.minimum(best, tl.min(tl.where(hit, offs, S).to(tl.int64), axis=0))
    return tl.where(best == S, 0, best)


@triton.jit
def rope_write_kernel(
    qkv_ptr,
    pos_ptr,
    mask_ptr,
    k_ptr,
    v_ptr,
    sp_ptr,
    inv_freq_ptr,
    q_out_ptr,
    stride_qkv,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_spb,
    stride_spg,
    stride_qo,
    S,
    H: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    SP_GROUPS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    FIRST_EMPTY: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Programs ``i < H`` rotate query head ``i`` into ``q_out``; programs ``H + j`` rotate kv head ``j``'s key
    and write it and the value to slot ``pos`` (slot ``i`` holds position ``i``; with ``FIRST_EMPTY``, to the
    first slot of its group that is empty or holds ``pos``, see :func:`.reference.write_slots`), and the
    slot's position (``-1`` for rows outside the mask: the write stays invisible)."""
    i, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    pos = tl.load(pos_ptr + b).to(tl.int64)
    offs, partner, sign, cos, sin = _rope_table(pos, inv_freq_ptr, D)
    row = qkv_ptr + b * stride_qkv
    if i < H:
        q = _rope(row + i * D, offs, partner, sign, cos, sin)
        tl.store(q_out_ptr + b * stride_qo + i * D + offs, q.to(q_out_ptr.dtype.element_ty))
    else:
        kvh = i - H
        group = kvh if SP_GROUPS > 1 else 0
        new_pos = pos
        if HAS_MASK:  # a masked row's write stays invisible: its slot keeps (or gets) position -1
            new_pos = tl.where(tl.load(mask_ptr + b).to(tl.int32) != 0, pos, -1)
        at = pos
        if FIRST_EMPTY:
            at = _first_slot(sp_ptr + b * stride_spb + group * stride_spg, new_pos, S, BLOCK_S)
        k = _rope(row + (H + kvh) * D, offs, partner, sign, cos, sin)
        v = tl.load(row + (H + HKV + kvh) * D + offs)
        tl.store(k_ptr + b * stride_kb + kvh * stride_kh + at * stride_ks + offs, k.to(k_ptr.dtype.element_ty))
        tl.store(v_ptr + b * stride_vb + kvh * stride_vh + at * stride_vs + offs, v.to(v_ptr.dtype.element_ty))
        if SP_GROUPS > 0:
            if SP_GROUPS > 1 or kvh == 0:
                tl.store(sp_ptr + b * stride_spb + group * stride_spg + at, new_pos.to(sp_ptr.dtype.element_ty))


@on_first_arg_device
def rope_write(qkv: Tensor, pos: Tensor, row_mask: Tensor | None, k_cache: Tensor, v_cache: Tensor,
               slot_pos: Tensor | None, n_heads: int, n_kv_heads: int, inv_freq: Tensor,
               first_empty: bool = False) -> Tensor:
    """Launch :func:`rope_write_kernel` (see :func:`.reference.rope_write_reference`)."""
    B = qkv.shape[0]
    D = k_cache.shape[3]
    q = torch.empty(B, n_heads, 1, D, device=qkv.device, dtype=qkv.dtype)
    pos = pos.contiguous()
    mask = row_mask.contiguous() if row_mask is not None else pos  # bool, read as-is (a uint8 view would stop Inductor)
    rope_write_kernel[(n_heads + n_kv_heads, B)](
        qkv,
        pos,
        mask,
        k_cache,
        v_cache,
        slot_pos if slot_pos is not None else pos,
        inv_freq,
        q,
        qkv.stride(0),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        slot_pos.stride(0) if slot_pos is not None else 0,
        slot_pos.stride(1) if slot_pos is not None else 0,
        q.stride(0),
        k_cache.shape[2],
        H=n_heads,
        HKV=n_kv_heads,
        D=D,
        SP_GROUPS=0 if slot_pos is None else slot_pos.shape[1],
        HAS_MASK=row_mask is not None,
        FIRST_EMPTY=first_empty,
        BLOCK_S=min(1024, triton.next_power_of_2(k_cache.shape[2])) if first_empty else 16,
        num_warps=1,
    )
    return q


@triton.jit
def evict_kernel(
    sp_ptr,
    pos_ptr,
    w_ptr,
    lse_ptr,
    score_ptr,
    mask_ptr,
    stride_spb,
    stride_spg,
    stride_wb,
    stride_wh,
    stride_lb,
    stride_lh,
    stride_scb,
    stride_scg,
    C,
    sinks,
    recent,
    KEY: tl.constexpr,
    HPG: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_LSE: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One program per (row, group): the group's key per slot, the lowest among the candidates (ties to the
    oldest position), and its slot emptied if the group holds ``C`` tokens (see
    :func:`.reference.evict_reference`). The whole row of ``C`` slots is one tile."""
    b, g = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    inside = offs < C
    sp_row = sp_ptr + b * stride_spb + g * stride_spg
    sp = tl.load(sp_row + offs, mask=inside, other=-1)
    pos = tl.load(pos_ptr + b).to(tl.int64)
    active = pos == pos  # every row, unless masked
    if HAS_MASK:
        active = tl.load(mask_ptr + b).to(tl.int32) != 0
    if KEY == 0:
        keys = sp.to(tl.float64)  # positions, exact in float64
    else:
        total = tl.zeros((BLOCK_C,), tl.float32)
        for h in range(HPG):  # heads in order, then a division: PyTorch's mean over the group's heads
            w = tl.load(w_ptr + b * stride_wb + (g * HPG + h) * stride_wh + offs, mask=inside, other=0.0)
            if HAS_LSE:  # log2 logits: the softmax here, as decode_attention's return_weights would form it
                w = tl.exp2(w - tl.load(lse_ptr + b * stride_lb + (g * HPG + h) * stride_lh))
                w = tl.where(inside, w, 0.0)
            total += w
        mean = total / HPG
        if KEY == 2:
            sc_row = score_ptr + b * stride_scb + g * stride_scg
            # The slot this step wrote (write_slots: empty, or holding the value written), 0 if none.
            value = tl.where(active, pos, -1)
            written = tl.min(tl.where(inside & ((sp < 0) | (sp == value)), offs, BLOCK_C), axis=0)
            written = tl.where(written == BLOCK_C, 0, written)
            mean = tl.where(active, mean, 0.0)
            sc = tl.where(offs == written, 0.0, tl.load(sc_row + offs, mask=inside, other=0.0)) + mean
            tl.store(sc_row + offs, sc, mask=inside)
            mean = sc
        keys = mean.to(tl.float64)
    candidate = inside & (sp >= sinks) & ((recent < 0) | (sp <= pos - recent))
    lowest_key = tl.min(tl.where(candidate, keys, float("inf")), axis=0)
    lowest = candidate & (keys == lowest_key)
    oldest = tl.min(tl.where(lowest, sp, 9223372036854775807), axis=0)
    # The first slot holding the oldest of the lowest; slot 0 when nothing is a candidate (as argmin gives).
    victim = tl.min(tl.where(lowest & (sp == oldest), offs, BLOCK_C), axis=0)
    victim = tl.where(victim == BLOCK_C, 0, victim)
    if tl.min(tl.where(inside, sp, 0), axis=0) >= 0:  # the group holds C tokens: release the victim's slot
        tl.store(sp_row + offs, tl.full((BLOCK_C,), -1, sp.dtype), mask=offs == victim)


@on_first_arg_device
def evict(slot_pos: Tensor, pos: Tensor, key: int, sinks: int, recent: int, weights: Tensor | None,
          score: Tensor | None, row_mask: Tensor | None, lse: Tensor | None = None) -> None:
    """Launch :func:`evict_kernel` (arguments as :func:`.reference.evict_reference`; with ``lse`` ``[B, H]``,
    ``weights`` are log2 logits normalised in the kernel)."""
    B, G, C = slot_pos.shape
    w = weights if weights is not None else slot_pos
    sc = score if score is not None else slot_pos
    ls = lse if lse is not None else slot_pos
    evict_kernel[(B, G)](
        slot_pos, pos.contiguous(), w, ls, sc, row_mask if row_mask is not None else pos,
        slot_pos.stride(0), slot_pos.stride(1), w.stride(0) if weights is not None else 0,
        w.stride(1) if weights is not None else 0, ls.stride(0) if lse is not None else 0,
        ls.stride(1) if lse is not None else 0, sc.stride(0) if score is not None else 0,
        sc.stride(1) if score is not None else 0, C, sinks, recent,
        KEY=key, HPG=weights.shape[1] // G if weights is not None else 1, HAS_MASK=row_mask is not None,
        HAS_LSE=lse is not None, BLOCK_C=triton.next_power_of_2(C), num_warps=4 if C <= 2048 else 8,
    )
