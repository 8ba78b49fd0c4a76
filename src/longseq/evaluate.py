"""Bits per byte of a model on whole documents: plain (non-overlapping) and strided windows.

Every byte of a document except its first is scored exactly once (the first has no context). A model
sees at most ``seq_len`` bytes at a time:

* plain (``stride = seq_len``): the document is cut into consecutive windows; a byte's context is
  whatever precedes it in its window (0 to ``seq_len - 1`` bytes, ``seq_len / 2`` on average);
* strided (``stride < seq_len``): windows of ``seq_len`` bytes advance by ``stride`` and only the last
  ``stride`` predictions of each window after the first are scored, so every byte after the first
  window has at least ``seq_len - stride`` bytes of context (MEGABYTE, Yu et al. 2023, Sec. 4 "strided
  inference"). It costs ``seq_len / stride`` times the compute of plain evaluation.

Bits per byte = total negative log-likelihood in nats / ln 2 / number of scored bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data.corpus import ByteCorpus
from .data.errors import DataError
from .models.config import ModelConfig
from .models.registry import capabilities
from .precision import autocast

LN2 = math.log(2.0)


class EvaluationStopped(Exception):
    """:func:`evaluate_bpb` was asked to stop (its ``should_stop`` returned true) before it finished."""


@dataclass
class Score:
    """Summed next-token loss (nats) over ``tokens`` scored tokens, e.g. of one document (``name``).

    The one score type of evaluation (:func:`evaluate_bpb`, one per document) and of the cache sweeps
    (:mod:`longseq.sweep`). For byte-level models a token is a byte: ``nll`` and ``bytes`` read ``nats`` and
    ``tokens`` under evaluation's names.
    """

    nats: float = 0.0
    tokens: int = 0
    name: str = ""

    def add(self, other: Score) -> None:
        self.nats += other.nats
        self.tokens += other.tokens

    @property
    def nll(self) -> float:
        return self.nats

    @property
    def bytes(self) -> int:
        return self.tokens

    @property
    def loss(self) -> float:
        """Mean nats per token (per byte for byte-level models); NaN when nothing was scored."""
        return self.nats / self.tokens if self.tokens else float("nan")

    @property
    def bpb(self) -> float:
        """Bits per byte (byte-level vocabulary: one token is one byte)."""
        return self.loss / LN2

    @property
    def ppl(self) -> float:
        """Per-token (per-byte) perplexity."""
        return math.exp(self.loss)

    def as_dict(self) -> dict[str, float]:
        return {"loss": self.loss, "bpb": self.bpb, "ppl": self.ppl, "tokens": self.tokens}


@dataclass
class EvalResult:
    """Overall and per-document bits per byte of one evaluation."""

    seq_len: int
    stride: int
    docs: list[Score] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(d.tokens for d in self.docs)

    @property
    def nll(self) -> float:
        return sum(d.nats for d in self.docs)

    @property
    def loss(self) -> float:
        """Mean negative log-likelihood per byte in nats (the training loss's unit)."""
        return self.nll / self.bytes if self.bytes else float("nan")

    @property
    def bpb(self) -> float:
        return self.loss / LN2

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq_len": self.seq_len,
            "stride": self.stride,
            "bytes": self.bytes,
            "loss": self.loss,
            "bpb": self.bpb,
            "documents": [{"name": d.name, "bytes": d.bytes, "bpb": d.bpb} for d in self.docs],
        }

    def table(self) -> str:
        """A plain-text table: one row per document and the overall row."""
        width = max([len(d.name) for d in self.docs] + [8])
        lines = [f"{'document':<{width}}  {'bytes':>10}  {'bpb':>7}", "-" * (width + 21)]
        lines += [f"{d.name:<{width}}  {d.bytes:>10,}  {d.bpb:>7.4f}" for d in self.docs]
        lines += ["-" * (width + 21), f"{'overall':<{width}}  {self.bytes:>10,}  {self.bpb:>7.4f}"]
        return "\n".join(lines)


def plan_windows(n: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows covering targets ``1 .. n-1`` of an ``n``-byte document, each exactly once.

    Returns ``(start, end, first)`` triples: the window's input is bytes ``[start, end)`` (at most
    ``seq_len``), it predicts bytes ``start+1 .. end`` and scores bytes ``first .. end``.
    """
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}]; got {stride}")
    windows, scored, start = [], 0, 0
    while scored < n - 1:
        end = min(start + seq_len, n - 1)
        windows.append((start, end, scored + 1))
        scored = end
        start += stride
    return windows


def check_seq_len(model: nn.Module, seq_len: int) -> None:
    """Raise ``ValueError`` unless ``seq_len`` >= 1 and a multiple of the model's ``seq_multiple`` (its patch
    size; see :mod:`longseq.models.registry`)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1; got {seq_len}")
    multiple = _seq_multiple(model)
    if seq_len % multiple:
        raise ValueError(f"seq_len={seq_len} must be a multiple of the model's patch_size={multiple}")


def _seq_multiple(model: nn.Module) -> int:
    # Only longseq models are in the registry; any other causal LM (an HF model, a test's module) takes
    # windows of any length.
    if not isinstance(getattr(model, "config", None), ModelConfig):
        return 1
    return capabilities(model).seq_multiple


@torch.no_grad()
def evaluate_bpb(
    model: nn.Module,
    documents: Iterable[tuple[str, np.ndarray]],
    seq_len: int,
    stride: int | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> EvalResult:
    """Bits per byte of ``model`` on ``documents`` (``(name, [n] uint8 bytes)`` pairs).

    The model maps ``[B, T]`` ids to ``[B, T, 256]`` logits, ``logits[:, i]`` predicting byte ``i + 1``,
    and must be causal: windows shorter than ``seq_len`` are right-padded to ``seq_len`` and the padded
    positions are not scored. ``stride`` defaults to ``seq_len`` (plain evaluation).

    ``should_stop`` is asked before every batch; when it returns true, :class:`EvaluationStopped` is raised
    (a training run's signal handling stops validation this way within one batch).
    """
    stride = seq_len if stride is None else int(stride)
    check_seq_len(model, seq_len)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    result = EvalResult(seq_len=seq_len, stride=stride)
    # (doc index, start, end, first) for every window of every document, batched across documents.
    jobs: list[tuple[int, np.ndarray, int, int, int]] = []
    for name, tokens in documents:
        result.docs.append(Score(name=name))
        jobs += [
            (len(result.docs) - 1, tokens, s, e, f) for s, e, f in plan_windows(len(tokens), seq_len, stride)
        ]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(e - f + 1 for _, _, _, e, f in jobs), unit="B", unit_scale=True, desc="eval")
    try:
        for b0 in range(0, len(jobs), batch_size):
            if should_stop is not None and should_stop():
                raise EvaluationStopped(f"evaluation stopped after {b0} of {len(jobs)} windows")
            batch = jobs[b0 : b0 + batch_size]
            ids = np.zeros((len(batch), seq_len + 1), dtype=np.int64)
            mask = np.zeros((len(batch), seq_len), dtype=bool)
            for row, (_, tokens, s, e, f) in enumerate(batch):
                ids[row, : e + 1 - s] = tokens[s : e + 1]
                mask[row, f - s - 1 : e - s] = True  # logits at j predict byte s + j + 1
            ids_t = torch.from_numpy(ids).to(device)
            with autocast(device):
                logits = model(ids_t[:, :-1])
            nll = F.cross_entropy(logits.float().transpose(1, 2), ids_t[:, 1:], reduction="none")
            nll = (nll * torch.from_numpy(mask).to(device)).sum(1).double().cpu()
            for row, (doc, _, _, e, f) in enumerate(batch):
                result.docs[doc].nats += float(nll[row])
                result.docs[doc].tokens += e - f + 1
            if bar is not None:
                bar.update(int(mask.sum()))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return result


def corpus_documents(
    corpus: ByteCorpus, doc_ids: Sequence[int], max_bytes: int | None = None
) -> list[tuple[str, np.ndarray]]:
    """``(name, bytes)`` of the chosen documents; ``max_bytes`` spreads a byte budget evenly over them,
    keeping each document's first ``ceil(max_bytes / len(doc_ids)) + 1`` bytes (deterministic)."""
    if not doc_ids:
        raise DataError("no documents to evaluate on (the validation split is empty)")
    cap = None if max_bytes is None else math.ceil(max_bytes / len(doc_ids)) + 1
    return [(corpus.names[i], corpus.doc(i)[:cap] if cap else corpus.doc(i)) for i in doc_ids]
