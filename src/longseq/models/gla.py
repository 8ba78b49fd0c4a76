"""GLA language model: pre-RMSNorm blocks of gated linear attention and SwiGLU (Yang et al. 2024)."""

from __future__ import annotations

from ..nn.blocks import GLABlock
from .config import GLAConfig
from .stack import StackLM


def gla_block(cfg: GLAConfig) -> GLABlock:
    """The block a :class:`GLAConfig` describes."""
    return GLABlock(cfg.d_model, cfg.n_heads, cfg.mlp_hidden, expand_k=cfg.expand_k, expand_v=cfg.expand_v,
                    gate_rank=cfg.gate_rank, gate_normalizer=cfg.gate_normalizer, norm_eps=cfg.norm_eps,
                    backend=cfg.backend)


class GLALM(StackLM):
    """GLA Transformer. Its recurrent state is one fp32 ``[B, H, K, V]`` matrix per layer
    (a :class:`~longseq.cache.RecurrentState`): constant in the context length."""

    config: GLAConfig

    def __init__(self, config: GLAConfig) -> None:
        super().__init__(config, lambda cfg, layer: gla_block(cfg))
