"""Layers and the blocks models stack: attention (RoPE, GQA), gated linear attention, RMSNorm, SwiGLU;
Transformer and GLA blocks with their single-token steps and states."""

from .attention import Attention, AttentionOptions
from .blocks import GLABlock, TransformerBlock
from .gla import GatedLinearAttention
from .mlp import SwiGLU, swiglu_hidden
from .norm import RMSNorm
from .rotary import RotaryEmbedding

__all__ = [
    "Attention", "AttentionOptions", "GLABlock", "GatedLinearAttention", "RMSNorm", "RotaryEmbedding", "SwiGLU",
    "TransformerBlock", "swiglu_hidden",
]
