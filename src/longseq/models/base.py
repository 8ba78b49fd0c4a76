"""The interface every longseq language model implements: ``model(ids) -> logits`` and the recurrent
``init_state`` / ``step`` API (every model is a (multi-)state RNN at inference)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from ..tokenizer import BYTES, Tokenizer
from .config import ModelConfig
from .registry import Capabilities, capabilities
from .state import ModelState, check_model_state


class LanguageModel(nn.Module, ABC):
    """Abstract base of longseq's models. Implementations: :class:`~longseq.models.stack.StackLM` (an
    embedding, a stack of blocks, a head: the Transformer and GLA) and
    :class:`~longseq.models.megabyte.MegabyteLM` (two stacks).

    * ``forward(input_ids)``: ``[B, T]`` ids -> ``[B, T, vocab]`` logits, ``logits[:, i]`` predicting
      token ``i + 1``;
    * ``init_state(batch_size, cache=..., max_len=...)``: a fresh :class:`ModelState`;
    * ``step(input_ids, state)``: ``[B, T]`` new tokens (any ``T >= 1``) -> logits, with ``state``
      updated in place. Over a sequence split into any pieces the logits equal ``forward``'s.
    """

    config: ModelConfig

    @abstractmethod
    def forward(self, input_ids: Tensor) -> Tensor:
        """``[B, T]`` token ids -> ``[B, T, vocab]`` logits; ``logits[:, i]`` predicts token ``i + 1``."""

    @abstractmethod
    def init_state(
        self,
        batch_size: int = 1,
        *,
        cache: Any = None,
        device: torch.device | str | None = None,
        max_len: int | None = None,
    ) -> ModelState:
        """A fresh state for ``batch_size`` sequences.

        ``cache`` is a :class:`~longseq.cache.CachePolicy` for models with softmax attention layers
        (default ``Full()``); models without such layers reject it.

        ``max_len`` makes the state *static*: every buffer is allocated now for ``batch_size`` rows of at
        most ``max_len`` tokens, positions become a ``[B]`` device tensor (rows may differ), and a
        single-token ``step`` allocates nothing step-dependent and never syncs with the device, so it can
        be captured in a CUDA graph. It gives the same logits as the default (dynamic) state. Fill rows
        from prefilled dynamic states with :meth:`ModelState.load_`; ``step`` with ``T > 1`` on a static
        state runs token by token.
        """

    @abstractmethod
    def step(self, input_ids: Tensor, state: ModelState) -> tuple[Tensor, ModelState]:
        """Consume ``[B, T]`` new tokens (any ``T >= 1``: prefill and decode alike) after ``state``.

        Returns ``[B, T, vocab]`` logits and the updated state (the same object, updated in place).
        """

    def step_last(self, input_ids: Tensor, state: ModelState) -> tuple[Tensor, ModelState]:
        """As :meth:`step`, returning only the logits after the last token, ``[B, vocab]``: what a prefill needs.
        Models override it to skip the others (a ``[B, T, vocab]`` tensor is gigabytes for a long prompt and a
        subword vocabulary)."""
        logits, state = self.step(input_ids, state)
        return logits[:, -1], state

    @abstractmethod
    def embedding_weights(self) -> list[Tensor]:
        """The token (and position) embedding tables, which :meth:`num_params` can leave out."""

    def decode_key(self, state: ModelState) -> Any:
        """Host-side key of the computation the next single-token ``step`` on static ``state`` runs.

        Steps with equal keys run the same kernels on the same buffers, so one captured CUDA graph serves
        them all. Default: always None (one graph per batch size).
        """
        return None

    @property
    def tokenizer(self) -> Tokenizer:
        """Text <-> ids for this model: bytes unless a tokenizer was attached (a converted pretrained model)."""
        return self.__dict__.get("_tokenizer", BYTES)

    @tokenizer.setter
    def tokenizer(self, tokenizer: Tokenizer) -> None:
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer must be a longseq.tokenizer.Tokenizer; got {type(tokenizer).__name__}")
        if tokenizer.vocab_size > self.config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only "
                             f"{self.config.vocab_size} embeddings")
        self.__dict__["_tokenizer"] = tokenizer

    @property
    def capabilities(self) -> Capabilities:
        """What this model can do, as its kind declares in the registry."""
        return capabilities(self.config)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (tied weights counted once); optionally without the embedding
        tables."""
        params = {id(p): p for p in self.parameters()}
        n = sum(p.numel() for p in params.values())
        if exclude_embeddings:
            tables = {id(t): t for t in self.embedding_weights()}
            n -= sum(t.numel() for t in tables.values())
        return n

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- input checks shared by every implementation ----------------------------------------------------
    def check_input_ids(self, input_ids: Tensor) -> None:
        """Raise ``ValueError`` unless ``input_ids`` is a ``[B, T]`` integer tensor of ids in ``[0, vocab)``."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T]; got shape {tuple(input_ids.shape)}")
        check_id_dtype(input_ids)
        if input_ids.numel() and not torch.compiler.is_compiling():
            # One host sync in the common (valid) case; the range is only read back to report an error.
            if bool(((input_ids < 0) | (input_ids >= self.config.vocab_size)).any()):
                lo, hi = int(input_ids.min()), int(input_ids.max())
                raise ValueError(
                    f"input_ids must lie in [0, {self.config.vocab_size}); got values in [{lo}, {hi}]"
                )

    def check_step_inputs(self, input_ids: Tensor, state: ModelState) -> None:
        """``check_input_ids`` plus: the batch matches the state's and at least one token is new.

        On a static state the id range is not read back (that would be a host sync in every decode
        step); the shape checks and the ``max_len`` bound (from host-side positions) still apply.
        """
        check_model_state(state)
        if not isinstance(input_ids, Tensor):
            raise TypeError(f"input_ids must be a [B, T] integer tensor; got {type(input_ids).__name__}")
        if state.static:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [B, T]; got shape {tuple(input_ids.shape)}")
            check_id_dtype(input_ids)
            assert state.host_positions is not None and state.max_len is not None
            if max(state.host_positions) + input_ids.shape[1] > state.max_len:
                raise ValueError(
                    f"a row would reach position {max(state.host_positions) + input_ids.shape[1]} > "
                    f"max_len={state.max_len} of this static state"
                )
        else:
            self.check_input_ids(input_ids)
        B, T = input_ids.shape
        if B != state.batch_size:
            raise ValueError(f"input_ids has batch {B} but the state was made for batch {state.batch_size}")
        if T == 0:
            raise ValueError("step needs at least one new token; got input_ids of shape [B, 0]")


#: The index dtypes an embedding takes. Narrower ones (uint8 bytes from a memory-mapped corpus, int16) are refused
#: rather than converted: a range check in them would wrap (uint8 256 is 0), and the embedding would reject them.
ID_DTYPES = (torch.int64, torch.int32)


def check_id_dtype(input_ids: Tensor) -> None:
    """``ValueError`` unless ``input_ids`` is int64 or int32 (:data:`ID_DTYPES`)."""
    if input_ids.dtype not in ID_DTYPES:
        raise ValueError(
            f"input_ids must be an integer tensor of int64 or int32; got dtype {input_ids.dtype} (convert with .long())"
        )


def check_state_args(batch_size: int, max_len: int | None) -> None:
    """The ``init_state`` argument checks every implementation shares."""
    for name, value in (("batch_size", batch_size), ("max_len", max_len)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"{name} must be an int; got {value!r} ({type(value).__name__})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if max_len is not None and max_len < 1:
        raise ValueError(f"max_len must be >= 1; got {max_len}")
