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

Tokenized models. Documents are text (``str``, ``bytes`` or a uint8 array of UTF-8 bytes) and are turned into
ids by ``model.tokenizer`` (:mod:`longseq.tokenizer`; bytes when a model has none), with the special tokens
the tokenizer adds by default (a BOS for Llama's). Everything above then holds with "token" for "byte":
windows, ``seq_len`` and ``stride`` count tokens, and every token except a document's first is scored. The
result reports the mean loss per token (nats) and its perplexity, and bits per UTF-8 byte: the same total
NLL / ln 2 / the number of bytes the scored tokens decode to, counted per document as (see
:func:`scored_bytes`)::

    len(decode(ids)) - len(common prefix of decode(ids) and decode(ids[:1]))

This is exact when the first token's text is a prefix of the document's decoded text (always when the first
token is a BOS, which decodes to nothing, so every byte of the document is counted; and for byte-level BPE
whenever the first token ends on a character boundary). Where it is not -- a first token holding part of a
multi-byte character decodes alone to U+FFFD -- the bytes it shares with no prefix are counted as scored, an
overcount of at most 3 bytes per document. Bytes are those of the decoded ids, which equal the document's
when the tokenizer round-trips it (it may not: unknown characters, normalisation, space clean-up). For the
byte tokenizer one token is one byte and every number is what byte-level evaluation always gave.
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
from .tokenizer import BYTES, ByteTokenizer, Tokenizer

LN2 = math.log(2.0)


class EvaluationStopped(Exception):
    """:func:`evaluate_bpb` was asked to stop (its ``should_stop`` returned true) before it finished."""


@dataclass
class Score:
    """Summed next-token loss (nats) over ``tokens`` scored tokens that decode to ``n_bytes`` UTF-8 bytes, e.g.
    of one document (``name``).

    The one score type of evaluation (:func:`evaluate_bpb`, one per document) and of the cache sweeps
    (:mod:`longseq.sweep`). For byte-level models a token is a byte (``n_bytes == tokens``); ``nll`` and
    ``bytes`` read ``nats`` and ``n_bytes`` under evaluation's names.
    """

    nats: float = 0.0
    tokens: int = 0
    name: str = ""
    n_bytes: int = 0

    def add(self, other: Score) -> None:
        self.nats += other.nats
        self.tokens += other.tokens
        self.n_bytes += other.n_bytes

    @property
    def nll(self) -> float:
        return self.nats

    @property
    def bytes(self) -> int:
        return self.n_bytes

    @property
    def loss(self) -> float:
        """Mean nats per token (per byte for byte-level models); NaN when nothing was scored."""
        return self.nats / self.tokens if self.tokens else float("nan")

    @property
    def bpb(self) -> float:
        """Bits per UTF-8 byte of the scored tokens' text; NaN when it has no bytes."""
        return per_byte(self.nats, self.n_bytes) / LN2

    @property
    def ppl(self) -> float:
        """Per-token (per-byte) perplexity."""
        return math.exp(self.loss)

    def as_dict(self) -> dict[str, float]:
        return {"loss": self.loss, "bpb": self.bpb, "ppl": self.ppl, "tokens": self.tokens, "bytes": self.n_bytes}


def per_byte(nats: float, n_bytes: int) -> float:
    """``nats / n_bytes`` (NaN for no bytes): divided by ln 2 after, so that for bytes (``n_bytes`` = tokens)
    bits per byte is exactly ``loss / ln 2``."""
    return nats / n_bytes if n_bytes else float("nan")


@dataclass
class EvalResult:
    """Overall and per-document bits per byte of one evaluation."""

    seq_len: int
    stride: int
    docs: list[Score] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(d.tokens for d in self.docs)

    @property
    def bytes(self) -> int:
        return sum(d.n_bytes for d in self.docs)

    @property
    def nll(self) -> float:
        return sum(d.nats for d in self.docs)

    @property
    def loss(self) -> float:
        """Mean negative log-likelihood per token in nats (the training loss's unit; per byte for bytes)."""
        return self.nll / self.tokens if self.tokens else float("nan")

    @property
    def ppl(self) -> float:
        return math.exp(self.loss)

    @property
    def bpb(self) -> float:
        return per_byte(self.nll, self.bytes) / LN2

    def to_dict(self) -> dict[str, Any]:
        def row(s: Score | EvalResult) -> dict[str, Any]:
            return {"tokens": s.tokens, "bytes": s.bytes, "loss": s.loss, "ppl": s.ppl, "bpb": s.bpb}

        return {
            "seq_len": self.seq_len,
            "stride": self.stride,
            **row(self),
            "documents": [{"name": d.name, **row(d)} for d in self.docs],
        }

    def table(self) -> str:
        """A plain-text table: one row per document and the overall row."""
        width = max([len(d.name) for d in self.docs] + [8])
        rows = [(d.name, d) for d in self.docs]
        lines = [f"{'document':<{width}}  {'tokens':>10}  {'bytes':>10}  {'nats/tok':>8}  {'bpb':>7}"]
        rule = "-" * (width + 42)
        body = [f"{n:<{width}}  {s.tokens:>10,}  {s.bytes:>10,}  {s.loss:>8.4f}  {s.bpb:>7.4f}"
                for n, s in [*rows, ("overall", self)]]
        return "\n".join([lines[0], rule, *body[:-1], rule, body[-1]])


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


def model_tokenizer(model: nn.Module) -> Tokenizer:
    """``model.tokenizer``, or bytes for a model without one (a test's module)."""
    tokenizer = getattr(model, "tokenizer", None)
    return tokenizer if isinstance(tokenizer, Tokenizer) else BYTES


Document = str | bytes | bytearray | np.ndarray


def tokenize(tokenizer: Tokenizer, doc: Document) -> np.ndarray:
    """The ids of a text document: ``str``, ``bytes`` / ``bytearray`` or a 1-D uint8 array of UTF-8 bytes.

    With the special tokens the tokenizer adds by default; bytes map to themselves (no copy of an array).
    """
    if isinstance(doc, np.ndarray):
        if doc.dtype != np.uint8 or doc.ndim != 1:
            raise ValueError(f"a document array must hold 1-D uint8 bytes; got {doc.dtype} of shape {doc.shape}")
        if isinstance(tokenizer, ByteTokenizer):
            return doc
        doc = doc.tobytes()
    elif not isinstance(doc, (str, bytes, bytearray)):
        raise TypeError(f"a document must be text, bytes or a uint8 array; got {type(doc).__name__}")
    if isinstance(tokenizer, ByteTokenizer):
        data = doc.encode("utf-8") if isinstance(doc, str) else bytes(doc)
        return np.frombuffer(data, dtype=np.uint8)
    return np.asarray(tokenizer.encode(doc, special=True), dtype=np.int64)


def scored_bytes(tokenizer: Tokenizer | None, ids: Sequence[int] | np.ndarray) -> int:
    """The UTF-8 bytes that the scored tokens of a document (all ids but the first) decode to.

    Bytes: one per scored token. Otherwise ``len(decode(ids))`` less the part of it the first token gives,
    the common prefix of ``decode(ids)`` and ``decode(ids[:1])`` (see the module docstring for when this is
    exact). ``tokenizer=None``: a model without a tokenizer, counted as one byte per token (bits per token).
    """
    n = len(ids)
    if n < 2:
        return 0
    if tokenizer is None or isinstance(tokenizer, ByteTokenizer):
        return n - 1
    ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]  # tensor / array / list
    full, head = tokenizer.decode(ids), tokenizer.decode(ids[:1])
    pairs = enumerate(zip(full, head, strict=False))
    shared = next((k for k, (a, b) in pairs if a != b), min(len(full), len(head)))
    return len(full) - shared


@torch.no_grad()
def evaluate_bpb(
    model: nn.Module,
    documents: Iterable[tuple[str, Document]],
    seq_len: int,
    stride: int | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> EvalResult:
    """Bits per byte, loss per token and perplexity of ``model`` on ``documents`` (``(name, text)`` pairs: text
    as ``str``, ``bytes`` or a ``[n]`` uint8 array), tokenized with ``model.tokenizer`` (bytes by default).

    The model maps ``[B, T]`` ids to ``[B, T, V]`` logits, ``logits[:, i]`` predicting token ``i + 1``,
    and must be causal: windows shorter than ``seq_len`` (tokens) are right-padded to ``seq_len`` and the
    padded positions are not scored. ``stride`` defaults to ``seq_len`` (plain evaluation).

    ``should_stop`` is asked before every batch; when it returns true, :class:`EvaluationStopped` is raised
    (a training run's signal handling stops validation this way within one batch).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")
    stride = seq_len if stride is None else int(stride)
    check_seq_len(model, seq_len)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    tokenizer = model_tokenizer(model)
    was_training = model.training
    model.eval()
    result = EvalResult(seq_len=seq_len, stride=stride)
    # (doc index, start, end, first) for every window of every document, batched across documents.
    jobs: list[tuple[int, np.ndarray, int, int, int]] = []
    for name, doc in documents:
        tokens = tokenize(tokenizer, doc)
        result.docs.append(Score(name=name, n_bytes=scored_bytes(tokenizer, tokens)))
        jobs += [
            (len(result.docs) - 1, tokens, s, e, f) for s, e, f in plan_windows(len(tokens), seq_len, stride)
        ]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        unit = "B" if isinstance(tokenizer, ByteTokenizer) else "tok"
        bar = tqdm(total=sum(e - f + 1 for _, _, _, e, f in jobs), unit=unit, unit_scale=True, desc="eval")
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
    """``(name, bytes)`` of the chosen documents. ``max_bytes`` spreads a budget of scored bytes over them,
    exactly: ``max_bytes // n`` each and one more for the first ``max_bytes % n`` (rounding every share up would
    score more than asked), each share after the document's first byte, which is context only. Documents left
    without a share are dropped. Deterministic."""
    if not doc_ids:
        raise DataError("no documents to evaluate on (the validation split is empty)")
    docs = [(corpus.names[i], corpus.doc(i)) for i in doc_ids]
    if max_bytes is None:
        return docs
    base, extra = divmod(max_bytes, len(docs))
    shares = [base + (i < extra) for i in range(len(docs))]
    return [(name, ids[: share + 1]) for (name, ids), share in zip(docs, shares, strict=True) if share > 0]
