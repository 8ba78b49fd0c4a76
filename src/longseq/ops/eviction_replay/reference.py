"""The eviction replay in plain PyTorch: the definition the Triton kernel is tested against, and the path
on CPU (layouts in the package docstring)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def check_replay_inputs(scores: Tensor, key_pos: Tensor, pos: Tensor, alive: Tensor, acc: Tensor | None) -> None:
    """Raise ValueError unless the layouts of the package docstring hold (shapes and dtypes)."""
    if scores.dim() != 4 or not scores.is_floating_point():
        raise ValueError(f"scores must be a float [B, H, c, S] tensor; got {tuple(scores.shape)} {scores.dtype}")
    B, H, c, S = scores.shape
    G = key_pos.shape[1] if key_pos.dim() == 3 else 0
    if key_pos.shape != (B, G, S) or G == 0 or H % G:
        raise ValueError(f"key_pos must be [B, G, S] = [{B}, G, {S}] with G dividing H={H}; got {tuple(key_pos.shape)}")
    if pos.shape != (B, c) or c > S:
        raise ValueError(f"pos must be [B, c] = [{B}, {c}] (c <= S={S}); got {tuple(pos.shape)}")
    if alive.shape != (B, G, S) or alive.dtype != torch.bool:
        raise ValueError(f"alive must be a bool [{B}, {G}, {S}] tensor; got {tuple(alive.shape)} {alive.dtype}")
    if acc is not None and acc.shape != (B, G, S):
        raise ValueError(f"acc must be [{B}, {G}, {S}]; got {tuple(acc.shape)}")


def replay_evictions_reference(
    scores: Tensor,
    key_pos: Tensor,
    pos: Tensor,
    alive: Tensor,
    acc: Tensor | None,
    select_victim: Callable[[Tensor, Tensor, Tensor], Tensor],
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The replay in PyTorch, for any policy's ``select_victim(positions, current, scores)`` (empty
    entries at position -1). ``alive`` and ``acc`` are updated in place and returned."""
    check_replay_inputs(scores, key_pos, pos, alive, acc)
    B, H, c, S = scores.shape
    G = key_pos.shape[1]
    heads = H // G
    seen = torch.empty(B, G, c, S, dtype=torch.bool, device=scores.device)
    for t in range(c):
        alive[..., S - c + t] = True
        seen[:, :, t] = alive
        visible = alive.repeat_interleave(heads, dim=1) if G > 1 else alive.expand(B, H, S)
        w = scores[:, :, t].masked_fill(~visible, float("-inf")).softmax(-1)
        w = w.view(B, G, heads, S).mean(2)
        if acc is not None:
            acc += w
            w = acc
        victim = select_victim(key_pos.masked_fill(~alive, -1), pos[:, t].view(B, 1, 1), w)  # [B, G, 1]
        alive.scatter_(2, victim, False)
    return seen, alive, acc
