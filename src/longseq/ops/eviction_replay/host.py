"""The eviction replay on the CPU: the exponentials once per chunk, then per token two small products and an
argmin in NumPy (layouts in the package docstring).

Why not the PyTorch loop: it spends ~12 operator dispatches per token (mask, softmax, mean, the victim's two
reductions, scatters), each costing microseconds of overhead on tensors of a few thousand elements, so on
a 2,048-token prompt the loop -- not the model -- dominated an exact TOVA prefill. Here the per-token work
is reorganised so that little remains inside the loop:

* ``E = exp(scores - M)`` for the whole chunk at once, ``M`` the max of the query's row. The softmax over
  the alive set is then ``E * alive / Z`` with ``Z = E @ alive``: one product per token gives every head's
  normaliser, a second one the head average. It is the same softmax up to rounding (``M`` is at least the
  alive entries' max).
* The entries of each (row, group) are taken in position order (the cache keeps them so during a prefill;
  otherwise they are sorted once), so "ties go to the oldest" is NumPy's first minimum, and H2O's
  ``pos <= current - recent`` rule is a per-token 0/inf penalty computed for all tokens up front.
* What each query saw is rebuilt after the loop from the step at which each entry left.

Rounding: the exponentials are fp32 when the scores are fp32 (or bf16) and every row's scores span less than
:data:`SPAN_FP32` -- then no weight of an alive entry leaves fp32's normal range and each keeps full relative
precision -- and float64 otherwise, up to :data:`SPAN_FP64`; :func:`replay_evictions_host` returns None
beyond that (never seen in a trained model), and the caller takes the PyTorch loop. The decisions are the
reference's wherever two candidates' weights differ by more than rounding: in float64 they agree bit for bit
in the tests, and on a near-tie in fp32 either candidate may go, as between any two summation orders.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .reference import check_replay_inputs

# Widest spread (max - min) of a query's scores for which exp(score - max) of every entry stays a normal
# number: e^-87 is fp32's smallest normal, e^-708 float64's (with a margin).
SPAN_FP32 = 80.0
SPAN_FP64 = 700.0


@torch.no_grad()  # decisions are discrete: nothing here is differentiated (an HF forward may track grads)
def replay_evictions_host(
    scores: Tensor, key_pos: Tensor, pos: Tensor, alive: Tensor, acc: Tensor | None, recent: int
) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """The replay with the rule of ``CachePolicy.replay_recent`` (TOVA: ``acc`` None, ``recent`` 0; H2O:
    ``acc`` and its ``recent``) for CPU tensors: the contract of
    :func:`.reference.replay_evictions_reference` (``alive`` and ``acc`` updated in place), or None, with
    nothing changed, when some query's scores span more than :data:`SPAN_FP64` (use the loop then)."""
    check_replay_inputs(scores, key_pos, pos, alive, acc)
    if recent < 0:
        raise ValueError(f"recent must be >= 0, got {recent}")
    B, H, c, S = scores.shape
    G = key_pos.shape[1]
    heads, C, R = H // G, S - c, B * G
    span = float((scores.amax(-1) - scores.amin(-1)).max()) if c else 0.0
    if not span < SPAN_FP64:  # also catches NaN
        return None
    dtype = torch.float32 if scores.dtype != torch.float64 and span < SPAN_FP32 else torch.float64

    order = _position_order(key_pos, alive, C)
    if order is not None:  # sort the entries of each (row, group) by position
        key_pos, alive_in = key_pos.gather(-1, order), alive.gather(-1, order)
        scores = scores.view(B, G, heads, c, S).gather(-1, order[:, :, None, None].expand(B, G, heads, c, S))
    else:
        alive_in = alive
    # e[t, r, h, j] = exp(scores - row max), token-major so that e[t] is one contiguous [R, heads, S] block.
    x = scores.reshape(B, G, heads, c, S)
    e = torch.empty(c, B, G, heads, S, dtype=dtype)
    torch.sub(x.permute(3, 0, 1, 2, 4), x.amax(-1, keepdim=True).permute(3, 0, 1, 2, 4), out=e)
    e = e.exp_().view(c, R, heads, S).numpy()

    live0 = alive_in.reshape(R, S).numpy()
    # H2O's candidates at token t are the entries at positions <= pos_t - recent: with the entries in position
    # order, a prefix [0, k_t) (dead entries, at any position, are never candidates; they count as -1).
    kp = np.maximum.accumulate(np.where(live0 | (np.arange(S) >= C), key_pos.reshape(R, S).numpy(), -1), axis=1)
    limit = (pos - recent).repeat_interleave(G, 0).numpy()  # [R, c]
    ends = np.stack([np.searchsorted(kp[r], limit[r], side="right") for r in range(R)], axis=1)  # [c, R]
    total = None
    if acc is not None:
        total = (acc if order is None else acc.gather(-1, order)).reshape(R, S).to(dtype).numpy().copy()
    victims = (_decide_one_row if R == 1 else _decide)(e, live0, C, ends if recent else None, total)  # [c, R]

    # Entry j was seen by query t if it was kept or is a new token <= t, and had not left before t.
    left = np.full((R, S), c, dtype=np.int64)
    left[np.arange(R)[None, :].repeat(c, 0), victims] = np.arange(c)[:, None]
    steps = np.arange(c)[:, None, None]  # [c, 1, 1]
    joined = np.where(np.arange(S) < C, np.where(live0, -1, c), np.arange(S) - C)  # [R, S]
    seen = torch.from_numpy((joined[None] <= steps) & (left[None] >= steps))  # [c, R, S]
    seen = seen.view(c, B, G, S).permute(1, 2, 0, 3)
    final = torch.from_numpy((joined < c) & (left == c)).view(B, G, S)
    if order is not None:
        back = order.argsort(-1)
        seen = seen.gather(-1, back[:, :, None].expand(B, G, c, S))
        final = final.gather(-1, back)
    alive.copy_(final)
    if acc is not None:
        assert total is not None
        done = torch.from_numpy(total).view(B, G, S)
        acc.copy_(done if order is None else done.gather(-1, order.argsort(-1)))
    return seen, alive, acc


def _position_order(key_pos: Tensor, alive: Tensor, C: int) -> Tensor | None:
    """None when the alive cache entries of every (row, group) already stand in increasing position order
    (dead ones may stand anywhere: they are never candidates); else ``[B, G, S]`` indices that sort them.
    The new tokens (entries ``[C, S)``) are in order and newer than every cache entry by contract."""
    kept = key_pos[..., :C].masked_fill(~alive[..., :C], -1)
    if bool((~alive[..., :C] | (kept >= kept.cummax(-1).values)).all()):
        return None
    return torch.cat([kept, key_pos[..., C:]], dim=-1).argsort(dim=-1, stable=True)


def _decide_one_row(e: np.ndarray, live0: np.ndarray, C: int, ends: np.ndarray | None,
                    total: np.ndarray | None) -> np.ndarray:
    """The per-token decisions for a single (row, group) (scalar indexing, no batch axis); see :func:`_decide`.

    Token ``t`` works on the ``C + t + 1`` entries that have joined so far only. Its attention is added to
    the running totals (H2O) of all of them, dead ones included, which is cheaper than masking; the dead
    ones' totals are put back afterwards (the reference adds them nothing once they are gone)."""
    c, _, heads, S = e.shape
    live = live0[0].astype(e.dtype)
    dead = np.where(live0[0], 0.0, np.inf).astype(e.dtype)
    acc = None if total is None else total[0]
    before = None if acc is None else acc.copy()
    frozen = np.empty(c, dtype=e.dtype)
    scale = 1.0 if acc is None else 1.0 / heads  # TOVA's argmin needs no mean; H2O accumulates the mean
    victims = np.empty((c, 1), dtype=np.int64)
    for t in range(c):
        n = C + t + 1
        live[n - 1] = 1.0
        dead[n - 1] = 0.0
        et = e[t, 0, :, :n]  # [heads, n]
        w = (scale / (et @ live[:n])) @ et  # each head's softmax over the alive entries, summed over heads
        if acc is not None:
            acc[:n] += w
            w = acc[:n]
        k = n if ends is None else ends[t, 0]
        score = w[:k] + dead[:k]
        v = int(score.argmin()) if k else -1
        if v < 0 or not np.isfinite(score[v]):
            raise _no_candidate(t, 0)
        live[v] = 0.0
        dead[v] = np.inf
        victims[t, 0] = v
        if acc is not None:
            frozen[t] = acc[v]
    if acc is not None:
        assert before is not None
        gone = ~live0[0] & (np.arange(S) < C)  # cache entries dead from the start (new tokens start dead too)
        acc[gone] = before[gone]
        acc[victims[:, 0]] = frozen
    return victims


def _decide(e: np.ndarray, live0: np.ndarray, C: int, ends: np.ndarray | None,
            total: np.ndarray | None) -> np.ndarray:
    """The per-token decisions for ``R`` (row, group) pairs at once: ``[c, R]`` entry indices. ``ends[t, r]``:
    row ``r``'s candidates at token ``t`` are its alive entries before that index (H2O); None: all alive."""
    c, R, heads, S = e.shape
    live = live0.astype(e.dtype)
    dead = np.where(live0, 0.0, np.inf).astype(e.dtype)
    flat = np.arange(R) * S
    victims = np.empty((c, R), dtype=np.int64)
    late = None if ends is None else np.where(np.arange(S)[None, None] < ends[:, :, None], 0.0, np.inf)  # [c, R, S]
    for t in range(c):
        n = C + t + 1
        live[:, n - 1] = 1.0
        dead[:, n - 1] = 0.0
        et = e[t, :, :, :n]  # [R, heads, n]
        inv_z = 1.0 / np.matmul(et, live[:, :n, None])  # [R, heads, 1]
        w = np.matmul(inv_z.transpose(0, 2, 1), et)[:, 0]  # [R, n]
        if total is not None:
            w *= live[:, :n]
            w *= 1.0 / heads
            total[:, :n] += w
            w = total[:, :n]
        score = w + dead[:, :n]
        if late is not None:
            score += late[t, :, :n]
        v = score.argmin(axis=1)
        gone = ~np.isfinite(score[np.arange(R), v])
        if gone.any():
            raise _no_candidate(t, int(np.argmax(gone)))
        np.put(live, flat + v, 0.0)
        np.put(dead, flat + v, np.inf)
        victims[t] = v
    return victims


def _no_candidate(t: int, r: int) -> ValueError:
    """The error for token ``t`` of (row, group) ``r`` finding no alive entry it may evict (only H2O's
    ``recent`` rule can protect every entry; a cache built by longseq always keeps more than ``recent``)."""
    return ValueError(f"eviction replay: token {t} of (row, group) {r} has no alive entry outside the protected "
                      "recent window to evict; the cache must keep more alive entries than `recent`")
