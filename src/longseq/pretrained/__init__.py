"""Pretrained checkpoints as native longseq models: ``load_pretrained`` (an HF folder, a ``.gguf`` file or a
loaded HF model of the Llama, Mistral, Qwen2 or Qwen3 family -> :class:`~longseq.models.TransformerLM`
with the checkpoint's tokenizer)."""

from .families import FAMILIES, UnsupportedModelError, config_from_hf
from .load import load_pretrained

__all__ = ["FAMILIES", "UnsupportedModelError", "config_from_hf", "load_pretrained"]
