"""The recurrent state every longseq model carries between ``step`` calls."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..cache.state import LayerState


@dataclass
class ModelState:
    """Per-layer states plus the number of tokens consumed so far.

    ``layers[i]`` is layer ``i``'s :class:`~longseq.cache.LayerState`: a
    :class:`~longseq.cache.RecurrentState` (GLA's ``[B, H, K, V]`` matrix) or a
    :class:`~longseq.cache.KVCache` (softmax attention), in any mix. ``step`` updates the state in place
    and returns it.

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

    layers: list[LayerState]
    batch_size: int
    position: int = 0
    static: bool = False
    positions: Tensor | None = None
    host_positions: list[int] | None = None
    max_len: int | None = None

    def make_static_(self, max_len: int, device: torch.device) -> None:
        """Mark the state static for rows of up to ``max_len`` tokens (its layers were allocated static)."""
        self.static = True
        self.max_len = max_len
        self.positions = torch.zeros(self.batch_size, dtype=torch.long, device=device)
        self.host_positions = [0] * self.batch_size

    @property
    def persistent_layers(self) -> list[LayerState]:
        """The layer states that persist along the whole sequence (what a prefill's memory depends on):
        all of them here; MEGABYTE's local states restart at every patch."""
        return self.layers

    @property
    def persistent_positions(self) -> int:
        """Positions the :attr:`persistent_layers` have taken so far: the tokens consumed, here (a static
        state's furthest row)."""
        return self.position

    def reserve(self, n_tokens: int) -> None:
        """Hint that ``n_tokens`` tokens per row are about to arrive (a prompt), so each layer's growing
        buffers allocate once for them instead of regrowing as they stream in."""
        for layer in self.layers:
            layer.reserve(n_tokens)

    def advance_(self, n: int = 1) -> None:
        """Host bookkeeping after ``n`` tokens per row (``step`` calls it; so does a graph replay's caller,
        since a replay runs no Python). Static states only."""
        assert self.host_positions is not None
        self.host_positions = [p + n for p in self.host_positions]
        self.position = max(self.host_positions)

    def host_snapshot(self) -> Any:
        """Everything on the host that a step advances (positions, layers' bookkeeping): taken before a
        CUDA-graph capture, whose Python runs once without the step really happening."""
        host = None if self.host_positions is None else list(self.host_positions)
        return host, self.position, [layer.host_snapshot() for layer in self.layers]

    def restore_host(self, snapshot: Any) -> None:
        """Put back a :meth:`host_snapshot`."""
        self.host_positions, self.position, layers = snapshot
        for layer, s in zip(self.layers, layers, strict=True):
            layer.restore_host(s)

    def load_(self, src: ModelState, rows: int | slice | None = None) -> ModelState:
        """Copy the (dynamic) state ``src`` into batch rows ``rows`` of this static state; returns self.

        ``src`` comes from the same model and cache policy, with as many rows as ``rows`` selects
        (default: all). This is how prompts of different lengths enter one batch: each is prefilled on
        its own and loaded into its row; padding never enters a state.
        """
        if not self.static:
            raise ValueError("load_() fills a static state (made by init_state(..., max_len=N))")
        rows = as_rows(rows, self.batch_size)
        n_rows = len(range(*rows.indices(self.batch_size)))
        if src.batch_size != n_rows or len(src.layers) != len(self.layers):
            raise ValueError(f"cannot load a state of batch {src.batch_size} into {n_rows} rows")
        src_pos = src.host_positions if src.static else [src.position] * src.batch_size
        assert src_pos is not None and self.positions is not None and self.host_positions is not None
        if self.max_len is not None and max(src_pos) > self.max_len:
            raise ValueError(f"the source state is at position {max(src_pos)} > max_len={self.max_len}")
        for i, (dst, layer) in enumerate(zip(self.layers, src.layers, strict=True)):
            try:  # every layer first: a load that fails must change nothing
                dst.check_load(layer)
            except (TypeError, ValueError) as err:
                raise type(err)(f"layer {i}: {err}") from None
        for dst, layer in zip(self.layers, src.layers, strict=True):
            dst.load_(layer, rows)
        self.positions[rows] = torch.tensor(src_pos, dtype=torch.long, device=self.positions.device)
        self.host_positions[rows] = src_pos
        self.position = max(self.host_positions)
        return self

    def nbytes(self) -> int:
        """Bytes held by all layer states (tensor storage only)."""
        return sum(layer.nbytes() for layer in self.layers)

    def kept_positions(self, layer: int) -> Tensor:
        """Original positions of the tokens layer ``layer`` keeps: ``[B, n]`` (``[B, H, n]`` per-head policies).

        Raises ``TypeError`` for layers whose state is a fixed-size matrix (GLA keeps no tokens).
        """
        if not -len(self.layers) <= layer < len(self.layers):
            raise IndexError(f"layer {layer} out of range for a model with {len(self.layers)} layers")
        try:
            return self.layers[layer].kept_positions()
        except TypeError as err:
            raise TypeError(f"layer {layer}: {err}") from None

    def to(self, device: torch.device | str) -> ModelState:
        """Move every layer state (and the positions) to ``device``; returns self."""
        self.layers = [s.to(device) for s in self.layers]
        if self.positions is not None:
            self.positions = self.positions.to(device)
        return self


def check_model_state(state: object) -> None:
    """``TypeError`` unless ``state`` is a :class:`ModelState` (``step`` needs the one ``init_state`` made)."""
    if not isinstance(state, ModelState):
        raise TypeError(f"state must be the ModelState that model.init_state(...) returns; got {type(state).__name__}")


def as_rows(rows: int | slice | None, batch_size: int) -> slice:
    """``load_``'s ``rows`` argument as a slice of ``range(batch_size)``."""
    if rows is None:
        return slice(0, batch_size)
    if isinstance(rows, int):
        if not 0 <= rows < batch_size:
            raise IndexError(f"row {rows} out of range for batch {batch_size}")
        return slice(rows, rows + 1)
    return rows
