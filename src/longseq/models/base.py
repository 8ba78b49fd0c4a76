"""What every longseq language model shares: embeddings, a stack of blocks, the head, and the state API."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..cache.kv import KVCache
from ..nn.norm import RMSNorm
from .config import ModelConfig
from .fused_step import head_logits
from .state import ModelState


class LanguageModel(nn.Module):
    """Base class: ``model(input_ids) -> logits`` and the recurrent ``init_state`` / ``step`` API.

    Subclasses build ``self.blocks`` whose ``forward(h, positions, layer_state)`` returns
    ``(h, new_layer_state)`` and implement :meth:`_init_layer_state`.
    """

    config: ModelConfig

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList()
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    # -- construction -----------------------------------------------------------------------------
    def _finish_init(self) -> None:
        """Initialise weights (call at the end of the subclass constructor)."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        # GPT-2 style: the projections that write into the residual stream shrink with depth.
        for name, p in self.named_parameters():
            if name.endswith(("out.weight", "down.weight")) and name.startswith("blocks."):
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.config.n_layers))
        if self.config.tie_embeddings:
            self.head.weight = self.embed.weight

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (tied weights counted once)."""
        params = {id(p): p for p in self.parameters()}
        n = sum(p.numel() for p in params.values())
        if exclude_embeddings:
            n -= self.embed.weight.numel()
        return n

    # -- inputs ------------------------------------------------------------------------------------
    def check_input_ids(self, input_ids: Tensor) -> None:
        """Raise ``ValueError`` unless ``input_ids`` is a ``[B, T]`` integer tensor of ids in ``[0, vocab)``."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T]; got shape {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be an integer tensor; got dtype {input_ids.dtype}")
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
        if state.static:
            if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
                raise ValueError(
                    f"input_ids must be a [B, T] integer tensor; got {tuple(input_ids.shape)} {input_ids.dtype}"
                )
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

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    # -- full-sequence forward -----------------------------------------------------------------------
    def forward(self, input_ids: Tensor) -> Tensor:
        """``[B, T]`` token ids -> ``[B, T, vocab]`` logits; ``logits[:, i]`` predicts token ``i + 1``."""
        self.check_input_ids(input_ids)
        h = self.embed(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        for block in self.blocks:
            h, _ = block(h, positions, None)
        return self.head(self.norm(h))

    # -- recurrent form ------------------------------------------------------------------------------
    def _init_layer_state(self, layer: int, batch_size: int, cache: Any, device: torch.device) -> Any:
        raise NotImplementedError

    def _state_dtype_for_cache(self) -> torch.dtype:
        """dtype of static KV buffers: the weights' (activations match them outside autocast)."""
        return self.embed.weight.dtype

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
        most ``max_len`` tokens (GLA: the ``[B, H, K, V]`` matrices; KV caches: ``budget + 1`` slots, or
        ``max_len`` for ``Full``), positions become a ``[B]`` device tensor (rows may differ), and a
        single-token ``step`` allocates nothing step-dependent and never syncs with the device, so it can
        be captured in a CUDA graph. It gives the same logits as the default (dynamic) state. Fill rows
        from prefilled dynamic states with :meth:`ModelState.load_`; ``step`` with ``T > 1`` on a static
        state runs token by token. Without ``max_len`` (default) the state grows as needed, as before.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        device = torch.device(device) if device is not None else self.device
        layers = [self._init_layer_state(i, batch_size, cache, device) for i in range(len(self.blocks))]
        state = ModelState(layers=layers, batch_size=batch_size)
        if max_len is not None:
            self._make_static(state, self.blocks, max_len, max_len, device)
        return state

    def _make_static(
        self, state: ModelState, blocks: Any, max_len: int, cache_len: int, device: torch.device
    ) -> None:
        """Allocate the KV caches among ``state.layers`` (one per block of ``blocks``, in order) for
        ``cache_len`` positions and mark ``state`` static for rows of up to ``max_len`` tokens."""
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1; got {max_len}")
        for layer, block in zip(state.layers, blocks, strict=False):
            if isinstance(layer, KVCache) and not layer.static:
                attn = block.attn
                layer.allocate(
                    state.batch_size, attn.n_kv_heads, attn.head_dim, max_len=cache_len,
                    dtype=self._state_dtype_for_cache(), device=device,
                )
        state.static = True
        state.max_len = max_len
        state.positions = torch.zeros(state.batch_size, dtype=torch.long, device=device)
        state.host_positions = [0] * state.batch_size

    def decode_key(self, state: ModelState) -> Any:
        """Host-side key of the computation the next single-token ``step`` on static ``state`` runs.

        Steps with equal keys run the same kernels on the same buffers, so one captured CUDA graph serves
        them all. Plain models: always None (one graph per batch size); MEGABYTE distinguishes steps in
        which some row completes a patch (the global model runs).
        """
        return None

    def step(self, input_ids: Tensor, state: ModelState) -> tuple[Tensor, ModelState]:
        """Consume ``[B, T]`` new tokens (any ``T >= 1``: prefill and decode alike) after ``state``.

        Returns ``[B, T, vocab]`` logits and the updated state (the same object, updated in place).
        Over a sequence split into any pieces, the logits equal ``model(input_ids)``'s.
        """
        self.check_step_inputs(input_ids, state)
        if state.static:
            return self._static_step(input_ids, state), state
        T = input_ids.shape[1]
        h = self.embed(input_ids)
        positions = torch.arange(state.position, state.position + T, device=input_ids.device)
        for i, block in enumerate(self.blocks):
            h, state.layers[i] = block(h, positions, state.layers[i])
        state.position += T
        return self.head(self.norm(h)), state

    def _static_step(self, input_ids: Tensor, state: ModelState) -> Tensor:
        """``step`` on a static state: one token per row at the rows' own positions (``T > 1``: a loop)."""
        if input_ids.shape[1] > 1:
            return torch.cat([self._static_step(input_ids[:, j : j + 1], state) for j in range(input_ids.shape[1])], 1)
        assert state.positions is not None
        h = self.embed(input_ids)
        positions = state.positions[:, None]  # [B, 1]: per-row positions, read on the device
        for i, block in enumerate(self.blocks):
            layer = state.layers[i]
            # (hasattr, not getattr's bound method: torch.compile cannot branch on a method's truth value.)
            if isinstance(layer, KVCache) and hasattr(block, "can_fuse_step") and block.can_fuse_step(h):
                h = block.fused_step(h, positions, layer)  # same function, fewer kernels (TransformerBlock)
                continue
            h, new = block(h, positions, layer)
            if isinstance(layer, Tensor) and new is not layer:
                layer.copy_(new)  # in place: a captured graph keeps reading the same buffer
        state.positions += 1
        state.advance_(1)
        return head_logits(self.norm, self.head, h)
