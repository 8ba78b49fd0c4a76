"""Where a model comes from, separate from what it is: a longseq run or checkpoint, a ``.gguf`` file or an
HF folder of a supported pretrained family all open as a native longseq model (with its tokenizer), so
every command that takes a run takes them too."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .models.base import LanguageModel
from .tokenizer import TOKENIZER_DIR, Tokenizer

#: Files that make a folder an HF tokenizer.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def _folder_config(path: str | os.PathLike, strict: bool = False) -> dict | None:
    """The ``config.json`` of a model folder (not a training run, which also has one), or None. ``strict``:
    a model folder's ``config.json`` that is not JSON raises ``ValueError`` naming it (a checkpoint's is left
    to the checkpoint loader, which names it too)."""
    p = Path(path)
    config = p / "config.json"
    if not p.is_dir() or not config.is_file() or (p / "checkpoints").exists():
        return None
    try:
        fields = json.loads(config.read_text())
    except json.JSONDecodeError as err:
        if strict and not (p / "manifest.json").exists():
            raise ValueError(f"{config} is not valid JSON: {err}") from None
        return None
    except OSError:
        return None
    return fields if isinstance(fields, dict) else None


def is_pretrained_source(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ``.gguf`` file or an HF folder whose ``config.json`` names a family
    :func:`~longseq.load_pretrained` converts (rather than a longseq run, checkpoint or ``save_hf`` folder)."""
    from .pretrained import FAMILIES

    if Path(path).is_file():
        return Path(path).suffix == ".gguf"
    fields = _folder_config(path)
    return fields is not None and fields.get("model_type") in FAMILIES and "longseq_kind" not in fields


def is_saved_longseq_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by :func:`longseq.hf.save_hf` (``config.json`` with ``longseq_kind``)."""
    fields = _folder_config(path)
    return fields is not None and "longseq_kind" in fields


def open_model(path: str | os.PathLike, device: torch.device | str = "cpu", *, progress: bool = True) -> LanguageModel:
    """The model at ``path``, in eval mode on ``device``: a converted pretrained model (``.gguf`` file or HF
    folder of the Llama family; an HF folder of another family raises ``load_pretrained``'s error naming its
    ``model_type``), a folder written by ``longseq.hf.save_hf`` (with its tokenizer), else a longseq run or
    checkpoint directory. A model folder whose ``config.json`` is not JSON raises ``ValueError`` naming it.
    ``progress=False``: no progress bar while a ``.gguf`` file is dequantised."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} does not exist (expected a run or checkpoint directory, a .gguf file or "
                                "a model folder)")
    fields = _folder_config(path, strict=True)
    if fields is not None and "longseq_kind" in fields:
        from .hf.io import load_hf

        return load_hf(path, device=device)
    if is_pretrained_source(path) or (fields is not None and "model_type" in fields):
        # Any HF model folder, converted or not: load_pretrained names a model_type it does not convert.
        from .pretrained import load_pretrained

        return load_pretrained(path, device=device, progress=progress)
    from .train.checkpoint import load_model

    return load_model(path, device)


def open_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer at ``path``: a ``.gguf`` file's, an HF folder with tokenizer files, or the one saved with
    a longseq model (a ``save_hf`` folder, a run or a checkpoint of a run trained with ``--tokenizer``)."""
    from .tokenizer import HFTokenizer

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"tokenizer path {path} does not exist (expected a .gguf file, a folder with "
                                "tokenizer files, or a longseq model saved with one)")
    if p.is_file() and p.suffix == ".gguf":
        return HFTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    if p.is_dir() and any((p / f).exists() for f in HF_TOKENIZER_FILES):
        return HFTokenizer.from_pretrained(p)
    if p.is_dir():
        from .train.checkpoint import list_checkpoints, resolve_checkpoint

        if (p / "manifest.json").exists() or list_checkpoints(p):  # a checkpoint or a run
            ckpt = resolve_checkpoint(p)  # a damaged one raises CheckpointError, naming the damaged file
            if (ckpt / TOKENIZER_DIR).is_dir():
                return HFTokenizer.from_pretrained(ckpt / TOKENIZER_DIR)
        elif (p / TOKENIZER_DIR).is_dir():  # a save_hf folder
            return HFTokenizer.from_pretrained(p / TOKENIZER_DIR)
    raise ValueError(f"{path} holds no tokenizer: expected a .gguf file, a folder with one of "
                     f"{', '.join(HF_TOKENIZER_FILES)}, or a longseq model saved with a {TOKENIZER_DIR}/ folder")
