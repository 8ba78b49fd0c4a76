"""longseq's policy x budget sweep (``longseq.sweep.run_sweep``) on HF causal LMs from a local folder.

:class:`HFStateModel` gives an HF model longseq's state API (``init_state(1, cache=policy)`` /
``step(ids, state)`` / ``device`` / ``config.vocab_size``), with a :class:`~longseq.hf.caching.LongseqCache`
as the state, so ``run_sweep`` and ``kept_position_stats`` run unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..cache.policies import CachePolicy, Full, parse_policy
from ..sweep import METRICS, SweepResult, as_document_ids, run_sweep
from ._deps import require_transformers
from .caching import LongseqCache
from .caching import cache as longseq_cache
from .io import folder_config

require_transformers()


@dataclass
class _VocabConfig:
    vocab_size: int


class HFState:
    """The state of :class:`HFStateModel`: a :class:`LongseqCache` and the tokens consumed.

    ``layers[i]`` is layer ``i``'s batched :class:`KVCache` (what ``kept_position_stats`` inspects), or its
    :class:`~longseq.hf.caching.LongseqLayer` while it holds no batched cache (skipped by those statistics).
    """

    def __init__(self, kv: LongseqCache, batch_size: int) -> None:
        self.cache = kv
        self.batch_size = batch_size
        self.position = 0

    @property
    def layers(self) -> list[Any]:
        return [
            layer.batched if layer.batched is not None else layer  # type: ignore[union-attr]
            for layer in self.cache.layers
        ]

    def kept_positions(self, layer: int) -> Tensor:
        """``[B, n]`` (``[B, H_kv, n]`` per-head policies): original positions layer ``layer`` keeps."""
        return self.cache.kept_positions(layer)

    def nbytes(self) -> int:
        return self.cache.nbytes()


class HFStateModel(torch.nn.Module):
    """An HF causal LM behind longseq's ``init_state`` / ``step`` API (no padding: one row per document)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model.eval()
        vocab = model.get_output_embeddings().weight.shape[0]  # type: ignore[operator,union-attr]
        self.config = _VocabConfig(vocab_size=int(vocab))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def init_state(
        self, batch_size: int = 1, *, cache: CachePolicy | None = None, device: Any = None
    ) -> HFState:
        return HFState(longseq_cache(self.model, cache if cache is not None else Full()), batch_size)

    @torch.inference_mode()
    def step(self, input_ids: Tensor, state: HFState) -> tuple[Tensor, HFState]:
        """``[B, T]`` new tokens -> ``[B, T, vocab]`` logits; the state's cache is updated in place."""
        if input_ids.dim() != 2 or input_ids.shape[0] != state.batch_size:
            raise ValueError(f"input_ids must be [{state.batch_size}, T]; got {tuple(input_ids.shape)}")
        out = self.model(input_ids=input_ids.to(self.device), past_key_values=state.cache, use_cache=True)
        state.position += input_ids.shape[1]
        return out.logits, state


def load_hf_causal_lm(
    path: str | os.PathLike[str],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path, local_files_only=True)`` in eval mode; never downloads.

    Raises ``FileNotFoundError`` if ``path`` is not an existing folder with a ``config.json``, and
    ``ValueError`` if that file is not a JSON object or names a longseq model (``longseq.hf.load_hf`` loads those).
    """
    transformers = require_transformers()
    folder = Path(path)
    _check_folder(folder)
    # "auto": the dtype the folder was saved in (transformers 5's default; 4.x would load float32).
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": dtype if dtype is not None else "auto"}
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    if device is not None:
        model = model.to(device)
    return model.eval()


def _check_folder(folder: Path) -> None:
    """An existing HF model folder whose ``config.json`` is a JSON object, not a longseq model's."""
    if not folder.is_dir():
        raise FileNotFoundError(f"no such model folder: {folder} (evaluate_hf loads local folders only)")
    fields = folder_config(folder, "a saved HF model folder")
    if fields.get("model_type") == "longseq":
        raise ValueError(
            f"{folder} is a longseq model folder (model_type 'longseq'); evaluate_hf is for other HF models. "
            f"Sweep it with `longseq eval {folder} --data ... --policies ... --budgets ...` or "
            "longseq.sweep.run_sweep(longseq.hf.load_hf(folder), ...)"
        )


def _check_sweep(
    documents: Sequence[Any], policies: Sequence[str], budgets: Sequence[int], metric: str, chunk_size: int
) -> None:
    """The checks ``run_sweep`` makes, made before a model is loaded."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}; got {metric!r}")
    if not documents:
        raise ValueError("evaluate_hf needs at least one document")
    if any(int(b) < 1 for b in budgets):
        raise ValueError(f"budgets must be >= 1; got {list(budgets)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    for spec in policies:
        if spec.strip().lower() != "full":
            for budget in budgets:
                parse_policy(spec, budget=int(budget))


def _token_ids(
    documents: Sequence[tuple[str, Any]], tokenizer: Any, path: Path | None
) -> list[tuple[str, Any]]:
    """Tokenise text documents (with ``tokenizer``, else the folder's own); tensors pass through."""
    if tokenizer is None and any(isinstance(doc, str) for _, doc in documents):
        if path is None:
            raise ValueError(
                "text documents need tokenizer= when a loaded model is given (or pass token ids)"
            )
        tokenizer = require_transformers().AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return [
        (name, torch.tensor(tokenizer(doc)["input_ids"], dtype=torch.long) if isinstance(doc, str) else doc)
        for name, doc in documents
    ]


def evaluate_hf(
    path_or_model: str | os.PathLike[str] | torch.nn.Module,
    documents: Sequence[tuple[str, Tensor | str]],
    policies: Sequence[str],
    budgets: Sequence[int],
    *,
    tokenizer: Any = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    include_full: bool = True,
    chunk_size: int = 512,
    max_tokens: int | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    metric: str = "ppl",
    progress: Callable[[str], None] | None = None,
) -> SweepResult:
    """Policy x budget sweep of an HF causal LM (``run_sweep`` with an HF model behind the state API).

    Args:
        path_or_model: a local HF model folder (loaded with ``local_files_only=True``) or a loaded
            ``PreTrainedModel``.
        documents: ``(name, doc)`` pairs; ``doc`` is a 1-D tensor of token ids, or text (tokenised with
            ``tokenizer``, by default the folder's own tokenizer).
        policies, budgets, include_full, chunk_size, max_tokens, out_dir, metric, progress: as in
            :func:`longseq.sweep.run_sweep` (e.g. ``["tova", "h2o", "window", "sink"]``, ``[256, 512]``).
            Metrics are per *token* of the model's tokenizer (``bpb`` is bits per token here).
        device, dtype: where and in which precision to load a folder's model.

    Every argument is checked (``ValueError``) before a model is loaded; a longseq model (a ``save_hf``
    folder or a ``LongseqForCausalLM``) is refused with a pointer to longseq's own sweep.

    Returns:
        The :class:`~longseq.sweep.SweepResult` (table via ``to_markdown()``).
    """
    _check_sweep(documents, policies, budgets, metric, chunk_size)
    loaded = path_or_model if isinstance(path_or_model, torch.nn.Module) else None
    path = None if loaded is not None else Path(path_or_model)  # type: ignore[arg-type]
    if path is not None:
        _check_folder(path)
    elif getattr(getattr(loaded, "config", None), "model_type", None) == "longseq":
        raise ValueError(
            "evaluate_hf is for other HF models; sweep a LongseqForCausalLM's longseq model with "
            "longseq.sweep.run_sweep(model.lm, ...)"
        )
    docs = _token_ids(documents, tokenizer, path)
    for _, ids in docs:
        as_document_ids(ids)  # a malformed document fails here, not after the model is loaded
    if loaded is not None:
        model = loaded if device is None else loaded.to(device)
    else:
        model = load_hf_causal_lm(path, device=device, dtype=dtype)  # type: ignore[arg-type]
    return run_sweep(
        HFStateModel(model),
        docs,
        policies,
        budgets,
        include_full=include_full,
        chunk_size=chunk_size,
        max_tokens=max_tokens,
        out_dir=out_dir,
        metric=metric,
        progress=progress,
    )
