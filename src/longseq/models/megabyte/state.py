"""The state of a MEGABYTE model: the global stack's layer states, the local stack's, and the patch in
progress."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...cache.state import LayerState
from ..state import ModelState, as_rows


@dataclass
class MegabyteState(ModelState):
    """State of a :class:`~longseq.models.MegabyteLM` after ``position`` bytes.

    ``layers`` lists the global model's layer states first (``n_global_layers`` of them: one
    :class:`~longseq.cache.KVCache` over *patch* positions, or one GLA matrix, per layer), then the local
    model's for the current patch (restarted at every patch boundary), so ``nbytes`` and
    ``kept_positions`` work as for the other models (for global layers, kept positions are patch
    indices). Besides those:

    * ``patch_ids``: ``[B, position % P]`` bytes of the input patch not yet complete (the global model
      takes a patch only once all ``P`` bytes are known);
    * ``local_from_global``: ``[B, P, D_L]`` the projected global output of the current target patch.

    A static state (``init_state(..., max_len=N)``) holds fixed buffers instead: ``patch_ids`` is
    ``[B, P]`` (byte ``n`` of a row is written at column ``n % P``), the global KV caches have
    ``N // P + 2`` patch slots (``Full``) or ``budget + 1``, the local caches ``P`` slots, and
    ``local_from_global`` is updated in place.
    """

    n_global_layers: int = 0
    patch_size: int = 0  # P; both builders (init_state, the static one) set it
    patch_ids: Tensor | None = None
    local_from_global: Tensor | None = None
    started: bool = False

    @property
    def global_layers(self) -> list[LayerState]:
        return self.layers[: self.n_global_layers]

    @property
    def local_layers(self) -> list[LayerState]:
        return self.layers[self.n_global_layers :]

    @property
    def persistent_layers(self) -> list[LayerState]:
        """The global layers: the local ones hold at most one patch (they restart at every patch)."""
        return self.global_layers

    @property
    def persistent_positions(self) -> int:
        """Patch positions the global layers have taken: position 0 (the pads) once started, then one per input
        patch completed, so ``position // P + 1``."""
        return self.position // self.patch_size + 1 if self.started else 0

    def reserve(self, n_tokens: int) -> None:
        """As :meth:`ModelState.reserve`, counted in the units each stack sees: the global layers take one
        position per patch (``n_tokens // P`` plus the pads' and a partial patch's); the local layers restart
        at every patch, so there is nothing to reserve for them."""
        if self.patch_size < 1:
            raise ValueError(f"MegabyteState.patch_size must be set (>= 1); got {self.patch_size}")
        P = self.patch_size
        for layer in self.global_layers:
            layer.reserve(n_tokens // P + 2)

    def set_local(self, states: list[LayerState]) -> None:
        """Replace the local layer states (a new patch starts with fresh ones)."""
        self.layers = self.global_layers + list(states)

    def load_(self, src: ModelState, rows: int | slice | None = None) -> MegabyteState:
        """As :meth:`ModelState.load_`, plus the pending patch bytes and the current patch's global output
        (``src`` must have consumed at least one byte, or come from a static state)."""
        src = check_megabyte_state(src)
        if not src.started:
            raise ValueError("load_() needs a started MEGABYTE state (one that has consumed at least one byte)")
        super().load_(src, rows)
        rows = as_rows(rows, self.batch_size)
        assert self.patch_ids is not None and self.local_from_global is not None
        assert src.patch_ids is not None and src.local_from_global is not None
        self.patch_ids[rows, : src.patch_ids.shape[1]] = src.patch_ids
        self.local_from_global[rows] = src.local_from_global
        return self

    def nbytes(self) -> int:
        """Bytes held by the global and local layer states plus the pending patch and global slices."""
        total = super().nbytes()
        for t in (self.patch_ids, self.local_from_global):
            if t is not None:
                total += t.numel() * t.element_size()
        return total

    def to(self, device: torch.device | str) -> MegabyteState:
        super().to(device)
        if self.patch_ids is not None:
            self.patch_ids = self.patch_ids.to(device)
        if self.local_from_global is not None:
            self.local_from_global = self.local_from_global.to(device)
        return self


def check_megabyte_state(state: object) -> MegabyteState:
    """``state`` if it came from ``MegabyteLM.init_state``; ``TypeError`` otherwise."""
    if not isinstance(state, MegabyteState):
        raise TypeError(f"state must come from MegabyteLM.init_state; got {type(state).__name__}")
    return state
