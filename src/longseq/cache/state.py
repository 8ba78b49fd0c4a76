"""The interface every per-layer state implements: what generation, evaluation, HF and the benchmarks
may ask of a layer's state without knowing what it is.

Two implementations ship with longseq: :class:`~longseq.cache.KVCache` (a softmax layer's keys and
values, bounded by a cache policy) and :class:`~longseq.cache.RecurrentState` (a fixed-size matrix, as
GLA carries). A model's state is a list of them (:class:`~longseq.models.ModelState`), in any mix.

Layouts: every state is batched along its first axis (``B`` rows). Two modes:

* *dynamic* (default): buffers grow or are replaced as tokens arrive;
* *static*: every buffer is allocated once for ``B`` rows and updated in place, so a single-token step
  touches the same memory every time and can be captured in a CUDA graph. Rows are filled from dynamic
  states with :meth:`LayerState.load_`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor


class LayerState(ABC):
    """One layer's recurrent state (see the module docstring)."""

    #: Whether the state is a cache of tokens (``kept_positions`` applies) rather than a summary of them.
    keeps_tokens: ClassVar[bool] = False
    #: Static mode: fixed buffers, updated in place (set when the state is allocated).
    static: bool = False

    # -- size ------------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def bounded(self) -> bool:
        """Whether the state's size has an upper bound independent of the sequence length."""

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes the state holds (tensor storage)."""

    def kept_positions(self) -> Tensor:
        """Original positions of the kept tokens, ``[B, n]`` (``[B, H_kv, n]`` for per-head policies).

        Only token caches keep positions; other states raise ``TypeError``."""
        raise TypeError(f"a {type(self).__name__} keeps no tokens, so it has no kept positions")

    # -- rows --------------------------------------------------------------------------------------------
    @abstractmethod
    def select_rows(self, index: Sequence[int] | Tensor) -> LayerState:
        """A new state holding rows ``index`` of this one (copies; rows may repeat, as in beam search)."""

    @classmethod
    @abstractmethod
    def concat(cls, states: Sequence[LayerState]) -> LayerState:
        """One state whose rows are the rows of ``states`` in order (they must be alike: same policy and,
        for caches, the same number of kept tokens)."""

    @abstractmethod
    def restart_rows_(self, rows: Tensor) -> None:
        """Forget everything in the rows where ``rows`` (``[B]`` bool) is True: those rows start over at
        position 0 (MEGABYTE's local model at a patch boundary). Fixed shapes, no host sync."""

    # -- placement and static mode ---------------------------------------------------------------------------
    @abstractmethod
    def to(self, device: torch.device | str) -> LayerState:
        """Move the state's tensors to ``device``; returns self."""

    @abstractmethod
    def load_(self, src: LayerState, rows: slice) -> None:
        """Static mode: copy the state ``src`` (of as many rows as ``rows`` selects) into rows ``rows``. Calls
        :meth:`check_load` first."""

    def check_load(self, src: LayerState) -> None:
        """Raise (``TypeError`` / ``ValueError`` naming the mismatch) unless :meth:`load_` can copy ``src`` here.
        A model state checks every layer this way before it copies any, so a failed load changes nothing."""
        if type(src) is not type(self):
            raise TypeError(f"cannot load a {type(src).__name__} into a {type(self).__name__}")

    def reserve(self, n_tokens: int) -> None:  # noqa: B027  (optional: most states have nothing to reserve)
        """Hint that ``n_tokens`` are about to arrive, so growing buffers can allocate once."""

    # -- CUDA-graph capture ---------------------------------------------------------------------------------
    def host_snapshot(self) -> Any:
        """Host-side bookkeeping that a captured step's Python would advance (a replay runs no Python): taken
        before a capture and put back with :meth:`restore_host` after it."""
        return None

    def restore_host(self, snapshot: Any) -> None:  # noqa: B027  (stateless on the host by default)
        """Undo the host-side bookkeeping of a step that ran only to be captured."""


def row_index(index: Sequence[int] | Tensor, device: torch.device) -> Tensor:
    """Row indices as an int64 tensor on ``device``."""
    return torch.as_tensor(index, dtype=torch.long, device=device)


def same_kind(states: Sequence[LayerState]) -> type[LayerState]:
    """The one class of ``states``; ``ValueError`` for an empty or mixed list."""
    if not states:
        raise ValueError("cannot concatenate an empty list of layer states")
    kinds = {type(s) for s in states}
    if len(kinds) > 1:
        raise ValueError(f"cannot concatenate layer states of different kinds: {sorted(k.__name__ for k in kinds)}")
    return type(states[0])
