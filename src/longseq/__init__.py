"""longseq: long-sequence language modelling in PyTorch.

Every model is a (multi-)state RNN at inference::

    import longseq
    model = longseq.build_model("gla", "tiny")
    logits = model(input_ids)                     # [B, T] -> [B, T, V]
    state = model.init_state(batch_size)
    logits, state = model.step(input_ids, state)  # any number of new tokens
"""

from .cache import H2O, TOVA, CachePolicy, Full, KVCache, LayerState, RecurrentState, Sink, Window, parse_policy
from .generate import generate, sample_next
from .models import (
    GLALM,
    GLAConfig,
    LanguageModel,
    MegabyteConfig,
    MegabyteLM,
    MegabyteState,
    ModelState,
    TransformerConfig,
    TransformerLM,
    build_model,
    capabilities,
    model_from_config,
    register_model,
)
from .ops.gla import gated_linear_attention, gla_decode_step
from .pretrained import load_pretrained

__version__ = "0.1.0"

__all__ = [
    "CachePolicy", "Full", "GLAConfig", "GLALM", "H2O", "KVCache", "LanguageModel", "LayerState", "MegabyteConfig",
    "MegabyteLM", "MegabyteState", "ModelState", "RecurrentState", "Sink", "TOVA", "TransformerConfig",
    "TransformerLM", "Window", "__version__", "build_model", "capabilities", "gated_linear_attention", "generate",
    "gla_decode_step", "load_pretrained", "model_from_config", "parse_policy", "register_model", "sample_next",
]
