"""Split-KV ("flash-decoding") attention of a few new queries over a static KV cache.

Why: a decode step at batch 1 has only ``B * H`` (query, head) rows. A fused attention kernel that gives
each row one program runs ~12 programs on a 132-SM GPU, each streaming the whole cache -- the step is
latency bound, not bandwidth bound. Here the key axis is split over ``num_splits`` programs per kv head,
each producing a partial softmax ``(max, sum, unnormalised output)`` in fp32, and a second small kernel
merges the splits. The filled length ``n_slots`` is read *inside* the kernels (a device tensor, no host
sync), and the split ranges are cut from it at run time, so a cache filled to 4K of a 20K buffer reads 4K
keys, spread over every split, and the launch (grid, constexprs) depends on static shapes only: it can be
captured in a CUDA graph once and replayed as the cache fills.

Layouts:

* ``q`` ``[B, H, T, D]`` (T small: decoding, a few draft tokens); ``k``, ``v`` ``[B, H_kv, S, D]`` with
  ``H = G * H_kv`` (query head ``h`` uses kv head ``h // G``).
* ``q_pos`` ``[T]`` or ``[B, T]``; ``k_pos`` ``[S]``, ``[B, S]`` or ``[B, H_kv, S]`` integer original
  positions (negative: empty slot), or None (every key is visible). Key ``s`` is visible to query ``t`` iff
  ``s < n_slots`` and ``0 <= k_pos[s] <= q_pos[t]``.
* ``n_slots`` ``[B]`` or one element (shared by the rows), any integer dtype, or None (= S): slots at or
  beyond it are never read (the caller promises they hold no visible key).
* Partials: ``m``, ``l`` ``[B, H, T, NS]`` fp32 (max in log2 units, softmax denominator), ``acc``
  ``[B, H, T, NS, D]`` fp32 (unnormalised ``p @ v``). Output ``[B, H, T, D]`` in ``q``'s dtype.
* Weights (``return_weights``, for score-based eviction such as TOVA): the split programs also store each
  key's logit ``[B, H, T, S]`` fp32 (log2 units, ``-inf`` where invisible) and the merge stores each row's
  log2-sum-exp, so the softmax weights are one in-place ``exp2`` away -- the keys are still read once. The
  extra traffic is the fp32 logits, ``4 * G * T`` bytes per (kv head, key) written and read back, beside
  the ``4 * D`` bytes of a bf16 key and value (with ``n_slots`` also one ``-inf`` fill of them).

Each split program handles all ``G * T`` query rows of its kv head (padded to 16 rows, ``tl.dot``'s minimum),
so a key block is loaded once per kv head, not once per query head. A query with no visible key gets 0.

:func:`decode_attention_reference` is the plain-PyTorch definition the kernels are tested against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .attention import kv_head_positions
from .hardware import cuda_sm_count, on_first_arg_device

__all__ = ["decode_attention", "decode_attention_reference", "num_splits_for", "check_decode_shapes"]

MAX_T = 16  # query rows per program are G * T, padded; beyond a few tokens use the prefill path
MAX_ROWS = 128  # G * T bound: the fp32 [rows, D] accumulator lives in registers
MAX_SPLITS = 64  # the merge kernel holds [splits, D] fp32 partials in registers
CTAS_PER_SM = 4  # target occupancy when choosing the split count
_DEFAULT_SMS = 132  # H100 SXM; used when there is no CUDA device (interpreter tests)
_LOG2E = 1.4426950408889634


def check_decode_shapes(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Raise ValueError unless ``q`` ``[B, H, T, D]``, ``k``/``v`` ``[B, H_kv, S, D]`` fit the kernels."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected q [B, H, T, D] and k, v [B, H_kv, S, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, T, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or H % k.shape[1] != 0:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree (B, D, or H not a multiple of H_kv)")
    if D < 16 or D > 256 or D & (D - 1):
        raise ValueError(f"decode_attention needs a power-of-two head dim in [16, 256]; got {D}")
    if T < 1 or T > MAX_T or (H // k.shape[1]) * T > MAX_ROWS:
        raise ValueError(f"decode_attention takes 1 <= T <= {MAX_T} queries with G * T <= {MAX_ROWS}; "
                         f"got T={T}, G={H // k.shape[1]}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"decode_attention needs q, k, v of one dtype among fp16/bf16/fp32; got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")


def _block_n(head_dim: int) -> int:
    # Keys per loop iteration: 64 keeps the [D, BLOCK_N] + [BLOCK_N, D] tiles (x 2 pipeline stages) small
    # enough for several programs per SM; halved at D = 256 for registers.
    return 64 if head_dim <= 128 else 32


def num_splits_for(seq_len: int, batch_kv_heads: int, sm_count: int = _DEFAULT_SMS, block_n: int = 64) -> int:
    """Splits of the key axis from static shapes only, so a captured launch stays valid as the cache fills.

    Aims at ``CTAS_PER_SM`` programs per SM over the ``B * H_kv`` (row, kv head) pairs, bounded by the
    number of key blocks in the buffer and by :data:`MAX_SPLITS`. The split *ranges* are cut at run time
    from the filled length, so every split gets a share of the filled keys whatever that length is.
    """
    blocks = max(1, -(-seq_len // block_n))
    target = max(1, (CTAS_PER_SM * sm_count) // max(1, batch_kv_heads))
    return max(1, min(target, blocks, MAX_SPLITS))


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, qpos_ptr, kpos_ptr, n_ptr,
    m_ptr, l_ptr, acc_ptr, logit_ptr,
    sq_b, sq_h, sq_t, sq_d,
    sk_b, sk_h, sk_s, sk_d,
    sv_b, sv_h, sv_s, sv_d,
    sqp_b, sqp_t,
    skp_b, skp_h, skp_s,
    sn_b,
    S,
    QK_SCALE: tl.constexpr,
    H: tl.constexpr,
    T: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_KPOS: tl.constexpr,
    HAS_N: tl.constexpr,
    PREC: tl.constexpr,
    STORE_LOGITS: tl.constexpr,
):
    """One program: split ``program_id(0)`` of the keys of (row ``program_id(2)``, kv head ``program_id(1)``),
    for the ``G * T`` query rows of that kv head (row ``r``: query head ``kvh * G + r // T``, token ``r % T``)."""
    i_s = tl.program_id(0)
    i_kvh = tl.program_id(1).to(tl.int64)  # kv-head offsets reach H_kv * S * D
    i_b = tl.program_id(2).to(tl.int64)
    num_splits = tl.num_programs(0)
    if HAS_N:
        n = tl.load(n_ptr + i_b * sn_b).to(tl.int32)
        n = tl.minimum(tl.maximum(n, 0), S)
    else:
        n = S
    # Cut this split's range from the filled length (whole blocks, so only the last block of the last busy
    # split is partial); splits past the end get an empty range and write an empty partial.
    per_split = tl.cdiv(tl.cdiv(n, BLOCK_N), num_splits) * BLOCK_N
    start = i_s * per_split
    end = tl.minimum(start + per_split, n)

    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < G * T
    head = i_kvh * G + rows // T
    tok = rows % T
    offs_d = tl.arange(0, D)
    q = tl.load(
        q_ptr + i_b * sq_b + head[:, None] * sq_h + tok[:, None] * sq_t + offs_d[None, :] * sq_d,
        mask=row_ok[:, None],
        other=0.0,
    )
    if HAS_KPOS:
        # Padding rows get position -1: they see nothing (and are not stored).
        qp = tl.load(qpos_ptr + i_b * sqp_b + tok * sqp_t, mask=row_ok, other=-1)

    k_base = k_ptr + i_b * sk_b + i_kvh * sk_h
    v_base = v_ptr + i_b * sv_b + i_kvh * sv_h
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for s0 in range(start, end, BLOCK_N):
        offs = s0 + tl.arange(0, BLOCK_N)
        in_range = offs < end
        if HAS_KPOS:
            kp = tl.load(kpos_ptr + i_b * skp_b + i_kvh * skp_h + offs * skp_s, mask=in_range, other=-1)
            # Empty slots are not loaded either: whatever they hold (stale or uninitialised) never enters.
            key_ok = in_range & (kp >= 0)
            visible = key_ok[None, :] & (kp[None, :] <= qp[:, None])
        else:
            key_ok = in_range
            visible = key_ok[None, :] & row_ok[:, None]
        kt = tl.load(k_base + offs[None, :] * sk_s + offs_d[:, None] * sk_d, mask=key_ok[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=PREC) * QK_SCALE  # [BLOCK_M, BLOCK_N], log2 units
        s = tl.where(visible, s, float("-inf"))
        if STORE_LOGITS:  # [B, H, T, S]: index ((b * H + head) * T + tok) * S + slot
            lrow = ((i_b * H + head) * T + tok) * S
            tl.store(logit_ptr + lrow[:, None] + offs[None, :], s, mask=row_ok[:, None] & in_range[None, :])
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # While a row has seen no visible key its max is -inf; shift by 0 then so exp2 gives 0, not NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        vv = tl.load(v_base + offs[:, None] * sv_s + offs_d[None, :] * sv_d, mask=key_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision=PREC)
        m_i = m_new

    # Partials are [B, H, T, NS] (+ D): index ((b * H + head) * T + tok) * NS + split.
    part = ((i_b * H + head) * T + tok) * num_splits + i_s
    tl.store(m_ptr + part, m_i, mask=row_ok)
    tl.store(l_ptr + part, l_i, mask=row_ok)
    tl.store(acc_ptr + part[:, None] * D + offs_d[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _merge_kernel(
    m_ptr, l_ptr, acc_ptr, o_ptr, lse_ptr,
    NS,
    D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    STORE_LSE: tl.constexpr,
):
    """One program per (b, h, t) row: rescale the splits' partials to a common max and normalise."""
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, D)
    ok = offs_s < NS
    m = tl.load(m_ptr + row * NS + offs_s, mask=ok, other=float("-inf"))
    lsum = tl.load(l_ptr + row * NS + offs_s, mask=ok, other=0.0)
    m_max = tl.max(m, 0)
    m_use = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_use)  # 0 for empty splits
    den = tl.sum(w * lsum, 0)
    acc = tl.load(acc_ptr + (row * NS + offs_s[:, None]) * D + offs_d[None, :], mask=ok[:, None], other=0.0)
    num = tl.sum(acc * w[:, None], 0)
    # No visible key at all: den = 0 and num = 0; the output is 0 (not 0 / 0).
    o = num / tl.where(den > 0, den, 1.0)
    tl.store(o_ptr + row * D + offs_d, o.to(o_ptr.dtype.element_ty))
    if STORE_LSE:
        # log2 of the softmax denominator; +inf for a row with no visible key, so exp2(-inf - inf) = 0.
        tl.store(lse_ptr + row, tl.where(den > 0, m_use + tl.log2(tl.where(den > 0, den, 1.0)), float("inf")))


def _position_args(
    q: Tensor, k: Tensor, q_pos: Tensor | None, k_pos: Tensor | None
) -> tuple[Tensor, Tensor, tuple[int, int], tuple[int, int, int]]:
    """The position operands of :func:`_split_kernel`: ``(q_pos [B, T], k_pos [B, 1 or H_kv, S], q_pos strides,
    k_pos strides)``, with a kv-head stride of 0 for a layout shared by all kv heads. Without ``k_pos`` the
    pointers are placeholders the kernel never reads (``HAS_KPOS`` off)."""
    if k_pos is None:
        return q, q, (0, 0), (0, 0, 0)
    B, _, T, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if q_pos is None:
        raise ValueError("q_pos is needed when k_pos is given")
    qp = q_pos.expand(B, T) if q_pos.dim() == 1 else q_pos
    kp = kv_head_positions(k_pos, B, S)
    if kp.shape[1] not in (1, Hkv) or kp.shape[0] != B or kp.shape[2] != S:
        raise ValueError(f"k_pos {tuple(kp.shape)} does not match k {tuple(k.shape)}")
    return qp, kp, (qp.stride(0), qp.stride(1)), (kp.stride(0), 0 if kp.shape[1] == 1 else kp.stride(1), kp.stride(2))


def _n_slots_args(q: Tensor, n_slots: Tensor | None) -> tuple[Tensor, int]:
    """The filled-length operand of :func:`_split_kernel` as ``(pointer [1 or B], batch stride)``; a stride of
    0 shares one length between the rows. Without ``n_slots`` the pointer is a placeholder (``HAS_N`` off)."""
    if n_slots is None:
        return q, 0
    B = q.shape[0]
    if n_slots.numel() not in (1, B) or n_slots.is_floating_point():
        raise ValueError(f"n_slots must be an integer tensor of 1 or B={B} elements; got {tuple(n_slots.shape)}")
    n_arg = n_slots.reshape(-1)
    return n_arg, (0 if n_arg.numel() == 1 else n_arg.stride(0))


def _weight_buffers(q: Tensor, S: int, has_n: bool) -> tuple[Tensor, Tensor]:
    """``(logits [B, H, T, S], lse [B, H, T])`` fp32 for ``return_weights``."""
    B, H, T, _ = q.shape
    # Every slot below n_slots is written by some split; the ones past it must read as invisible.
    if has_n:
        logits = torch.full((B, H, T, S), float("-inf"), dtype=torch.float32, device=q.device)
    else:
        logits = torch.empty(B, H, T, S, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    return logits, lse


@on_first_arg_device
def decode_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Tensor | None,
    k_pos: Tensor | None,
    n_slots: Tensor | None = None,
    *,
    num_splits: int | None = None,
    block_n: int | None = None,
    return_weights: bool = False,
    return_logits: bool = False,
) -> Tensor | tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Attention of ``T <= 16`` new queries over a cache, split over the key axis (see the module docstring).

    Args:
        q: ``[B, H, T, D]``; k, v: ``[B, H_kv, S, D]`` (same dtype: fp16, bf16 or fp32; D a power of two
            in [16, 256]).
        q_pos: ``[T]`` or ``[B, T]`` integer positions (ignored, may be None, when ``k_pos`` is None).
        k_pos: ``[S]``, ``[B, S]`` or ``[B, H_kv, S]`` integer positions, negative = empty; None: all visible.
        n_slots: ``[B]`` or one-element integer tensor on the device (clamped to ``[0, S]``); None = S.
        num_splits, block_n: override the static choices (tests; tuning).
        return_weights: also return the softmax weights ``[B, H, T, S]`` fp32 (0 for keys a query cannot
            see and for slots at or beyond ``n_slots``), from the same pass over the keys.
        return_logits: instead, the weights before their normalisation: ``(o, logits, lse)`` with ``logits``
            ``[B, H, T, S]`` in log2 units (``-inf`` where invisible) and ``lse`` ``[B, H, T]`` their log2-sum-exp
            (``+inf`` for a query that sees nothing), so ``weights = exp2(logits - lse)``: for a consumer that
            normalises as it reads them (the fused eviction), two passes over the rows fewer.
    Returns:
        ``o`` ``[B, H, T, D]`` in ``q``'s dtype (softmax in fp32 with scale ``D ** -0.5``), ``(o, weights)`` or
        ``(o, logits, lse)``.
    """
    if return_weights and return_logits:
        raise ValueError("decode_attention returns the weights or their logits, not both")
    check_decode_shapes(q, k, v)
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    block_n = block_n or _block_n(D)
    if num_splits is None:
        num_splits = num_splits_for(S, B * Hkv, cuda_sm_count(q.device) or _DEFAULT_SMS, block_n)
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}]; got {num_splits}")
    qp, kp, qp_strides, kp_strides = _position_args(q, k, q_pos, k_pos)
    n_arg, sn_b = _n_slots_args(q, n_slots)

    m = torch.empty(B, H, T, num_splits, dtype=torch.float32, device=q.device)
    lsum = torch.empty_like(m)
    acc = torch.empty(B, H, T, num_splits, D, dtype=torch.float32, device=q.device)
    o = torch.empty(B, H, T, D, dtype=q.dtype, device=q.device)
    rows = return_weights or return_logits
    logits, lse = _weight_buffers(q, S, n_slots is not None) if rows else (m, m)  # m: unused pointers
    block_m = max(16, triton.next_power_of_2(G * T))
    _split_kernel[(num_splits, Hkv, B)](
        q, k, v, qp, kp, n_arg,
        m, lsum, acc, logits,
        *q.stride(), *k.stride(), *v.stride(),
        *qp_strides, *kp_strides, sn_b,
        S,
        # A constexpr, not a float argument: under torch.compile a float argument arrives as fp64 and
        # would turn the fp32 softmax statistics into fp64 (Triton then rejects the loop-carried types).
        QK_SCALE=D**-0.5 * _LOG2E,
        H=H, T=T, G=G, D=D, BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_KPOS=k_pos is not None, HAS_N=n_slots is not None,
        # fp32 caches get exact fp32 products (TF32 would cost ~3 digits); 16-bit ones use tensor cores.
        PREC="ieee" if q.dtype == torch.float32 else "tf32",
        STORE_LOGITS=rows,
        num_warps=4, num_stages=2,
    )
    _merge_kernel[(B * H * T,)](
        m, lsum, acc, o, lse, num_splits, D=D, BLOCK_S=triton.next_power_of_2(num_splits),
        STORE_LSE=rows, num_warps=4 if D >= 128 else 2,
    )
    if return_logits:
        return o, logits, lse
    if not return_weights:
        return o
    return o, logits.sub_(lse[..., None]).exp2_()


def decode_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Tensor | None,
    k_pos: Tensor | None,
    n_slots: Tensor | None = None,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The definition :func:`decode_attention` computes, in plain PyTorch (fp32 softmax, any T, any D).

    Same arguments, layouts and results. Slots at or beyond ``n_slots`` and empty slots are replaced by zeros
    before use, so whatever they hold (even NaN) cannot reach the output; rows with no visible key give 0.
    """
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    dtype = torch.promote_types(q.dtype, torch.float32)
    slot = torch.arange(S, device=q.device)
    n = torch.full((B,), S, device=q.device) if n_slots is None else n_slots.reshape(-1).to(q.device).expand(B)
    key_ok = (slot[None, :] < n.clamp(0, S)[:, None])[:, None]  # [B, 1, S]
    if k_pos is not None:
        kp = kv_head_positions(k_pos, B, S)  # [B, 1 or H_kv, S]
        key_ok = key_ok & (kp >= 0)
    key_ok = key_ok.expand(B, Hkv, S)
    kk = torch.where(key_ok[..., None], k.to(dtype), 0.0).repeat_interleave(G, dim=1)  # [B, H, S, D]
    vv = torch.where(key_ok[..., None], v.to(dtype), 0.0).repeat_interleave(G, dim=1)
    visible = key_ok.repeat_interleave(G, dim=1)[:, :, None, :]  # [B, H, 1, S]
    if k_pos is not None:
        qp = q_pos.expand(B, T) if q_pos.dim() == 1 else q_pos
        kp_h = kp.expand(B, Hkv, S).repeat_interleave(G, dim=1)  # [B, H, S]
        visible = visible & (kp_h[:, :, None, :] <= qp[:, None, :, None])  # [B, H, T, S]
    scores = (q.to(dtype) @ kk.transpose(-1, -2)) * D**-0.5
    scores = scores.masked_fill(~visible, float("-inf"))
    m = scores.amax(-1, keepdim=True)
    p = torch.exp(scores - torch.where(torch.isinf(m), 0.0, m))  # all -inf rows: p = 0, not NaN
    den = p.sum(-1, keepdim=True)
    w = p / torch.where(den > 0, den, 1.0)
    o = w @ vv
    return (o.to(q.dtype), w) if return_weights else o.to(q.dtype)

