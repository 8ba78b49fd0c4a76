"""Transformer++ language model: pre-RMSNorm blocks of RoPE attention and SwiGLU."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..cache.kv import KVCache
from ..cache.policies import CachePolicy
from ..nn.attention import Attention
from ..nn.mlp import SwiGLU
from ..nn.norm import RMSNorm
from .base import LanguageModel
from .config import TransformerConfig


class TransformerBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.rope_theta)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden)

    def forward(self, h: Tensor, positions: Tensor, cache: KVCache | None) -> tuple[Tensor, KVCache | None]:
        h = h + self.attn(self.attn_norm(h), positions, cache)
        return h + self.mlp(self.mlp_norm(h)), cache


class TransformerLM(LanguageModel):
    """Decoder-only Transformer++. Its recurrent state is one :class:`KVCache` per layer."""

    config: TransformerConfig

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config)
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self._finish_init()

    def _init_layer_state(
        self, layer: int, batch_size: int, cache: CachePolicy | None, device: torch.device
    ) -> KVCache:
        if cache is not None and not isinstance(cache, CachePolicy):
            raise TypeError(f"cache must be a CachePolicy such as Full(); got {type(cache).__name__}")
        return KVCache(cache)
