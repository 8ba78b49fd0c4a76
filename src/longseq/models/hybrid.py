"""Hybrid language model: GLA blocks with softmax-attention blocks at chosen layers (issue 20).

Each of the three papers gives something up: GLA keeps a fixed state but recalls exact tokens from far
back poorly, attention recalls well but its cache grows with the context, and TOVA bounds that cache at
the price of what it evicts. A few attention layers in a GLA stack (the GLA paper's hybrid ablations,
Samba, Jamba), with a cache policy on them, give a model whose whole state is bounded: fixed matrices in
the GLA layers, ``budget + 1`` KV slots in the attention layers.
"""

from __future__ import annotations

from torch import nn

from .config import HybridConfig
from .gla import gla_block
from .stack import StackLM
from .transformer import transformer_block


def hybrid_block(cfg: HybridConfig, layer: int) -> nn.Module:
    """Layer ``layer`` of the hybrid ``cfg`` describes: a Transformer++ block at the attention layers, a GLA
    block elsewhere."""
    if layer in cfg.attention_layers():
        return transformer_block(cfg.attention_config())
    return gla_block(cfg)


class HybridLM(StackLM):
    """GLA with softmax-attention layers. Its state holds a :class:`~longseq.cache.RecurrentState` per GLA
    layer and a :class:`~longseq.cache.KVCache` per attention layer; ``init_state(B, cache=policy)`` bounds
    the attention layers' caches (the GLA states are fixed-size already)."""

    config: HybridConfig

    def __init__(self, config: HybridConfig) -> None:
        super().__init__(config, hybrid_block)
        self.policy_layers = frozenset(config.attention_layers())
