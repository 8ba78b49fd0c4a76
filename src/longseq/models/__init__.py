"""Language models and the factory that builds them by name."""

from __future__ import annotations

from typing import Any

from .base import LanguageModel
from .config import GLAConfig, MegabyteConfig, ModelConfig, TransformerConfig
from .gla import GLALM
from .megabyte import MegabyteLM, MegabyteState
from .state import ModelState
from .transformer import TransformerLM

# kind -> (config class, model class). New model kinds register here.
MODELS: dict[str, tuple[type[ModelConfig], type[LanguageModel]]] = {
    "transformer": (TransformerConfig, TransformerLM),
    "gla": (GLAConfig, GLALM),
    "megabyte": (MegabyteConfig, MegabyteLM),
}


def config_class(kind: str) -> type[ModelConfig]:
    if kind not in MODELS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {sorted(MODELS)}")
    return MODELS[kind][0]


def build_model(kind: str, preset: str = "tiny", **overrides: Any) -> LanguageModel:
    """Build a model by kind (``"transformer"``, ``"gla"``, ...), preset name and config overrides.

    >>> model = build_model("gla", "tiny", n_layers=1)
    >>> model.config.n_layers
    1
    """
    cfg = config_class(kind).from_preset(preset, **overrides)
    return model_from_config(cfg)


def model_from_config(cfg: ModelConfig) -> LanguageModel:
    """Build the model a config describes (the config's class says which kind)."""
    return MODELS[cfg.kind][1](cfg)


__all__ = [
    "GLAConfig", "GLALM", "LanguageModel", "MODELS", "MegabyteConfig", "MegabyteLM", "MegabyteState",
    "ModelConfig", "ModelState", "TransformerConfig",
    "TransformerLM", "build_model", "config_class", "model_from_config",
]
