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

    Static states (``model.init_state(batch_size, max_len=N)``) preallocate every buffer once and keep
    one position per row:

    * ``positions``: ``[B]`` int64 device tensor, tokens consumed by each row (rows may differ: a batch of
      prompts of different lengths); it is what the decode step reads, so no host value enters the step;
    * ``host_positions``: the same numbers on the host, advanced by ``step`` (and by a CUDA-graph replay's
      caller), for bounds checks and host-side decisions that must not read the device;
    * ``max_len``: the most tokens a row may reach;
    * ``position``: ``max(host_positions)`` (all rows' position when they are in step).

    A static state is filled row by row from dynamic states with :meth:`load_` (prefill), then advanced
    one token per row per ``step``.
    """

    layers: list[Tensor | KVCache]
    batch_size: int
    position: int = 0
    extra: dict[str, object] = field(default_factory=dict)
    static: bool = False
    positions: Tensor | None = None
    host_positions: list[int] | None = None
    max_len: int | None = None

    def advance_(self, n: int = 1) -> None:
        """Host bookkeeping after ``n`` tokens per row (``step`` calls it; so does a graph replay's caller,
        since a replay runs no Python). Static states only."""
        assert self.host_positions is not None
        self.host_positions = [p + n for p in self.host_positions]
        self.position = max(self.host_positions)

    def load_(self, src: ModelState, rows: int | slice | None = None) -> ModelState:
        """Copy the (dynamic) state ``src`` into batch rows ``rows`` of this static state; returns self.

        ``src`` comes from the same model and cache policy, with as many rows as ``rows`` selects
        (default: all). This is how prompts of different lengths enter one batch: each is prefilled on
        its own and loaded into its row; padding never enters a state.
        """
        if not self.static:
            raise ValueError("load_() fills a static state (made by init_state(..., max_len=N))")
        rows = _as_rows(rows, self.batch_size)
        n_rows = len(range(*rows.indices(self.batch_size)))
        if src.batch_size != n_rows or len(src.layers) != len(self.layers):
            raise ValueError(f"cannot load a state of batch {src.batch_size} into {n_rows} rows")
        src_pos = src.host_positions if src.static else [src.position] * src.batch_size
        assert src_pos is not None and self.positions is not None and self.host_positions is not None
        if self.max_len is not None and max(src_pos) > self.max_len:
            raise ValueError(f"the source state is at position {max(src_pos)} > max_len={self.max_len}")
        for dst, layer in zip(self.layers, src.layers, strict=True):
            if isinstance(dst, KVCache):
                assert isinstance(layer, KVCache)
                dst.load_(layer, rows)
            else:
                dst[rows] = layer
        self.positions[rows] = torch.tensor(src_pos, dtype=torch.long, device=self.positions.device)
        self.host_positions[rows] = src_pos
        self.position = max(self.host_positions)
        return self

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
        if self.positions is not None:
            self.positions = self.positions.to(device)
        return self


def _as_rows(rows: int | slice | None, batch_size: int) -> slice:
    if rows is None:
        return slice(0, batch_size)
    if isinstance(rows, int):
        if not 0 <= rows < batch_size:
            raise IndexError(f"row {rows} out of range for batch {batch_size}")
        return slice(rows, rows + 1)
    return rows
