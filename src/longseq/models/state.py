"""The recurrent state every longseq model carries between ``step`` calls."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..cache.kv import KVCache


@dataclass
class ModelState:
    """Per-layer states plus the number of tokens consumed so far.

    ``layers[i]`` is whatever layer ``i`` carries: a ``[B, H, K, V]`` fp32 matrix for GLA, a
    :class:`KVCache` for softmax attention. Mixed lists (hybrid models) are fine. ``step`` updates the
    state in place and returns it.
    """

    layers: list[Tensor | KVCache]
    batch_size: int
    position: int = 0
    extra: dict[str, object] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Bytes held by all layer states (tensor storage only)."""
        total = 0
        for layer in self.layers:
            total += layer.nbytes() if isinstance(layer, KVCache) else layer.numel() * layer.element_size()
        return total

    def kept_positions(self, layer: int) -> Tensor:
        """Original positions of the tokens layer ``layer`` keeps: ``[B, n]`` (``[B, H, n]`` per-head policies).

        Raises ``TypeError`` for layers whose state is a fixed-size matrix (GLA keeps no tokens).
        """
        if not -len(self.layers) <= layer < len(self.layers):
            raise IndexError(f"layer {layer} out of range for a model with {len(self.layers)} layers")
        state = self.layers[layer]
        if not isinstance(state, KVCache):
            raise TypeError(f"layer {layer} carries a fixed-size {tuple(state.shape)} matrix state, not a token cache")
        return state.kept_positions()

    def to(self, device: torch.device | str) -> ModelState:
        """Move tensor layer states (not caches) to ``device``; returns self."""
        self.layers = [s if isinstance(s, KVCache) else s.to(device) for s in self.layers]
        return self
