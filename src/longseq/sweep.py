"""Policy x budget sweeps over long documents (the TOVA paper's Table 3) and kept-position statistics.

Every document is evaluated with the cache policy active from its first token: the document is fed
through ``model.step`` in chunks on a state made by ``init_state(1, cache=policy)``, and the loss is read
from the logits ``step`` returns (``logits[:, i]`` predicts token ``i + 1``). Because eviction is exact
per token, the chunk size changes speed, not the numbers.

Documents given as text (``str`` / ``bytes``) are tokenized with ``model.tokenizer`` (bytes for longseq's own
models), documents given as a tensor are token ids. Scores carry the loss per token, its perplexity and bits
per UTF-8 byte of the scored tokens, counted as :func:`longseq.evaluate.scored_bytes` does (a model without a
tokenizer, such as an HF model behind :mod:`longseq.hf`, counts one byte per token: bits per token).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import jsonio
from .cache.policies import CachePolicy, Full, parse_policy
from .evaluate import Document, Score, scored_bytes, tokenize
from .fileio import check_output_folder, write_atomically
from .tokenizer import BYTES, Tokenizer

METRICS = ("ppl", "bpb", "loss")
#: What a sweep writes into its folder (``out_dir``).
SWEEP_FILES = ("sweep.md", "sweep.json", "sweep.png")


def sweep_tokenizer(model: torch.nn.Module) -> Tokenizer | None:
    """``model.tokenizer``, or None for a model without one (scored as one byte per token)."""
    tokenizer = getattr(model, "tokenizer", None)
    return tokenizer if isinstance(tokenizer, Tokenizer) else None


def as_document_ids(doc: Tensor | Document, tokenizer: Tokenizer | None = None) -> Tensor:
    """A document as 1-D int64 ids: text (``str``, ``bytes`` / ``bytearray``, a uint8 array) tokenized with
    ``tokenizer`` (bytes by default), or a 1-D uint8 / integer tensor of ids."""
    if not isinstance(doc, Tensor):
        ids = torch.from_numpy(tokenize(tokenizer or BYTES, doc).astype(np.int64))
    else:
        if doc.dim() != 1 or doc.dtype.is_floating_point or doc.dtype == torch.bool:
            raise ValueError(
                f"a document must be a 1-D integer tensor; got {doc.dtype} of shape {tuple(doc.shape)}"
            )
        ids = doc.long()
    if ids.numel() < 2:
        raise ValueError(f"a document needs at least 2 tokens to score; got {ids.numel()}")
    return ids


@torch.inference_mode()
def score_document(
    model: torch.nn.Module,
    ids: Tensor | Document,
    policy: CachePolicy,
    *,
    chunk_size: int = 512,
    on_state: Callable[[Any, int], None] | None = None,
) -> Score:
    """Loss of one document under ``policy`` (ids ``[T]``, or text tokenized with ``model.tokenizer``), fed
    through ``model.step`` in chunks of ``chunk_size``; every token but the first is scored.

    ``on_state(state, tokens_consumed)`` is called after every chunk (e.g. to inspect kept positions).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    device = model.device  # type: ignore[attr-defined]
    tokenizer = sweep_tokenizer(model)
    if isinstance(ids, Tensor) and (ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool):
        raise ValueError(f"ids must be a [T] integer tensor; got shape {tuple(ids.shape)}, dtype {ids.dtype}")
    # Any integer ids (a memory-mapped corpus gives uint8): the model and the loss take int64.
    ids = (ids if isinstance(ids, Tensor) else as_document_ids(ids, tokenizer)).to(device, torch.long)
    state = model.init_state(1, cache=policy)  # type: ignore[attr-defined]
    score = Score(n_bytes=scored_bytes(tokenizer, ids))
    prev_last: Tensor | None = (
        None  # logits of the previous chunk's last token: it predicts this chunk's first
    )
    T = ids.numel()
    for start in range(0, T, chunk_size):
        chunk = ids[start : start + chunk_size]
        logits, state = model.step(chunk[None], state)  # type: ignore[attr-defined]
        logits = logits[0].float() if logits.dtype in (torch.float16, torch.bfloat16) else logits[0]
        preds = logits[:-1] if prev_last is None else torch.cat([prev_last, logits[:-1]])
        targets = chunk[1:] if prev_last is None else chunk
        score.nats += float(F.cross_entropy(preds, targets, reduction="sum"))
        score.tokens += targets.numel()
        prev_last = logits[-1:]
        if on_state is not None:
            on_state(state, start + chunk.numel())
    return score


@dataclass
class SweepResult:
    """Scores of a policy x budget grid (plus the full cache) over a set of documents.

    ``scores[policy][budget]`` and ``full`` aggregate all documents (token-weighted); ``per_document``
    holds each document's numbers under the same keys.
    """

    policies: list[str]
    budgets: list[int]
    documents: list[str]
    scores: dict[str, dict[int, Score]] = field(default_factory=dict)
    full: Score | None = None
    per_document: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    note: str | None = None  # which documents these are and why, when the caller had something to say

    def value(self, policy: str, budget: int | None, metric: str = "ppl") -> float:
        """One table cell: ``budget=None`` (or policy ``"full"``) is the full cache."""
        score = self.full if budget is None or policy == "full" else self.scores[policy][budget]
        assert score is not None
        return getattr(score, metric)

    def to_markdown(self, metric: str = "ppl") -> str:
        """The paper's Table 3 layout: one row per policy, one column per budget, the full cache last."""
        names = {"ppl": "perplexity", "bpb": "bits per byte", "loss": "nats per token"}
        head = ["policy", *[str(b) for b in self.budgets], "full"]
        lines = [
            f"{names[metric]} by cache budget (tokens kept per layer); "
            f"documents: {', '.join(self.documents)}",
            *([f"note: {self.note}"] if self.note else []),
            "",
            "| " + " | ".join(head) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
        ]
        full = f"{self.value('full', None, metric):.4f}" if self.full is not None else "-"
        for policy in self.policies:
            cells = [f"{self.value(policy, b, metric):.4f}" for b in self.budgets]
            lines.append("| " + " | ".join([policy, *cells, full]) + " |")
        if not self.policies and self.full is not None:
            # only the full cache was asked for: its own row, or the table would be a header without a number
            lines.append("| " + " | ".join(["full", *["-"] * len(self.budgets), full]) + " |")
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {
            "policies": self.policies,
            "budgets": self.budgets,
            "documents": self.documents,
            "scores": {p: {str(b): s.as_dict() for b, s in row.items()} for p, row in self.scores.items()},
            "full": self.full.as_dict() if self.full is not None else None,
            "per_document": self.per_document,
            "note": self.note,
        }

    def plot(self, path: str | Path, metric: str = "ppl") -> Path:
        """``metric`` vs budget on a log-2 x-axis, one line per policy, the full cache dashed."""
        import matplotlib

        matplotlib.use("Agg")  # headless; imported lazily so the library works without matplotlib
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for policy in self.policies:
            ax.plot(
                self.budgets, [self.value(policy, b, metric) for b in self.budgets], marker="o", label=policy
            )
        if self.full is not None:
            ax.axhline(self.value("full", None, metric), color="black", linestyle="--", label="full")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("cache budget (tokens per layer)")
        ax.set_ylabel({"ppl": "perplexity", "bpb": "bits per byte", "loss": "nats per token"}[metric])
        ax.set_title(f"{len(self.documents)} document(s)")
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def run_sweep(
    model: torch.nn.Module,
    documents: Sequence[tuple[str, Tensor | Document]],
    policies: Sequence[str],
    budgets: Sequence[int],
    *,
    include_full: bool = True,
    chunk_size: int = 512,
    max_tokens: int | None = None,
    out_dir: str | Path | None = None,
    metric: str = "ppl",
    progress: Callable[[str], None] | None = None,
    note: str | None = None,
) -> SweepResult:
    """Evaluate every policy at every budget (and the full cache) on every document.

    Args:
        model: a longseq language model with the state API (``init_state(1, cache=...)`` / ``step``).
        documents: ``(name, doc)`` pairs; ``doc`` is text (``str`` / ``bytes``, tokenized with
            ``model.tokenizer``) or a 1-D uint8 / integer tensor of token ids.
        policies: policy specs *without* a budget, e.g. ``["tova", "window", "sink", "h2o", "tova_head"]``;
            options are allowed (``"sink:sinks=8"``); see :func:`longseq.cache.parse_policy`. ``"full"`` in
            this list is ignored (the full cache is the last column, see ``include_full``; with no other
            policy the table has one row, ``full``). A spec with its own budget (``"tova:32"``) is refused:
            the grid's budgets would label cells the policy does not use.
        budgets: cache budgets (tokens kept per layer), e.g. ``[64, 128, 256, 512]``.
        include_full: also evaluate the unbounded cache (the table's last column).
        chunk_size: tokens per ``model.step`` call; exact eviction makes the numbers independent of it.
        max_tokens: truncate each document to its first ``max_tokens`` tokens (bytes are counted after).
        out_dir: if given, write ``sweep.md`` (table), ``sweep.json`` (all numbers, per document too)
            and ``sweep.png`` (``metric`` vs budget) there, each written whole or not at all (an existing file
            is replaced in one rename); an ``out_dir`` that cannot take them (a file, a folder that cannot be
            made or written, a folder where a file goes) is refused before any scoring.
        metric: the table/plot metric: ``"ppl"`` (per-token perplexity), ``"bpb"`` (bits per UTF-8 byte) or
            ``"loss"`` (nats per token).
        progress: called with a short line after each (policy, budget, document) evaluation.
        note: a line about the documents (e.g. which split they are and why), kept in ``sweep.md`` and
            ``sweep.json`` so the files say what the table was scored on.
    Returns:
        A :class:`SweepResult`; ``result.files`` names the files written.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}; got {metric!r}")
    if not documents:
        raise ValueError("run_sweep needs at least one document")
    budgets = sorted({int(b) for b in budgets})
    if any(b < 1 for b in budgets):
        raise ValueError(f"budgets must be >= 1; got {budgets}")
    specs = [p.strip() for p in policies if p.strip().lower() != "full"]
    runs = _sweep_runs(specs, budgets, include_full)
    if out_dir is not None:  # checked before the scoring, which may take hours, rather than when the files are written
        check_output_folder(out_dir, f"out_dir {out_dir}", SWEEP_FILES)
    docs = _sweep_documents(documents, max_tokens, sweep_tokenizer(model))

    result = SweepResult(policies=specs, budgets=budgets, documents=[name for name, _ in docs], note=note)
    for name, ids in docs:
        result.per_document[name] = {"tokens": ids.numel(), "scores": {}}
    for spec, budget, policy in runs:
        total = _score_run(model, docs, spec, budget, policy, chunk_size, result, progress)
        if budget is None:
            result.full = total
        else:
            result.scores.setdefault(spec, {})[budget] = total
    if out_dir is not None:
        result.files = _write_sweep(result, Path(out_dir), metric)
    return result


def _sweep_runs(
    specs: list[str], budgets: list[int], include_full: bool
) -> list[tuple[str, int | None, CachePolicy]]:
    """Every ``(spec, budget, policy)`` of the grid, policy by policy, then ``("full", None, Full())``."""
    grid: dict[str, dict[int, CachePolicy]] = {
        p: {b: parse_policy(p, budget=b, budgets_from="budgets") for b in budgets} for p in specs
    }
    runs: list[tuple[str, int | None, CachePolicy]] = [
        (p, b, pol) for p, row in grid.items() for b, pol in row.items()
    ]
    if include_full:
        runs.append(("full", None, Full()))
    return runs


def _sweep_documents(
    documents: Sequence[tuple[str, Tensor | Document]], max_tokens: int | None, tokenizer: Tokenizer | None
) -> list[tuple[str, Tensor]]:
    """``(name, ids [T])`` of each document, truncated to ``max_tokens``; names must be unique."""
    docs = []
    for name, doc in documents:
        ids = as_document_ids(doc, tokenizer)
        docs.append((name, ids[:max_tokens] if max_tokens is not None else ids))
    if len({name for name, _ in docs}) != len(docs):
        raise ValueError(f"document names must be unique; got {[name for name, _ in docs]}")
    return docs


def _score_run(
    model: torch.nn.Module,
    docs: list[tuple[str, Tensor]],
    spec: str,
    budget: int | None,
    policy: CachePolicy,
    chunk_size: int,
    result: SweepResult,
    progress: Callable[[str], None] | None,
) -> Score:
    """One cell of the table: ``policy`` on every document (each recorded in ``result.per_document``),
    returning the token-weighted total."""
    total = Score()
    for name, ids in docs:
        score = score_document(model, ids, policy, chunk_size=chunk_size)
        total.add(score)
        key = spec if budget is None else f"{spec}@{budget}"
        result.per_document[name]["scores"][key] = score.as_dict()
        if progress is not None:
            progress(f"{policy.spec:>24s} {name}: {score.bpb:.4f} bpb, ppl {score.ppl:.3f}")
    return total


def _write_sweep(result: SweepResult, out: Path, metric: str) -> dict[str, str]:
    """Write ``sweep.md``, ``sweep.json`` and ``sweep.png`` into ``out``; returns their paths by kind."""
    out.mkdir(parents=True, exist_ok=True)
    markdown, data = result.to_markdown(metric), jsonio.dumps(result.to_json(), indent=2) + "\n"  # NaN as null
    write_atomically(out / "sweep.md", lambda tmp: tmp.write_text(markdown))
    write_atomically(out / "sweep.json", lambda tmp: tmp.write_text(data))
    write_atomically(out / "sweep.png", lambda tmp: result.plot(tmp, metric))
    return {
        "markdown": str(out / "sweep.md"),
        "json": str(out / "sweep.json"),
        "plot": str(out / "sweep.png"),
    }


@dataclass
class KeptStats:
    """How often a layer keeps the first token and the most recent ones (TOVA paper, Section 6).

    Fractions are averaged over the sampled steps, batch rows and (per-head policies) kv heads.
    """

    layer: int
    samples: int = 0
    first_token: float = 0.0  # fraction of samples in which position 0 is kept
    recent: dict[int, float] = field(default_factory=dict)  # r -> fraction of the r most recent tokens kept
    mean_age: float = 0.0  # mean (current position - kept position) over kept tokens

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def kept_positions_summary(
    kept: Tensor, current: int, recent: Sequence[int] = (1, 4, 16, 64)
) -> dict[str, Any]:
    """Statistics of one layer's kept positions ``[B, n]`` or ``[B, H_kv, n]`` when ``current`` tokens
    have been consumed: whether position 0 is kept, the share of the ``r`` latest tokens kept, mean age."""
    kept = kept.reshape(-1, kept.shape[-1])  # [rows, n]
    last = current - 1
    out: dict[str, Any] = {"first_token": float((kept == 0).any(-1).double().mean())}
    out["recent"] = {}
    for r in recent:
        r_eff = min(r, current)
        out["recent"][r] = float((kept > last - r_eff).sum(-1).double().mean() / r_eff)
    out["mean_age"] = float((last - kept).double().mean()) if kept.numel() else 0.0
    return out


def kept_position_stats(
    model: torch.nn.Module,
    document: Tensor | Document,
    policy: CachePolicy | str,
    *,
    recent: Sequence[int] = (1, 4, 16, 64),
    every: int = 64,
    max_tokens: int | None = None,
) -> list[KeptStats]:
    """Per-layer statistics of the kept positions while ``policy`` processes ``document``.

    The document is fed in chunks of ``every`` tokens; after each chunk in which the cache is full (more
    tokens consumed than the budget), every attention layer's kept set is summarised: is the first token
    kept, what fraction of the ``r`` most recent tokens is kept (for each ``r`` in ``recent``), and the mean
    age of the kept tokens. Returns one :class:`KeptStats` per attention layer (layers without a token
    cache, e.g. GLA in a hybrid, are skipped). For MEGABYTE these are the global layers, counted in patches
    (position 0 is the pads' patch): ``recent`` and ``mean_age`` are in patches too.
    """
    policy = parse_policy(policy) if isinstance(policy, str) else policy
    ids = as_document_ids(document, sweep_tokenizer(model))
    if max_tokens is not None:
        ids = ids[:max_tokens]
    acc: dict[int, KeptStats] = {}

    def observe(state: Any, consumed: int) -> None:
        # In the persistent layers' own positions: MEGABYTE's global caches hold patches, not bytes (its local
        # caches restart at every patch and no policy bounds them).
        current = state.persistent_positions
        if policy.budget is not None and current <= policy.budget:
            return  # nothing evicted yet: every statistic would be trivially 1
        for layer, cache in enumerate(state.persistent_layers):
            if not cache.keeps_tokens:
                continue
            s = kept_positions_summary(cache.kept_positions(), current, recent)
            st = acc.setdefault(layer, KeptStats(layer=layer, recent={r: 0.0 for r in recent}))
            n = st.samples
            st.first_token = (st.first_token * n + s["first_token"]) / (n + 1)
            st.mean_age = (st.mean_age * n + s["mean_age"]) / (n + 1)
            st.recent = {r: (st.recent[r] * n + s["recent"][r]) / (n + 1) for r in recent}
            st.samples = n + 1

    score_document(model, ids, policy, chunk_size=every, on_state=observe)
    return [acc[k] for k in sorted(acc)]
