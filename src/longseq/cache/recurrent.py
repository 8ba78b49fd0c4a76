"""A fixed-size recurrent layer state: GLA's ``[B, H, K, V]`` matrix."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .state import LayerState, row_index, same_kind


class RecurrentState(LayerState):
    """A matrix per row, ``[B, ...]`` (GLA: ``[B, H, K, V]``, fp32 for fp32/bf16/fp16 models), that a layer
    reads and replaces at every step. Its size does not depend on the sequence length.

    Dynamic states take the layer's new matrix by reference (:meth:`update_`); static ones copy it into
    their buffer, which a captured CUDA graph keeps reading.
    """

    keeps_tokens = False

    def __init__(self, matrix: Tensor, *, static: bool = False) -> None:
        self.matrix = matrix
        self.static = static

    @classmethod
    def zeros(
        cls, shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device | str | None, static: bool = False
    ) -> RecurrentState:
        return cls(torch.zeros(shape, dtype=dtype, device=device), static=static)

    def __repr__(self) -> str:
        return f"RecurrentState({tuple(self.matrix.shape)}, {self.matrix.dtype}, static={self.static})"

    @property
    def shape(self) -> torch.Size:
        return self.matrix.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.matrix.dtype

    @property
    def bounded(self) -> bool:
        return True

    def nbytes(self) -> int:
        return self.matrix.numel() * self.matrix.element_size()

    def kept_positions(self) -> Tensor:
        raise TypeError(f"a fixed-size {tuple(self.matrix.shape)} matrix state keeps no tokens")

    def update_(self, new: Tensor, row_mask: Tensor | None = None) -> None:
        """Take the layer's matrix after the step; rows outside ``row_mask`` (``[B]`` bool) keep theirs."""
        if row_mask is not None:
            new = torch.where(row_mask.view(-1, *([1] * (new.dim() - 1))), new, self.matrix)
        if not self.static:
            self.matrix = new
        elif new is not self.matrix:  # an in-place kernel may already have written the buffer
            self.matrix.copy_(new)

    def select_rows(self, index: Sequence[int] | Tensor) -> RecurrentState:
        rows = self.matrix.index_select(0, row_index(index, self.matrix.device))
        return RecurrentState(rows, static=self.static)  # the same mode, as KVCache.select_rows

    @classmethod
    def concat(cls, states: Sequence[LayerState]) -> RecurrentState:
        same_kind(states)
        if len({s.static for s in states}) > 1:
            raise ValueError("cannot concatenate static and dynamic recurrent states")
        return cls(torch.cat([s.matrix for s in states]), static=states[0].static)  # type: ignore[attr-defined]

    def restart_rows_(self, rows: Tensor) -> None:
        self.matrix.masked_fill_(rows.view(-1, *([1] * (self.matrix.dim() - 1))), 0.0)

    def to(self, device: torch.device | str) -> RecurrentState:
        self.matrix = self.matrix.to(device)
        return self

    def check_load(self, src: LayerState) -> None:
        super().check_load(src)
        assert isinstance(src, RecurrentState)
        if src.matrix.shape[1:] != self.matrix.shape[1:]:
            raise ValueError(f"cannot load a state of per-row shape {tuple(src.matrix.shape[1:])} into one of "
                             f"{tuple(self.matrix.shape[1:])}")

    def load_(self, src: LayerState, rows: slice) -> None:
        self.check_load(src)
        assert isinstance(src, RecurrentState)
        self.matrix[rows] = src.matrix
