"""Language models and the factory that builds them by name."""

from __future__ import annotations

from typing import Any

from .base import LanguageModel
from .config import GLAConfig, HybridConfig, MegabyteConfig, ModelConfig, TransformerConfig
from .gla import GLALM
from .hybrid import HybridLM
from .megabyte import MegabyteLM, MegabyteState
from .registry import MODELS, Capabilities, ModelSpec, capabilities, model_spec, register_model
from .stack import BlockStack, StackLM, compile_blocks, eager_if_compiled
from .state import ModelState
from .transformer import TransformerLM

register_model(ModelSpec(
    "transformer", TransformerConfig, TransformerLM, "Transformer++ (RoPE, SwiGLU, RMSNorm); KV caches",
    lambda cfg: Capabilities(frozenset({"kv"})),
))
register_model(ModelSpec(
    "gla", GLAConfig, GLALM, "Gated Linear Attention Transformer; one fixed-size matrix state per layer",
    lambda cfg: Capabilities(frozenset({"recurrent"})),
))
register_model(ModelSpec(
    "hybrid", HybridConfig, HybridLM,
    "GLA with softmax-attention layers (attn_every / attn_layers); matrix states plus KV caches a policy bounds",
    lambda cfg: Capabilities(
        frozenset({"kv"} | ({"recurrent"} if len(cfg.attention_layers()) < cfg.n_layers else set()))
    ),
))
register_model(ModelSpec(
    "megabyte", MegabyteConfig, MegabyteLM, "MEGABYTE: a global model over byte patches, a local model per patch",
    lambda cfg: Capabilities(
        frozenset({"kv" if b == "transformer" else "recurrent" for b in (cfg.global_backbone, cfg.local_backbone)}),
        seq_multiple=cfg.patch_size, max_seq_len=cfg.max_seq_len, byte_level=True,
    ),
))


def config_class(kind: str) -> type[ModelConfig]:
    """The config dataclass of ``kind``; ``ValueError`` naming the known kinds otherwise."""
    return model_spec(kind).config_class


def build_model(kind: str, preset: str = "tiny", **overrides: Any) -> LanguageModel:
    """Build a model by kind (``"transformer"``, ``"gla"``, ...), preset name and config overrides. Overrides that
    contradict each other are refused (:meth:`ModelConfig.check_overrides`, e.g. a hybrid's ``attn_layers`` with a
    nonzero ``attn_every``), as ``--set`` flags are.

    >>> model = build_model("gla", "tiny", n_layers=1)
    >>> model.config.n_layers
    1
    """
    config_class(kind).check_overrides(overrides)
    cfg = config_class(kind).from_preset(preset, **overrides)
    return model_from_config(cfg)


def model_from_config(cfg: ModelConfig) -> LanguageModel:
    """Build the model a config describes (the config's class says which kind)."""
    return model_spec(cfg.kind).build(cfg)


__all__ = [
    "BlockStack", "Capabilities", "ModelSpec", "StackLM", "capabilities", "compile_blocks", "eager_if_compiled",
    "model_spec", "register_model",
    "GLAConfig", "GLALM", "HybridConfig", "HybridLM", "LanguageModel", "MODELS", "MegabyteConfig", "MegabyteLM",
    "MegabyteState",
    "ModelConfig", "ModelState", "TransformerConfig",
    "TransformerLM", "build_model", "config_class", "model_from_config",
]
