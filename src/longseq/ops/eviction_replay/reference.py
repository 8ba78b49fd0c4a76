"""The eviction replay in plain PyTorch: the definition the Triton kernel is tested against, and the path
on CPU (layouts in the package docstring)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


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
