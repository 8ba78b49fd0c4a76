"""GLA language model: pre-RMSNorm blocks of gated linear attention and SwiGLU (Yang et al. 2024)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..nn.gla import GatedLinearAttention
from ..nn.mlp import SwiGLU
from ..nn.norm import RMSNorm
from .base import LanguageModel
from .config import GLAConfig


class GLABlock(nn.Module):
    def __init__(self, cfg: GLAConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = GatedLinearAttention(
            cfg.d_model, cfg.n_heads, cfg.expand_k, cfg.expand_v, cfg.gate_rank, cfg.gate_normalizer,
            cfg.norm_eps, cfg.backend,
        )
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden)

    def forward(self, h: Tensor, positions: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor | None]:
        mixed, state = self.attn(self.attn_norm(h), state)  # GLA needs no positions
        h = h + mixed
        return h + self.mlp(self.mlp_norm(h)), state


class GLALM(LanguageModel):
    """GLA Transformer. Its recurrent state is one fp32 ``[B, H, K, V]`` matrix per layer: constant in
    the context length."""

    config: GLAConfig

    def __init__(self, config: GLAConfig) -> None:
        super().__init__(config)
        self.blocks = nn.ModuleList(GLABlock(config) for _ in range(config.n_layers))
        self._finish_init()

    def _init_layer_state(self, layer: int, batch_size: int, cache: object, device: torch.device) -> Tensor:
        if cache is not None:
            raise ValueError("GLA layers keep a fixed-size matrix state; a cache policy does not apply to them")
        attn = self.blocks[layer].attn
        # fp32 state for fp32/bf16/fp16 weights; fp64 models (exactness tests) keep an fp64 state.
        dtype = torch.promote_types(self.embed.weight.dtype, torch.float32)
        return torch.zeros(batch_size, attn.n_heads, attn.head_k, attn.head_v, device=device, dtype=dtype)
