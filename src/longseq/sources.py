"""Where a model comes from, separate from what it is: a longseq run or checkpoint, a ``.gguf`` file or an
HF folder of a supported pretrained family all open as a native longseq model (with its tokenizer), so
every command that takes a run takes them too."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .models.base import LanguageModel


def is_pretrained_source(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ``.gguf`` file or an HF folder whose ``config.json`` names a family
    :func:`~longseq.load_pretrained` converts (rather than a longseq run, checkpoint or ``save_hf`` folder)."""
    from .pretrained import FAMILIES

    p = Path(path)
    if p.is_file():
        return p.suffix == ".gguf"
    config = p / "config.json"
    if not config.is_file() or (p / "checkpoints").exists():
        return False
    try:
        fields = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(fields, dict) and fields.get("model_type") in FAMILIES and "longseq_kind" not in fields


def is_saved_longseq_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by :func:`longseq.hf.save_hf` (``config.json`` with ``longseq_kind``)."""
    config = Path(path) / "config.json"
    if not config.is_file() or (Path(path) / "checkpoints").exists():
        return False
    try:
        fields = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(fields, dict) and "longseq_kind" in fields


def open_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> LanguageModel:
    """The model at ``path``, in eval mode on ``device``: a converted pretrained model (``.gguf`` file or HF
    folder of the Llama family), a folder written by ``longseq.hf.save_hf`` (with its tokenizer), else a
    longseq run or checkpoint directory."""
    if is_pretrained_source(path):
        from .pretrained import load_pretrained

        return load_pretrained(path, device=device)
    if is_saved_longseq_folder(path):
        from .hf.io import load_hf

        return load_hf(path, device=device)
    from .train.checkpoint import load_model

    return load_model(path, device)
