"""Layers: attention (RoPE, GQA), gated linear attention, RMSNorm, SwiGLU."""

from .attention import Attention
from .gla import GatedLinearAttention
from .mlp import SwiGLU, swiglu_hidden
from .norm import RMSNorm
from .rotary import RotaryEmbedding

__all__ = ["Attention", "GatedLinearAttention", "RMSNorm", "RotaryEmbedding", "SwiGLU", "swiglu_hidden"]
