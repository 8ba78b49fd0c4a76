"""A test-only model kind: what adding a kind to longseq takes -- one model file plus its registry entry.

``toy-ema`` is a stack of blocks that mix tokens with a per-channel exponential moving average (a fixed,
learned decay) -- a recurrent layer with a ``[B, d]`` state, unlike any shipped kind. Importing this
module registers it; the CLI, training, evaluation, generation and the model-contract tests then take it
like any other kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from longseq.cache import RecurrentState
from longseq.models import Capabilities, ModelConfig, ModelSpec, register_model
from longseq.models.stack import StackLM
from longseq.nn import RMSNorm


@dataclass
class ToyConfig(ModelConfig):
    kind: ClassVar[str] = "toy-ema"
    presets: ClassVar[dict[str, dict[str, Any]]] = {"tiny": dict(d_model=32, n_layers=2)}


class EMABlock(nn.Module):
    """``s_t = a * s_{t-1} + (1 - a) * W_in x_t`` per channel (``a = sigmoid(decay)``), ``h + W_out s_t``."""

    def __init__(self, d_model: int, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(d_model, eps=eps)
        self.inp = nn.Linear(d_model, d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.decay = nn.Parameter(torch.zeros(d_model))

    def forward(self, h: Tensor, positions: Tensor, state: RecurrentState | None = None, *,
                row_mask: Tensor | None = None, options: Any = None) -> Tensor:
        u = self.inp(self.norm(h))  # [B, T, d]
        a = torch.sigmoid(self.decay).to(u.dtype)
        s = torch.zeros_like(u[:, 0]) if state is None else state.matrix.to(u.dtype)
        outs = []
        for t in range(u.shape[1]):
            s = a * s + (1 - a) * u[:, t]
            outs.append(s)
        if state is not None:
            state.update_(s.to(state.dtype), row_mask)
        return h + self.out(torch.stack(outs, 1))

    def step(self, h: Tensor, positions: Tensor, state: RecurrentState, *, row_mask: Tensor | None = None) -> Tensor:
        return self(h, positions, state, row_mask=row_mask)

    def init_state(self, batch_size: int, *, cache: Any = None, device: torch.device | None = None,
                   static_len: int | None = None) -> RecurrentState:
        if cache is not None:
            raise ValueError("toy-ema layers keep a fixed-size state; a cache policy does not apply to them")
        dtype = torch.promote_types(self.inp.weight.dtype, torch.float32)
        return RecurrentState.zeros((batch_size, self.inp.in_features), dtype=dtype, device=device,
                                    static=static_len is not None)


class ToyLM(StackLM):
    def __init__(self, config: ToyConfig) -> None:
        super().__init__(config, lambda cfg, layer: EMABlock(cfg.d_model, cfg.norm_eps))


SPEC = register_model(ModelSpec(
    "toy-ema", ToyConfig, ToyLM, "test-only: per-channel moving-average token mixer",
    lambda cfg: Capabilities(frozenset({"recurrent"})),
))
