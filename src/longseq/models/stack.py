"""A stack of residual blocks and the language model made of one: embedding -> blocks -> norm -> head.

The Transformer and GLA models are :class:`StackLM` s that differ only in their block, and the hybrid one
that mixes the two blocks by layer; MEGABYTE composes two :class:`BlockStack` s (see
:mod:`longseq.models.megabyte`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection
from typing import Any

import torch
from torch import Tensor, nn

from ..cache.state import LayerState
from ..nn.attention import AttentionOptions
from ..nn.fused import head_logits
from ..nn.norm import RMSNorm
from .base import LanguageModel, check_state_args
from .config import ModelConfig
from .init import init_weights
from .state import ModelState


class BlockStack(nn.ModuleList):
    """Blocks applied in order to a residual stream ``[B, T, d]``, each with its own layer state (see
    :mod:`longseq.nn.blocks` for the block interface). A ``ModuleList``, so parameter names stay
    ``<stack>.<i>.<...>``."""

    def forward(self, h: Tensor, positions: Tensor, states: list[LayerState] | None = None, *,
                row_mask: Tensor | None = None, options: AttentionOptions | None = None) -> Tensor:
        """Any number of tokens; ``states`` (one per block, updated in place) or None (stateless)."""
        for i, block in enumerate(self):
            h = block(h, positions, None if states is None else states[i], row_mask=row_mask, options=options)
        return h

    def step(self, h: Tensor, positions: Tensor, states: list[LayerState], *,
             row_mask: Tensor | None = None) -> Tensor:
        """One token per row (``h`` ``[B, 1, d]``, ``positions`` ``[B, 1]``) through each block's ``step``."""
        for block, state in zip(self, states, strict=True):
            h = block.step(h, positions, state, row_mask=row_mask)
        return h

    def check_states(self, states: list[LayerState]) -> None:
        """``ValueError`` unless ``states`` holds one state per block, each of the kind and shape its block keeps:
        a state made by another model would otherwise fail deep inside a layer, or be half ignored."""
        if len(states) != len(self):
            raise ValueError(f"the state holds {len(states)} layer states for {len(self)} blocks "
                             "(pass a state from this model's init_state)")
        for i, (block, state) in enumerate(zip(self, states, strict=True)):
            check = getattr(block, "check_state", None)  # optional in the block interface (a user's block may lack it)
            if check is not None:
                check(state, i)

    def init_states(self, batch_size: int, *, cache: Any = None, device: torch.device | None = None,
                    static_len: int | None = None, policy_layers: Collection[int] | None = None) -> list[LayerState]:
        """One fresh state per block (see the blocks' ``init_state``); the cache policy goes to the blocks in
        ``policy_layers`` (default: all, so a block without a KV cache refuses it), the others get None."""
        return [b.init_state(batch_size, cache=cache if policy_layers is None or i in policy_layers else None,
                             device=device, static_len=static_len) for i, b in enumerate(self)]


def compile_blocks(model: nn.Module, **options: Any) -> int:
    """``torch.compile`` every block of every :class:`BlockStack` in ``model``, in place (regional compilation).

    Blocks of one kind run the same code, so dynamo traces one of them and every other reuses its graph (their
    weights are the graph's inputs): a 28-layer model compiles in about the time of one layer, where compiling the
    whole model traces all 28 into one graph. (Blocks of one kind called at other shapes, as MEGABYTE's global and
    local stacks are, get a graph per shape with ``dynamic=False``.) Embedding, final norm and head stay eager.
    ``options`` go to ``torch.compile``. Call it before any parallel wrapper is applied (FSDP then shards the
    compiled blocks). A model without a ``BlockStack`` is compiled whole (``model.compile``).

    From then on every call of the blocks goes through dynamo, evaluation and decoding on a dynamic state included
    (the static-state ``step`` path does not call them). Code that should run eager, without compiling graphs for
    its own shapes and grad mode, runs under :func:`eager_if_compiled` (``torch.compiler.set_stance("force_eager")``),
    as ``longseq train``'s validation and ``longseq bench``'s generation do.

    Returns the number of blocks compiled (0 when the model was compiled whole).
    """
    blocks = [block for stack in model.modules() if isinstance(stack, BlockStack) for block in stack]
    if not blocks:
        model.compile(**options)
    for block in blocks:
        block.compile(**options)
    return len(blocks)


def eager_if_compiled(compiled: bool) -> contextlib.AbstractContextManager:
    """The context that runs a :func:`compile_blocks`-compiled model eager (``force_eager``) when ``compiled``, so
    that work at other shapes or grad modes than training's (validation, generation) compiles no graphs of its own;
    a no-op context otherwise."""
    return torch.compiler.set_stance("force_eager") if compiled else contextlib.nullcontext()


class StackLM(LanguageModel):
    """Token embedding, a :class:`BlockStack` of ``config.n_layers`` blocks, block ``i`` made by
    ``make_block(config, i)``, a final RMSNorm and the output head (tied to the embedding with
    ``tie_embeddings``). Its state is one layer state per block; a cache policy goes to the blocks in
    ``policy_layers`` (None: every block)."""

    #: The layers whose states a cache policy bounds (None: all of them).
    policy_layers: frozenset[int] | None = None

    def __init__(self, config: ModelConfig, make_block: Callable[[Any, int], nn.Module]) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = BlockStack(make_block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        init_weights(self, config.init_std, {"blocks.": config.n_layers})
        if config.tie_embeddings:
            self.head.weight = self.embed.weight

    def embedding_weights(self) -> list[Tensor]:
        return [self.embed.weight]

    def forward(self, input_ids: Tensor) -> Tensor:
        self.check_input_ids(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.head(self.norm(self.blocks(self.embed(input_ids), positions)))

    def init_state(self, batch_size: int = 1, *, cache: Any = None, device: torch.device | str | None = None,
                   max_len: int | None = None) -> ModelState:
        check_state_args(batch_size, max_len)
        device = torch.device(device) if device is not None else self.device
        layers = self.blocks.init_states(batch_size, cache=cache, device=device, static_len=max_len,
                                         policy_layers=self.policy_layers)
        state = ModelState(layers=layers, batch_size=batch_size)
        if max_len is not None:
            state.make_static_(max_len, device)
        return state

    def step(self, input_ids: Tensor, state: ModelState) -> tuple[Tensor, ModelState]:
        return self._step(input_ids, state, last_only=False)

    def step_last(self, input_ids: Tensor, state: ModelState) -> tuple[Tensor, ModelState]:
        logits, state = self._step(input_ids, state, last_only=True)
        return logits[:, -1], state

    def _step(self, input_ids: Tensor, state: ModelState, last_only: bool) -> tuple[Tensor, ModelState]:
        """:meth:`step`'s logits ``[B, T, vocab]``, or ``[B, 1, vocab]`` after the last token only."""
        self.check_step_inputs(input_ids, state)
        if type(state) is not ModelState:  # e.g. a MegabyteState: its layers count patches, not tokens
            raise TypeError(f"state must come from {type(self).__name__}.init_state; got {type(state).__name__}")
        self.blocks.check_states(state.layers)
        if state.static:
            logits = self._static_step(input_ids, state)
            return (logits[:, -1:] if last_only else logits), state
        T = input_ids.shape[1]
        positions = torch.arange(state.position, state.position + T, device=input_ids.device)
        h = self.blocks(self.embed(input_ids), positions, state.layers)
        state.position += T
        return self.head(self.norm(h[:, -1:] if last_only else h)), state

    def _static_step(self, input_ids: Tensor, state: ModelState) -> Tensor:
        """``step`` on a static state: one token per row at the rows' own positions (``T > 1``: a loop)."""
        if input_ids.shape[1] > 1:
            return torch.cat([self._static_step(input_ids[:, j : j + 1], state) for j in range(input_ids.shape[1])], 1)
        assert state.positions is not None
        positions = state.positions[:, None]  # [B, 1]: per-row positions, read on the device
        h = self.blocks.step(self.embed(input_ids), positions, state.layers)
        state.positions += 1
        state.advance_(1)
        return head_logits(self.norm, self.head, h)
