"""``load_pretrained``: a Llama-family checkpoint (an HF folder, a ``.gguf`` file or a loaded HF model) as
longseq's own :class:`~longseq.models.TransformerLM`, so every longseq path (cache policies, exact prefill
eviction, the sweep, captured decoding with the fused kernels) runs on it unchanged."""

from __future__ import annotations

import contextlib
import functools
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..models.config import TransformerConfig
from ..models.transformer import TransformerLM
from .families import config_from_hf
from .weights import native_state_dict


def load_pretrained(
    source: str | Path | nn.Module,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> TransformerLM:
    """The native Transformer carrying ``source``'s weights (and, where ``source`` has one, its tokenizer as
    ``model.tokenizer``; see :mod:`longseq.tokenizer`).

    ``source``: a local HF folder (``config.json`` + ``*.safetensors``), a ``.gguf`` file (dequantised by
    transformers; needs the ``gguf`` package), or a loaded HF ``PreTrainedModel``. Families: Llama (with
    Llama 3 RoPE scaling), Mistral, Qwen2, Qwen3. Anything the native model cannot represent raises one
    ``ValueError`` naming the config field, before any weight is read. Nothing is downloaded.
    ``progress=False`` silences transformers' progress bar while it dequantises a ``.gguf`` file.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype such as torch.bfloat16; got {dtype!r}")
    device = torch.device(device)  # a bad device string fails here, before anything is read
    if isinstance(source, nn.Module):
        hf_config = _hf_config_dict(getattr(source, "config", None), "the model")
        cfg = config_from_hf(hf_config)
        tensors = dict(source.state_dict())
        return _build(cfg, tensors.__getitem__, list(tensors), dtype, device, None)  # HF models carry no tokenizer
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, dtype, device, progress)
    if path.is_dir():
        return _load_folder(path, dtype, device)
    raise ValueError(f"{path} is neither an HF model folder (with config.json) nor a .gguf file")


def _hf_config_dict(config: Any, what: str) -> dict[str, Any]:
    if config is None or not hasattr(config, "to_dict"):
        raise TypeError(f"{what} has no HF config: pass a transformers PreTrainedModel, a folder or a .gguf file")
    return config.to_dict()


def _build(cfg: TransformerConfig, get: Any, names: list[str], dtype: torch.dtype, device: Any,
           tokenizer: Any) -> TransformerLM:
    """The model made on the meta device (no random init of weights about to be replaced), then given the
    checkpoint's tensors, cast to ``dtype`` on ``device``."""
    state = native_state_dict(cfg, get, names)
    if cfg.tie_embeddings:
        state["head.weight"] = state["embed.weight"]
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    with torch.device("meta"):
        model = TransformerLM(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.head.weight = model.embed.weight  # one parameter again (assign gave each name its own)
    if tokenizer is not None:
        model.tokenizer = tokenizer
    return model.eval()


def _load_folder(path: Path, dtype: torch.dtype, device: Any) -> TransformerLM:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} has no config.json: not an HF model folder")
    try:
        hf_config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_file} is not valid JSON: {err}") from None
    cfg = config_from_hf(hf_config)  # every check before any weight is read
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} has no *.safetensors weights (longseq reads safetensors only)")
    from safetensors import safe_open

    handles = [safe_open(str(f), framework="pt") for f in files]
    where: dict[str, Any] = {name: h for h in handles for name in h.keys()}  # noqa: SIM118 (safe_open has no __iter__)

    def get(name: str) -> Tensor:
        return where[name].get_tensor(name)

    return _build(cfg, get, list(where), dtype, device, _folder_tokenizer(path))


def _load_gguf(path: Path, dtype: torch.dtype, device: Any, progress: bool) -> TransformerLM:
    from ..hf._deps import require_transformers

    require_transformers()
    try:
        import gguf  # noqa: F401  (transformers reads .gguf files through it)
    except ImportError:
        raise ImportError("reading .gguf files needs the gguf package: pip install gguf") from None
    from transformers import AutoConfig, AutoModelForCausalLM

    folder, name = str(path.parent), path.name
    # transformers parses the whole .gguf (vocabulary included, seconds for a 49K-token one) for each config it
    # reads: read it once and hand it to the model.
    try:
        hf_config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except struct.error as err:  # the header promised more bytes than the file holds
        raise ValueError(f"{path} is not a complete GGUF file (truncated?): {err}") from None
    cfg = config_from_hf(hf_config.to_dict())
    with _gguf_progress_bar(progress):
        hf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=hf_config,
                                                        dtype=torch.float32)
    tensors = dict(hf_model.state_dict())
    from ..tokenizer import HFTokenizer

    tokenizer = HFTokenizer.from_pretrained(folder, gguf_file=name)
    return _build(cfg, tensors.__getitem__, list(tensors), dtype, device, tokenizer)


@contextlib.contextmanager
def _gguf_progress_bar(enabled: bool) -> Iterator[None]:
    """transformers draws its GGUF dequantisation bar with its own ``tqdm`` import, which its progress-bar
    switch does not reach: without ``enabled``, that module's ``tqdm`` is swapped for a disabled one for the
    duration of the load."""
    if enabled:
        yield
        return
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:  # another transformers layout: nothing to silence
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def _folder_tokenizer(path: Path) -> Any:
    """The folder's HF tokenizer, if it has tokenizer files (and transformers is installed); else None."""
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from ..tokenizer import HFTokenizer

    return HFTokenizer.from_pretrained(str(path))

