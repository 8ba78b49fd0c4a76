"""HuggingFace transformers integration (``pip install 'longseq[hf]'``).

* :func:`cache` -- a transformers ``Cache`` bounding any HF decoder (Llama, Mistral, Qwen2/3, GPT-NeoX, ...)
  with a longseq policy: ``model.generate(**inputs, past_key_values=longseq.hf.cache(model, TOVA(512)))``.
* :func:`evaluate_hf` -- longseq's policy x budget sweep on a local HF model folder.
* :func:`save_hf` / :func:`load_hf` -- longseq models to / from an HF-style folder (config.json +
  model.safetensors); :func:`register` makes ``AutoModelForCausalLM`` load such folders.

Importing this package is cheap: names load on first use. ``save_hf`` / ``load_hf`` need only safetensors;
everything else imports transformers and raises ``ImportError`` with the install hint when it is missing.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule that defines it
_EXPORTS = {
    "cache": "caching",
    "LongseqCache": "caching",
    "LongseqLayer": "caching",
    "ATTN_IMPLEMENTATION": "caching",
    "register_attention": ("caching", "register"),
    "evaluate_hf": "evaluate",
    "load_hf_causal_lm": "evaluate",
    "HFStateModel": "evaluate",
    "save_hf": "io",
    "load_hf": "io",
    "LongseqHFConfig": "modeling",
    "LongseqForCausalLM": "modeling",
    "LongseqStateCache": "modeling",
    "register": "modeling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'longseq.hf' has no attribute {name!r}")
    module_name, attr = target if isinstance(target, tuple) else (target, name)
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, attr)


def __dir__() -> list[str]:
    return __all__
