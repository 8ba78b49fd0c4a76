"""longseq models to and from HF-style folders: ``config.json`` + ``model.safetensors`` (+ two tiny modules so
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` works).

Folder layout written by :func:`save_hf`::

    config.json               {"model_type": "longseq", "architectures": ["LongseqForCausalLM"],
                               "longseq_kind": "transformer", "longseq_config": {...}, "vocab_size": ...,
                               "tie_word_embeddings": ..., "dtype": "float32", "auto_map": {...}}
    model.safetensors         the weights, named as in LongseqForCausalLM ("lm." + longseq's own names;
                               a tied head is stored once, as HF does)
    configuration_longseq.py  re-export of longseq.hf.modeling.LongseqHFConfig   (trust_remote_code)
    modeling_longseq.py       re-export of longseq.hf.modeling.LongseqForCausalLM (trust_remote_code)

Neither function needs transformers: the format is plain JSON + safetensors.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import __version__
from ..models import MODELS, LanguageModel, config_class, model_from_config
from ..tokenizer import BYTES, TOKENIZER_DIR, Tokenizer, load_tokenizer

MODEL_TYPE = "longseq"
ARCHITECTURE = "LongseqForCausalLM"
PREFIX = "lm."  # LongseqForCausalLM holds the longseq model as `.lm`
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
REMOTE_CODE = {
    "configuration_longseq.py": '"""Loads the longseq config class (trust_remote_code)."""\n\n'
    'from longseq.hf.modeling import LongseqHFConfig\n\n__all__ = ["LongseqHFConfig"]\n',
    "modeling_longseq.py": '"""Loads the longseq model class (trust_remote_code)."""\n\n'
    "from longseq.hf.modeling import LongseqForCausalLM, LongseqHFConfig\n\n"
    '__all__ = ["LongseqForCausalLM", "LongseqHFConfig"]\n',
}
AUTO_MAP = {  # config.json's pointer to the two modules above
    "AutoConfig": "configuration_longseq.LongseqHFConfig",
    "AutoModelForCausalLM": "modeling_longseq.LongseqForCausalLM",
}
FILES = frozenset({CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_DIR, *REMOTE_CODE})


def _unwrap(model: Any) -> LanguageModel:
    """The longseq model inside ``model`` (a LanguageModel, or a LongseqForCausalLM wrapping one)."""
    inner = getattr(model, "lm", model)
    if not isinstance(inner, LanguageModel):
        raise TypeError(
            f"save_hf needs a longseq LanguageModel (or LongseqForCausalLM); got {type(model).__name__}"
        )
    return inner


def tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """``{alias: source}`` for parameters that are one tensor under two names (e.g. a tied head:
    ``head.weight`` -> ``embed.weight`` for Transformer/GLA, ``local_embed.weight`` for MEGABYTE)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def hf_config_dict(model: LanguageModel) -> dict[str, Any]:
    """The ``config.json`` content for ``model``."""
    cfg = model.config
    dtype = next(model.parameters()).dtype
    return {
        "model_type": MODEL_TYPE,
        "architectures": [ARCHITECTURE],
        "auto_map": AUTO_MAP,
        "longseq_kind": cfg.kind,
        "longseq_config": cfg.to_dict(),
        "longseq_version": __version__,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": bool(cfg.tie_embeddings),
        "longseq_tokenizer": model.tokenizer.kind,
        "dtype": str(dtype).removeprefix("torch."),
    }


def save_hf(model: Any, folder: str | os.PathLike[str]) -> Path:
    """Write ``model`` (a longseq LanguageModel or LongseqForCausalLM) as an HF-style folder, atomically.

    Everything is written into a temporary sibling folder which is then renamed into place, so a crash
    never leaves a half-written folder. An existing ``folder`` is replaced only if it is empty or holds
    nothing but the files this function writes (a previous save); otherwise ``FileExistsError``.
    Returns the folder's path.
    """
    lm = _unwrap(model)
    folder = Path(folder)
    if folder.exists():
        if not folder.is_dir():
            raise FileExistsError(f"{folder} exists and is not a folder")
        extra = sorted(p.name for p in folder.iterdir() if p.name not in FILES)
        if extra:
            raise FileExistsError(
                f"{folder} holds files save_hf did not write ({extra[:5]}); refusing to replace it"
            )
    aliases = tied_aliases(lm)  # stored once, as HF does; the constructor re-ties them on load
    state = {PREFIX + k: v.detach().contiguous().cpu() for k, v in lm.state_dict().items() if k not in aliases}

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config_dict(lm), indent=2, sort_keys=True) + "\n")
        if lm.tokenizer.kind != BYTES.kind:  # a converted model's tokenizer travels with it
            (tmp / TOKENIZER_DIR).mkdir()
            lm.tokenizer.save(tmp / TOKENIZER_DIR)
        for name, text in REMOTE_CODE.items():
            (tmp / name).write_text(text)

    write_folder(folder, write)
    return folder


def write_folder(folder: Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary sibling of ``folder`` with ``write(tmp)``, then rename it to ``folder``.

    An existing ``folder`` is moved aside first and deleted only once the new one is in place; if anything
    fails it is renamed back, so a save that does not finish leaves the previous one as it was.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # not tempfile.mkdtemp: its 0o700 would become the saved folder's mode instead of the umask's
    old = None
    try:
        write(tmp)
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            folder.rename(old)
        try:
            tmp.rename(folder)
        except BaseException:
            if old is not None:
                old.rename(folder)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def folder_config(folder: Path, expected: str) -> dict[str, Any]:
    """The JSON object in ``folder/config.json``: ``FileNotFoundError`` for a missing folder or file (``expected``
    says what kind of folder was expected), ``ValueError`` for a file that is not a JSON object."""
    if not folder.is_dir():
        raise FileNotFoundError(f"no such model folder: {folder}")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_FILE}; is it {expected}?")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object; got a {type(config).__name__}")
    return config


def read_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """``config.json`` of a longseq HF folder, checked: ``FileNotFoundError`` / ``ValueError`` otherwise."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    config = folder_config(folder, "a model folder written by save_hf")
    if config.get("model_type") != MODEL_TYPE or "longseq_config" not in config:
        raise ValueError(
            f"{folder} is not a longseq model folder (model_type={config.get('model_type')!r}); "
            "load other HF models with transformers' AutoModelForCausalLM, or evaluate them with "
            "longseq.hf.evaluate_hf"
        )
    kind = config.get("longseq_kind")
    if kind not in MODELS:
        raise ValueError(f"{path}: unknown longseq_kind {kind!r}; this longseq knows {sorted(MODELS)}")
    if not isinstance(config["longseq_config"], dict):
        raise ValueError(
            f"{path}: longseq_config must be a JSON object of config fields; got {config['longseq_config']!r}"
        )
    return config


def _load_args(device: torch.device | str, dtype: torch.dtype | None) -> torch.device:
    """``device`` as a ``torch.device``, after checking it and ``dtype`` (before anything is read)."""
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype such as torch.bfloat16 (or None); got {dtype!r}")
    from ..train.distributed import pick_device

    return pick_device(device, name="device")


def _tokenizer(config: dict[str, Any], cfg: Any, folder: Path) -> Tokenizer:
    """The tokenizer saved with the model (bytes unless ``config.json`` names another), or ``ValueError`` /
    ``FileNotFoundError`` if it is missing."""
    kind = config.get("longseq_tokenizer")
    if kind is None and cfg.vocab_size != BYTES.vocab_size:
        # Folders that did not record their tokenizer (LongseqForCausalLM.save_pretrained before it wrote
        # one) may have lost it: bytes would silently decode a subword model's ids as bytes.
        raise ValueError(
            f"{folder / CONFIG_FILE} names no longseq_tokenizer and the model has {cfg.vocab_size} token ids, so "
            f"its tokenizer was not saved with it (bytes have {BYTES.vocab_size}); save the model again with "
            "longseq.hf.save_hf"
        )
    if kind in (None, BYTES.kind):
        return BYTES
    if not (folder / TOKENIZER_DIR).is_dir():
        raise FileNotFoundError(
            f"{folder / CONFIG_FILE} names a {kind!r} tokenizer but {folder} has no {TOKENIZER_DIR}/ folder"
        )
    return load_tokenizer(kind, folder / TOKENIZER_DIR)


def load_hf(
    folder: str | os.PathLike[str], *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> LanguageModel:
    """The longseq :class:`LanguageModel` saved in ``folder`` by :func:`save_hf` (in eval mode).

    ``dtype`` defaults to the saved tensors' own dtypes. Everything is checked before the weights are read:
    ``TypeError`` / ``ValueError`` for a bad ``dtype`` / ``device``, ``FileNotFoundError`` for a missing
    folder or file (the tokenizer's included), and ``ValueError`` for a folder of another model type, a
    config this longseq cannot build, or weights that are damaged or do not match the config (missing /
    unexpected / misshapen tensors are listed).
    """
    device = _load_args(device, dtype)
    config = read_config(folder)
    folder = Path(folder)
    try:
        cfg = config_class(config["longseq_kind"]).from_dict(config["longseq_config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{folder / CONFIG_FILE}: incompatible longseq config: {e}") from e
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{folder} has no {WEIGHTS_FILE}")
    tokenizer = _tokenizer(config, cfg, folder)
    try:
        saved = load_file(str(weights), device="cpu")
    except SafetensorError as e:
        raise ValueError(f"{weights} is not a readable safetensors file (truncated or damaged?): {e}") from e
    state = {k.removeprefix(PREFIX): v for k, v in saved.items()}
    # Built normally (not on the meta device): non-persistent buffers such as RoPE tables are computed in
    # the constructors and are not in the file.
    model = model_from_config(cfg)
    expected = model.state_dict()
    aliases = tied_aliases(model)
    for alias, source in aliases.items():
        if alias not in state and source in state:
            state[alias] = state[source]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshapen = sorted(
        f"{k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if state[k] is not None and state[k].shape != expected[k].shape
    )
    if missing or unexpected or misshapen:
        raise ValueError(
            f"{weights} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"misshapen {misshapen[:5]}"
        )
    # assign=True keeps each tensor's saved dtype (a model may mix dtypes on purpose).
    model.load_state_dict(state, strict=True, assign=True)
    for alias, source in aliases.items():  # assign made two Parameters; one, as at construction
        owner, _, leaf = alias.rpartition(".")
        setattr(model.get_submodule(owner), leaf, model.get_parameter(source))
    if tokenizer is not BYTES:
        model.tokenizer = tokenizer
    model = model.to(device=device)
    return (model if dtype is None else model.to(dtype)).eval()
