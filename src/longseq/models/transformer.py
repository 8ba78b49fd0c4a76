"""Transformer++ language model: pre-RMSNorm blocks of RoPE attention and SwiGLU."""

from __future__ import annotations

from ..nn.blocks import TransformerBlock
from .config import TransformerConfig
from .stack import StackLM


def transformer_block(cfg: TransformerConfig) -> TransformerBlock:
    """The block a :class:`TransformerConfig` describes."""
    return TransformerBlock(
        cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.mlp_hidden, cfg.norm_eps, cfg.rope_theta,
        head_dim=cfg.head_dim, qkv_bias=cfg.qkv_bias, out_bias=cfg.out_bias, mlp_bias=cfg.mlp_bias,
        qk_norm=cfg.qk_norm, rope_scaling=cfg.rope_scaling_params(),
    )


class TransformerLM(StackLM):
    """Decoder-only Transformer++. Its recurrent state is one :class:`~longseq.cache.KVCache` per layer."""

    config: TransformerConfig

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config, lambda cfg, layer: transformer_block(cfg))
