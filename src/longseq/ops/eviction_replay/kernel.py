"""The eviction replay as one Triton program per (row, head group) (layouts in the package docstring)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..hardware import on_first_arg_device
from . import MAX_ENTRIES
from .reference import check_replay_inputs


@triton.jit
def _replay_kernel(
    scores_ptr,
    key_pos_ptr,
    pos_ptr,
    alive_ptr,
    acc_ptr,
    seen_ptr,
    C,
    S,
    H: tl.constexpr,
    G: tl.constexpr,
    BLOCK: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    RECENT: tl.constexpr,
):
    """One program per (row ``b``, group ``g``): the whole replay, every entry's state in registers."""
    i_g, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    HEADS: tl.constexpr = H // G
    n_new = S - C
    offs = tl.arange(0, BLOCK)
    in_range = offs < S
    row = (i_b * G + i_g) * S
    kp = tl.load(key_pos_ptr + row + offs, mask=in_range, other=-1)
    alive = tl.load(alive_ptr + row + offs, mask=in_range, other=0) != 0
    if ACCUMULATE:
        acc = tl.load(acc_ptr + row + offs, mask=in_range, other=0.0)
    for t in range(0, n_new):
        alive = alive | (offs == C + t)
        tl.store(seen_ptr + ((i_b * G + i_g) * n_new + t) * S + offs, alive.to(tl.int8), mask=in_range)
        mean = tl.zeros([BLOCK], dtype=scores_ptr.dtype.element_ty)
        for h in range(0, HEADS):
            head = i_g * HEADS + h
            x = tl.load(scores_ptr + ((i_b * H + head) * n_new + t) * S + offs, mask=in_range, other=0.0)
            x = tl.where(alive, x, float("-inf"))
            e = tl.exp(x - tl.max(x, axis=0))
            mean += e / tl.sum(e, axis=0)
        score = mean / HEADS
        # The RECENT newest positions (the current token's included) are protected; 0 protects none.
        current = tl.load(pos_ptr + i_b * n_new + t)
        candidate = alive & (kp >= 0) & (kp <= current - RECENT)
        if ACCUMULATE:
            acc += score
            score = acc
        score = tl.where(candidate, score, float("inf"))
        lowest = candidate & (score == tl.min(score, axis=0))
        oldest = tl.min(tl.where(lowest, kp, 9223372036854775807), axis=0)
        alive = alive & ~(lowest & (kp == oldest))
    tl.store(alive_ptr + row + offs, alive.to(tl.int8), mask=in_range)
    if ACCUMULATE:
        tl.store(acc_ptr + row + offs, acc, mask=in_range)


@on_first_arg_device
def replay_evictions(
    scores: Tensor, key_pos: Tensor, pos: Tensor, alive: Tensor, acc: Tensor | None, recent: int
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The replay in one Triton launch, with the rule of ``CachePolicy.replay_recent``: TOVA (``acc``
    None, ``recent`` 0) or H2O (``acc`` given, its ``recent``).

    Same contract as :func:`replay_evictions_reference`; ``alive`` and ``acc`` are updated in place.
    Needs ``S <= MAX_ENTRIES``.
    """
    check_replay_inputs(scores, key_pos, pos, alive, acc)
    B, H, c, S = scores.shape
    G = key_pos.shape[1]
    if S > MAX_ENTRIES:
        raise ValueError(f"replay_evictions handles at most {MAX_ENTRIES} entries per row; got {S}")
    if recent < 0:
        raise ValueError(f"recent must be >= 0, got {recent}")
    scores = scores.contiguous()
    flags = alive.to(torch.int8).contiguous()
    seen = torch.empty(B, G, c, S, dtype=torch.int8, device=scores.device)
    acc_buf = acc.to(scores.dtype).contiguous() if acc is not None else scores  # dummy pointer for TOVA
    block = triton.next_power_of_2(S)
    _replay_kernel[(G, B)](
        scores,
        key_pos.contiguous(),
        pos.contiguous(),
        flags,
        acc_buf,
        seen,
        S - c,
        S,
        H=H,
        G=G,
        BLOCK=block,
        ACCUMULATE=acc is not None,
        RECENT=recent,
        num_warps=4 if block <= 2048 else 8,
    )
    alive.copy_(flags != 0)
    if acc is not None:
        acc.copy_(acc_buf)
    return seen != 0, alive, acc
